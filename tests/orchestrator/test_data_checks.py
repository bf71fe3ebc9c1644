"""`orchestrator.data.check_data`: datasets that would fail or mislead a run are told before Ray starts;
a dataset without labels is fine and only leaves the label metrics out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as cli
from orchestrator.config import ConfigError, load_config
from orchestrator.data import check_data
from pipelines.ingest import ingest


def _images(folder: Path, n: int, classes: list[str] | None) -> Path:
    """n small real PNGs (gradients, different per image), in class folders or loose."""
    for i in range(n):
        d = folder / classes[i % len(classes)] if classes else folder
        d.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:16, 0:16]
        arr = np.stack([(x * (i + 1) + y * c * 7) % 256 for c in range(3)], axis=-1).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def loose(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 loose images (no class folders), all in train: no labels, no test split rows."""
    root = tmp_path_factory.mktemp("loose")
    m = ingest(str(_images(root / "src", 40, None)), root / "data", test_fraction=0.0, progress=False)
    assert m.classes == [] and m.rows("test") == 0
    return root / "data"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 images in 2 classes, all in train (test split: 0 rows)."""
    root = tmp_path_factory.mktemp("labelled")
    ingest(str(_images(root / "src", 40, ["a", "b"])), root / "data", test_fraction=0.0, progress=False)
    return root / "data"


def _cfg(data: Path, *overrides: str):  # noqa: ANN202
    return load_config(None, [f"data.path={data}", "data.source=null", "data.image_size=16", *overrides])


def test_unlabeled_data_needs_no_test_split_and_turns_label_metrics_off(loose: Path, tmp_path: Path) -> None:
    cfg = _cfg(loose, "optim.batch_size=32")  # the config check passes without test rows
    checked = check_data(cfg)
    assert checked.train_rows == 40 and checked.label_metrics is False
    assert checked.label_note == f"{loose} has no labels (manifest.json lists no classes): label metrics (kNN) left out"
    # A manifest with no test split at all is fine too.
    no_test = tmp_path / "no-test"
    shutil.copytree(loose, no_test)
    raw = json.loads((no_test / "manifest.json").read_text())
    raw["splits"].pop("test")
    (no_test / "manifest.json").write_text(json.dumps(raw))
    assert check_data(_cfg(no_test, "optim.batch_size=32")).label_metrics is False
    # A sweep ranks trials by kNN: refused, before Ray.
    with pytest.raises(ConfigError, match="has no labels .* and a sweep ranks its trials by knn_top1"):
        check_data(cfg, need_labels="a sweep ranks its trials by knn_top1")


def test_labelled_data_without_test_rows_is_refused(labelled: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.test_split = 'test': .* lists 0 rows for it, and the kNN probe"):
        check_data(_cfg(labelled, "optim.batch_size=32"))


def test_images_over_the_run_pixel_limit_are_refused_before_ray(loose: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.max_image_pixels = 100: .* holds a 16x16 image \(256 pixels"):
        check_data(_cfg(loose, "optim.batch_size=32", "data.max_image_pixels=100"))


@pytest.mark.parametrize("limit", [None, 20])
def test_fewer_images_than_one_global_batch_is_one_line_before_ray(loose: Path, tmp_path: Path, limit: int | None,
                                                                   capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setenv("SELFSUP_RAY_TEMP_ROOT", str(tmp_path / "ray"))
    (tmp_path / "ray").mkdir()
    args = ["pretrain", "--set", f"data.path={loose}", "--set", "data.source=null", "--set", "data.image_size=16",
            "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    if limit:
        args += ["--set", f"data.limit={limit}", "--set", "optim.batch_size=32"]  # 20 < 32 < 40
    assert cli(args) == 2  # the default batch of 256 > 40 images
    err = capsys.readouterr().err.strip()
    used = limit or 40
    assert len(err.splitlines()) == 1 and err.startswith(
        f"selfsup pretrain: error: optim.batch_size = 32: more than the {used} training images (data.limit = {limit})"
        if limit else "selfsup pretrain: error: optim.batch_size = 256: more than the 40 training images in"), err
    assert "every epoch would take 0 steps" in err
    # Nothing started, nothing written: no Ray session, no run folder, no MLflow store.
    assert not ray.is_initialized() and not any((tmp_path / "ray").iterdir())
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_knn_leaves_out_loose_images_of_a_mixed_folder() -> None:
    """An ImageFolder with class folders and loose images: the loose ones (label -1) are in the
    bank and queries as decoded, and the probe drops them instead of indexing class -1."""
    import torch

    from methods.encoders import build_encoder
    from orchestrator.config import Config
    from orchestrator.probes import KnnProbe
    from pipelines.memory import DecodedSplit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 3, 16, 16), dtype=np.uint8)
    labels = np.array([0, 1, -1] * 4, dtype=np.int64)
    split = DecodedSplit(images, labels)
    cfg = Config()
    cfg.eval.knn_k = 3
    probe = KnnProbe(cfg, torch.device("cpu"), {"bank": split, "test": split})
    assert probe.bank_y.tolist() == [0, 1] * 4 and probe.test_x.shape == (8, 3, 16, 16)
    result = probe(build_encoder("convnet"))
    assert 0.0 <= result["knn_top1"] <= 1.0
