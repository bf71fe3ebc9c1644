"""`training.probe_metrics`: the evaluation protocol shared by pretraining and `selfsup evaluate`."""

from __future__ import annotations

import torch

from orchestrator.config import EvalConfig
from orchestrator.probes import probe_metrics


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(10, 16, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return centres[labels] + torch.randn(n, 16, generator=g), labels


def test_knn_and_linear_probe_on_labelled_features() -> None:
    (bank, y), (test, y_test) = _blobs(500, 1), _blobs(200, 2)
    m = probe_metrics(bank, y, test, y_test, EvalConfig(linear_epochs=10), seed=0)
    assert m["knn_top1"] > 0.9 and m["linear_top1"] > 0.9 and m["linear_top5"] >= m["linear_top1"]
    assert "linear_top1" not in probe_metrics(bank, y, test, y_test, EvalConfig(), seed=0, linear=False)
    assert "linear_top1" not in probe_metrics(bank, y, test, y_test, EvalConfig(linear_epochs=0), seed=0)
    # linear_train_limit: a seeded subset of the bank, the same every time
    small = EvalConfig(linear_epochs=10, linear_train_limit=50)
    runs = [probe_metrics(bank, y, test, y_test, small, seed=0) for _ in range(2)]
    for r in runs:
        r.pop("linear_seconds")
    assert runs[0] == runs[1]


def test_unlabelled_images_are_skipped_not_a_crash() -> None:
    (bank, y), (test, y_test) = _blobs(100, 1), _blobs(50, 2)
    assert probe_metrics(bank, torch.full_like(y, -1), test, y_test, EvalConfig(), seed=0) == {}
