"""Elastic runs (`scaling.num_workers: [min, max]`): the config, the global batch and the schedules
across world sizes, and the restarts read back from a run's epoch history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.config import Config, apply_overrides, validate
from orchestrator.elastic import describe, worker_group_restarts
from orchestrator.training import TrainBatches, build_model, build_optimizer, build_scheduler, steps_per_epoch
from pipelines.memory import DecodedSplit

ROWS, GLOBAL_BATCH = 50, 8


def _cfg(**over: object) -> Config:
    return apply_overrides(Config(), {"data.source": None, "optim.batch_size": GLOBAL_BATCH, "optim.epochs": 3,
                                      "scaling.num_workers": [1, 2], **over})


def test_num_workers_takes_an_integer_or_min_max() -> None:
    fixed = _cfg(**{"scaling.num_workers": 2})
    assert not fixed.scaling.elastic and fixed.scaling.for_ray() == 2 and list(fixed.scaling.worker_counts()) == [2]
    elastic = _cfg()
    validate(elastic, check_data=False, check_gpu=False)
    assert elastic.scaling.elastic and elastic.scaling.for_ray() == (1, 2)
    assert (elastic.scaling.min_workers, elastic.scaling.max_workers) == (1, 2)
    assert Config.from_dict(elastic.to_dict()).scaling.num_workers == [1, 2]  # round-trips (run records, --resume)


def _split() -> DecodedSplit:
    # Image i holds the value i % 256 in its first pixel: a batch says which rows it gathered.
    images = np.zeros((ROWS, 3, 4, 4), np.uint8)
    images[:, 0, 0, 0] = np.arange(ROWS)
    return DecodedSplit(images, np.zeros(ROWS, np.int64))


def _rows_of(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


def _identity(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch, batch


def _global_batches(cfg: Config, world: int, epoch: int) -> list[list[int]]:
    """Each step's global batch (every rank's part, rank after rank), through the workers' own loader."""
    split, per_rank = _split(), []
    for rank in range(world):
        batches = TrainBatches(cfg, {"train": split}, torch.device("cpu"), rank, world)
        assert batches.batch_size == GLOBAL_BATCH // world  # each worker takes global / n
        from pipelines.memory import epoch_indices

        indices = epoch_indices(split.__len__(), world, rank, batches.batch_size, seed=cfg.run.seed, epoch=epoch)
        per_rank.append([_rows_of(v1) for v1, _ in batches.memory.epoch(indices, batch_size=batches.batch_size,
                                                                        augment=_identity)])
    assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
    return [sum((p[step] for p in per_rank), []) for step in range(len(per_rank[0]))]


def test_global_batch_and_slices_across_world_sizes_1_2_1() -> None:
    """A run resized 1 -> 2 -> 1 between epochs: every epoch has the same steps, each step's global
    batch holds GLOBAL_BATCH images, the ranks' parts never overlap, and the global batches are the
    ones an unresized run takes."""
    cfg = _cfg()
    steps = {steps_per_epoch(cfg, ROWS, w) for w in (1, 2)}
    assert steps == {ROWS // GLOBAL_BATCH}
    for epoch, world in enumerate((1, 2, 1), start=1):
        got = _global_batches(cfg, world, epoch)
        assert len(got) == ROWS // GLOBAL_BATCH
        assert all(len(b) == GLOBAL_BATCH == len(set(b)) for b in got)
        assert len(set(sum(got, []))) == GLOBAL_BATCH * len(got)  # no image twice in the epoch
        other = 3 - world  # the same epoch on the other world size: the same global batches
        assert [sorted(b) for b in got] == [sorted(b) for b in _global_batches(cfg, other, epoch)]
    assert _global_batches(cfg, 1, 1) != _global_batches(cfg, 1, 2)  # a new order each epoch


@pytest.mark.parametrize("rows", [50, 4000, 50_000, 50_001])
def test_steps_and_learning_rates_do_not_depend_on_the_world_size(rows: int) -> None:
    """floor(floor(rows / n) / (B / n)) == floor(rows / B) when n divides B: the LR and momentum
    schedules (per step) are the same whatever the world size of an epoch."""
    cfg = _cfg(**{"optim.batch_size": 512, "scaling.num_workers": [1, 4], "optim.warmup_epochs": 1})
    assert {steps_per_epoch(cfg, rows, n) for n in (1, 2, 4)} == {max(1, rows // 512)}
    lrs = []
    for n in (1, 2, 4):
        torch.manual_seed(0)
        optimizer = build_optimizer(cfg, build_model(cfg))
        scheduler = build_scheduler(cfg, optimizer, steps_per_epoch(cfg, rows, n))
        seq = []
        for _ in range(min(40, steps_per_epoch(cfg, rows, n) * cfg.optim.epochs)):
            optimizer.step()
            scheduler.step()
            seq.append(scheduler.get_last_lr()[0])
        lrs.append(seq)
    assert lrs[0] == lrs[1] == lrs[2]


def _epoch(epoch: int, world: int, resumed_from: int, ended_at: float, seconds: float = 10.0) -> dict[str, float]:
    return {"epoch": epoch, "world_size": world, "resumed_from_epoch": resumed_from, "ended_at": ended_at,
            "epoch_seconds": seconds, "loss": 1.0}


def test_restarts_and_resizes_from_the_epoch_history() -> None:
    history = [_epoch(1, 2, 0, 100.0), _epoch(2, 2, 0, 110.0),
               _epoch(3, 1, 2, 150.0),  # lost the node in epoch 3: 150 - 110 - 10 = 30 s lost
               _epoch(4, 1, 2, 160.0),
               _epoch(5, 2, 4, 185.0),  # grew back: 185 - 160 - 10 = 15 s lost
               _epoch(6, 2, 4, 195.0),
               _epoch(7, 2, 6, 220.0)]  # a restart at the same size (a worker process died)
    restarts = worker_group_restarts(history)
    assert [(r.epoch, r.world_before, r.world_after, r.resize) for r in restarts] == [
        (3, 2, 1, True), (5, 1, 2, True), (7, 2, 2, False)]
    assert [r.seconds_lost for r in restarts] == pytest.approx([30.0, 15.0, 15.0])
    text = describe(restarts)
    assert text.startswith("2 resizes: 2->1 before epoch 3 (30 s lost), 1->2 before epoch 5 (15 s lost)")
    assert worker_group_restarts(history[:2]) == [] and describe([]) == "no worker-group restarts"
