"""The per-worker epoch loop without Ray: every method steps through `TrainBatches` (memory loader)
and `train_one_epoch`, DINO with its local crops made by the worker's augmenter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods import METHODS
from orchestrator.config import Config, apply_overrides
from orchestrator.train_loop import (TrainBatches, build_model, build_optimizer, build_scheduler,
                                     train_one_epoch)
from pipelines.memory import DecodedSplit

ROWS, BATCH = 16, 8


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def _cfg(method: str) -> Config:
    return apply_overrides(Config(), {"method.name": method, "method.hidden_dim": 32, "method.projection_dim": 32,
                                      "optim.batch_size": BATCH, "scaling.num_workers": 1, "optim.epochs": 1,
                                      "optim.warmup_epochs": 0})


def _split() -> DecodedSplit:
    rng = np.random.default_rng(0)
    return DecodedSplit(rng.integers(0, 256, (ROWS, 3, 28, 28), dtype=np.uint8), np.zeros(ROWS, np.int64))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_an_epoch_through_the_worker_loop(name: str) -> None:
    cfg = _cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, ROWS // BATCH)
    batches = TrainBatches(cfg, {"train": _split()}, torch.device("cpu"), rank=0, world=1)
    first = next(iter(batches.epoch(1, 123)))
    assert len(first) == (3 if name == "dino" else 2)
    if name == "dino":  # 2 local crops of 28 * 96/224 = 12 px per image, as the config says
        assert first[2].shape == (2, BATCH, 3, 12, 12)
    stats = train_one_epoch(model, optimizer, scheduler, batches.epoch(1, 123), device=torch.device("cpu"),
                            first_step=0, total_steps=ROWS // BATCH)
    assert stats["steps"] == ROWS // BATCH and math.isfinite(stats["loss"])
    if name == "dino":  # step 1 at progress 0 (0.04); update_momentum(0.5) ends the 0.3 warm-up (0.07)
        assert stats["teacher_temp"] == pytest.approx((0.04 + 0.07) / 2)
