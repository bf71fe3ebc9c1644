"""A small ingested dataset for the pipelines tests, built from a slice of the CIFAR-10 fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.ingest import ingest
from shard_testdata import write_cifar_slice


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory, cifar10_dir: Path) -> Path:
    """An ingested dataset of 128 train / 32 test real CIFAR-10 JPEGs (split kept from the file names)."""
    root = tmp_path_factory.mktemp("small-shards")
    source = write_cifar_slice(cifar10_dir, root / "source", train_rows=128, test_rows=32)
    ingest(str(source), root / "shards", progress=False)
    return root / "shards"
