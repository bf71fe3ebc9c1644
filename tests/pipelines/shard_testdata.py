"""Small real inputs for the pipelines tests: slices of the CIFAR-10 fixture (never written next to it)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq


def write_cifar_slice(cifar10_dir: Path, out: Path, train_rows: int, test_rows: int) -> Path:
    """Copy the first rows of one train shard and of the test shard (schema metadata kept) into `out`,
    named `train-00000-of-00001.parquet` / `test-00000-of-00001.parquet`."""
    out.mkdir(parents=True, exist_ok=True)
    for src, name, n in (("train-00000-of-00005.parquet", "train-00000-of-00001.parquet", train_rows),
                         ("test-00000-of-00001.parquet", "test-00000-of-00001.parquet", test_rows)):
        table = pq.ParquetFile(cifar10_dir / src).read_row_group(0).slice(0, n)  # groups hold 1,000 rows
        pq.write_table(table, out / name)
    return out
