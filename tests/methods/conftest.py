"""One torch thread for the methods tests: their ops are tiny, and with other processes on the two
cores OpenMP's spin-waiting made 2 threads up to 50x slower than 1. Restored after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
