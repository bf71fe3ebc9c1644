"""`data.loader`: which path a run takes, and the decoded data the driver puts into a real local Ray."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.data import data_key, matches, needed_bytes, put_decoded, resolve_loader

STORE_MB = 80  # Ray's smallest object store is 75 MB: auto takes memory up to 20 MB of decoded images




@pytest.fixture(scope="module")
def small_store_ray() -> Iterator[None]:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray_tmp = tempfile.mkdtemp(prefix="r")  # in the test session's TMPDIR (tests/conftest.py)
    ray.init(address="local", num_cpus=2, object_store_memory=STORE_MB << 20, include_dashboard=False,
             log_to_driver=False, _temp_dir=ray_tmp)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cfg(data: Path, *overrides: str):  # noqa: ANN202
    return load_config(None, [f"data.path={data}", "data.source=null", *overrides], check=False)


def test_needed_bytes_counts_train_bank_and_queries(demo_data: Path) -> None:
    per_image = 3 * 28 * 28 + 8
    assert needed_bytes(_cfg(demo_data)) == (4000 + 4000 + 1000) * per_image  # bank = the whole train split
    small = _cfg(demo_data, "data.limit=1000", "eval.knn_train_limit=500", "eval.knn_test_limit=200")
    assert needed_bytes(small) == (1000 + 500 + 200) * per_image


@pytest.mark.slow  # a local Ray
def test_auto_takes_memory_when_the_split_fits_and_streams_when_not(demo_data: Path, small_store_ray: None) -> None:
    assert needed_bytes(_cfg(demo_data)) > STORE_MB / 4 * 2**20  # 21 MB: over a quarter of 80 MB
    assert resolve_loader(_cfg(demo_data)) == "stream"
    assert resolve_loader(_cfg(demo_data, "data.limit=1000", "eval.knn_train_limit=1000")) == "memory"
    assert resolve_loader(_cfg(demo_data, "data.loader=memory")) == "memory"  # forced: fits in 80%
    assert resolve_loader(_cfg(demo_data, "data.loader=stream", "data.limit=100")) == "stream"
    assert resolve_loader(_cfg(demo_data, "data.augment_on=data", "data.limit=100")) == "stream"
    with pytest.raises(ConfigError, match=r"data.loader = 'memory': the decoded images take 0.11 GB.*data.loader=stream"):
        resolve_loader(_cfg(demo_data, "data.loader=memory", "data.image_size=64"))


@pytest.mark.slow  # a local Ray
def test_put_decoded_holds_the_train_split_bank_and_queries(demo_data: Path, small_store_ray: None) -> None:
    import ray

    from pipelines.memory import load_split

    cfg = _cfg(demo_data, "data.limit=1000", "eval.knn_train_limit=300", "eval.knn_test_limit=200")
    data = put_decoded(cfg)
    assert data.train_rows == 1000 and matches(data, cfg) and data.key == data_key(cfg)
    assert not matches(data, _cfg(demo_data, "data.limit=1000", "eval.knn_train_limit=300", "eval.knn_test_limit=200",
                                  "data.image_size=32"))
    got = ray.get(data.for_worker()["ref"])
    train_x, train_y = load_split(demo_data, "train", limit=1000, first=True)
    assert np.array_equal(got["train"].images, train_x.numpy()) and np.array_equal(got["train"].labels, train_y.numpy())
    bank_x, _ = load_split(demo_data, "train", limit=300)  # the kNN probe's own stratified subsets
    test_x, _ = load_split(demo_data, "test", limit=200)
    assert np.array_equal(got["bank"].images, bank_x.numpy()) and np.array_equal(got["test"].images, test_x.numpy())
    assert data.nbytes == (1000 + 300 + 200) * (3 * 28 * 28 + 8)


@pytest.mark.slow  # a local Ray
def test_memory_loader_that_cannot_fit_writes_nothing(demo_data: Path, small_store_ray: None, tmp_path: Path) -> None:
    from orchestrator.pretrain import run_pretrain

    cfg = _cfg(demo_data, "data.loader=memory", "data.image_size=64", f"run.storage_path={tmp_path / 'runs'}",
               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "run.name=too-big")
    with pytest.raises(ConfigError, match="data.loader = 'memory'"):
        run_pretrain(cfg)
    assert not (tmp_path / "runs" / "too-big").exists()  # no run record to --resume from
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("selfsup")
    assert exp is None or not MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs([exp.experiment_id])


def test_memory_loader_and_ray_data_augmentation_are_refused_together(demo_data: Path) -> None:
    with pytest.raises(ConfigError, match="--set data.augment_on=data: needs data.loader=stream"):
        load_config(None, [f"data.path={demo_data}", "data.loader=memory", "data.augment_on=data"])
    with pytest.raises(ConfigError, match="--set data.loader=disk: allowed: auto, memory, stream"):
        load_config(None, [f"data.path={demo_data}", "data.loader=disk"])
