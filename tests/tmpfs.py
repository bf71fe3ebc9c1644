"""A tmpfs of a given size, mounted under a test's temp folder: the full disk the tests attack
with (root only; a test skips where it cannot mount one)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (mount's notation: "1m", "9m") at `mount_point`, unmount it after."""
    mount_point.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def resize_tmpfs(mount_point: Path, size: str) -> None:
    """Grow (or shrink, down to what it holds) a tmpfs mounted by `mounted_tmpfs`: space freed."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)
