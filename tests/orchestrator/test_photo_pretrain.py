"""Photos of mixed sizes train under both loaders: views cut from the whole photo (issue 23)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.pretrain import run_pretrain


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """192 photo-like JPEGs of mixed sizes (64-128 px sides, aspect 3:4 to 16:9), ingested."""
    from pipelines.ingest import ingest
    from pipelines.photos import write_photos

    root = tmp_path_factory.mktemp("photos")
    write_photos(root / "src", 192, source="shapes", min_side=64, max_side=128)
    m = ingest(str(root / "src"), root / "data", test_fraction=0.25, progress=False)
    assert m.image_size is None  # mixed sizes: the decoded-once path cannot take them
    return root / "data"


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_mixed_size_photos_pretrain(photo_data: Path, tmp_path: Path, mlflow_server: str, ray_temp_root: str,
                                    monkeypatch: pytest.MonkeyPatch, loader: str) -> None:
    monkeypatch.setenv("SELFSUP_RAY_TEMP_ROOT", ray_temp_root)
    overrides = {"data.path": photo_data, "data.source": "null", "data.loader": loader, "data.image_size": 32,
                 "run.storage_path": tmp_path / "runs", "tracking.uri": mlflow_server,
                 "tracking.experiment": f"photos-{loader}", "tracking.model_name": f"photo-{loader}",
                 "optim.epochs": 1, "optim.batch_size": 32}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    r = run_pretrain(cfg, stem=f"photos-{loader}", progress=False)
    assert r.epochs == 1 and not r.diverged and r.loss is not None
    assert r.metrics["steps"] == 4  # 144 training photos / 2 workers = 72 each, 16 per worker batch
    assert r.knn_top1 is not None and 0.0 <= r.knn_top1 <= 1.0  # kNN on eval-transformed photos
