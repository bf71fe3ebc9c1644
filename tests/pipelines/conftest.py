"""A small ingested dataset for the pipelines tests, built from a slice of the CIFAR-10 fixture."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.fixture()
def two_worker_run(ray_local: None, tmp_path: Path) -> Callable[..., list[Any]]:
    """Runs a Ray Train loop on two workers of one CPU each (the local Ray of `ray_local`); each
    worker writes what it saw to `config["out"]/rank<r>.json`; returns both ranks' records."""
    def run(loop: Callable[[dict], None], name: str, *, config: dict | None = None,
            datasets: dict | None = None) -> list[Any]:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        out = tmp_path / "seen"
        out.mkdir()
        TorchTrainer(loop, train_loop_config={"out": str(out), **(config or {})},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     datasets=datasets, run_config=RunConfig(storage_path=str(tmp_path / "runs"), name=name)).fit()
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    return run
