"""The per-worker epoch loop without Ray: every method steps through `TrainBatches` (memory loader)
and `train_one_epoch`, DINO with its local crops made by the worker's augmenter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods import METHODS
from orchestrator.config import Config, apply_overrides
from orchestrator.training import (TrainBatches, build_model, build_optimizer, build_scheduler,
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
    if name == "mae":  # MAE masks ViT patches: a CPU-sized ViT-Tiny/4 (7x7 patches at 28 px)
        cfg = apply_overrides(cfg, {"model.encoder": "vit_tiny", "method.hidden_dim": None, "method.projection_dim": None,
                                    "method.decoder_dim": 16, "method.decoder_depth": 1,
                                    "method.decoder_heads": 2, "model.encoder_args": {
                                        "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}})
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, ROWS // BATCH)
    batches = TrainBatches(cfg, {"train": _split()}, torch.device("cpu"), rank=0, world=1)
    first = next(iter(batches.epoch(1, 123)))
    assert len(first) == (3 if name in ("dino", "swav") else 2)
    if name in ("dino", "swav"):  # 2 local crops of 28 * 96/224 = 12 px per image, as the config says
        assert first[2].shape == (2, BATCH, 3, 12, 12)
    stats = train_one_epoch(model, optimizer, scheduler, batches.epoch(1, 123), device=torch.device("cpu"),
                            first_step=0, total_steps=ROWS // BATCH)
    assert stats["steps"] == ROWS // BATCH and math.isfinite(stats["loss"])
    if name == "dino":  # step 1 at progress 0 (0.04); update_momentum(0.5) ends the 0.3 warm-up (0.07)
        assert stats["teacher_temp"] == pytest.approx((0.04 + 0.07) / 2)


def test_weight_decay_follows_a_cosine_when_an_end_is_set_and_resumes() -> None:
    from methods.schedules import cosine_schedule

    cfg = _cfg("simclr")
    cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.epochs = 0.04, 0.4, 2
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps=5)  # 10 steps in all
    decayed, no_decay = optimizer.param_groups
    assert (decayed["weight_decay"], no_decay["weight_decay"]) == (pytest.approx(0.04), 0.0)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert decayed["weight_decay"] == pytest.approx(cosine_schedule(4, 10, 0.04, 0.4))
    assert no_decay["weight_decay"] == 0.0  # biases and norm weights: none, as DINO's param groups
    resumed = build_scheduler(cfg, build_optimizer(cfg, model), steps=5)
    resumed.load_state_dict(scheduler.state_dict())
    resumed.step()
    assert resumed.optimizer.param_groups[0]["weight_decay"] == pytest.approx(cosine_schedule(5, 10, 0.04, 0.4))


def test_dino_vit_trains_with_its_recipe_through_the_worker_loop() -> None:
    """ViT-Tiny/4 (CPU-sized) on 28 px: local crops of 12 px (3x3 patches), the hooks of the loop run."""
    cfg = apply_overrides(_cfg("dino"), {"model.encoder": "vit_tiny", "optim.epochs": 2,
                                         "model.encoder_args": {"patch_size": 4, "depth": 2, "embed_dim": 32,
                                                                "num_heads": 2},
                                         "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4})
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, ROWS // BATCH)
    batches = TrainBatches(cfg, {"train": _split()}, torch.device("cpu"), rank=0, world=1)
    start = model.head.prototypes.detach().clone()
    stats = train_one_epoch(model, optimizer, scheduler, batches.epoch(1, 1), device=torch.device("cpu"),
                            first_step=0, total_steps=2 * ROWS // BATCH, max_steps=ROWS // BATCH)
    assert math.isfinite(stats["loss"]) and model.epoch == 0
    assert torch.equal(model.head.prototypes, start)  # frozen through the first epoch
    train_one_epoch(model, optimizer, scheduler, batches.epoch(2, 2), device=torch.device("cpu"),
                    first_step=ROWS // BATCH, total_steps=2 * ROWS // BATCH, max_steps=ROWS // BATCH)
    assert model.epoch == 1 and not torch.equal(model.head.prototypes, start)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.4)
