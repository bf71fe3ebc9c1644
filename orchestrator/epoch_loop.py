"""The one epoch loop of selfsup, and the two places it runs.

`run_epochs(config, session)` is the whole of a run's training: build the method, restore the last
checkpoint, then per epoch train, evaluate, checkpoint and report. Where it runs is the `session`:

- `TrainWorkerSession`: a Ray Train worker (`selfsup pretrain`, and sweep trials of several
  workers). Pattern after Ray's `torch_fashion_mnist_example.py`: `train_func_per_worker(config)`
  runs on every worker; DDP, `ray.train.report` / `get_checkpoint`, the worker's Ray Data shard.
- `TuneTrialSession`: a Tune trial's own process (sweep trials of one worker). Ray's guide to
  Train inside Tune (`doc/source/train/user-guides/hyperparameter-optimization.rst`) says trials
  "typically" compute in the trial's actor; only multi-worker trials need a Train run. This skips
  the Train controller and worker processes (~20 s of start-up per trial on 2 cores,
  `benchmarks/sweep_overhead.py`). `ray.tune.report` / `ray.tune.get_checkpoint`; Tune's
  `FailureConfig` restarts a failed trial from its last checkpoint.

Per epoch, every worker:
1. reseeds torch / numpy / random and the augmenter from (run.seed, rank, epoch), so a resumed epoch
   starts from the same random state as an uninterrupted one (the checkpoint's epoch fixes it);
2. takes its share of the epoch's images (`training.TrainBatches`), makes two views of each batch
   on its own device (DINO: plus its local crops) and takes steps (DDP across workers; bf16
   autocast + channels_last on GPU); LR warm-up + cosine per step, momentum update per step;
3. rank 0 computes kNN top-1/top-5 and, after the last epoch (or every epoch with
   `eval.linear_every_epoch`), the linear probe (`training.KnnProbe`); the other ranks wait at
   the report barrier;
4. reports once, with the world size it ran on (`world_size`) and the global batch its workers took
   (`global_batch`: the same at any world size of an elastic run, docs/design.md "Elastic runs");
   rank 0 attaches the checkpoint `state.pt` (model incl. the MoCo queue buffers,
   optimiser, scheduler, epoch, seeds, metrics, every epoch's metrics so far; loads with
   weights_only). One process writes MLflow from the reports: the Train controller's callback
   (`tracking.MlflowTrainCallback`) or, for a one-process trial, the sweep driver's Tune callback.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods import prepare_for_distributed
from methods.encoders import representation_encoder
from orchestrator.config import Config
from orchestrator.ray_compat import CHECKPOINT_SNAPSHOT
from orchestrator.timeline import mark, process_start_time
from orchestrator.probes import KnnProbe, worker_label_metrics
from orchestrator.training import (STATE_FILE, TrainBatches, build_model, build_optimizer, build_scheduler, compile_model,
                                   load_state, save_state, seed_everything, steps_per_epoch, train_one_epoch, unwrap)
from pipelines import storage

FAULT_MARKER = "fault-injected"
# Keys the driver adds to the loop's config next to `Config.to_dict()`.
INTERNAL_KEYS = ("_run_dir", "_fault_kill_at_epoch", "_train_rows", "_data", "_label_metrics")


# --- where the loop runs ----------------------------------------------------------------------------

class TrainWorkerSession:
    """The loop inside a Ray Train V2 worker: rank and world from Train, DDP, Train's report."""

    # A run restored at its last epoch reports nothing more: the driver reads the final checkpoint
    # from Train's result and logs what MLflow lacks (`pretrain`).
    reports_again = False

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        # MoCo's queue and BN running stats are identical on every rank by construction: buffers
        # are synced once at DDP init, not broadcast before every forward.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})

    def shard(self) -> Any:
        import ray.train

        return ray.train.get_dataset_shard("train")

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneTrialSession:
    """The loop in a Tune trial's own process: one worker, no DDP, `ray.tune.report`.

    Args:
        metric: the sweep's metric (`scored_for_tune`).
        dataset: the run's Ray Data dataset for the stream loader (None: memory loader).
    """

    # A trial restored at its last epoch reports it again: the sweep driver's callback is the MLflow
    # writer and may have died before it logged that epoch.
    reports_again = True

    def __init__(self, cfg: Config, metric: str, dataset: Any = None) -> None:
        self.rank, self.world = 0, 1
        # Tune sets CUDA_VISIBLE_DEVICES to the trial's GPU when the trial asked for one.
        self.device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        self.metric, self.dataset = metric, dataset

    def checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def shard(self) -> Any:
        return self.dataset.iterator()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(scored_for_tune(metrics, self.metric), checkpoint=checkpoint)


def scored_for_tune(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    """An epoch report as Tune gets it: `diverged` always there, and `metric` 0 on a diverged epoch.

    A diverged epoch reports no kNN accuracy; Tune requires the scheduler's metric in every result,
    and 0 (the worst accuracy) is what a diverged encoder is worth to ASHA and to the searcher.
    """
    m = dict(metrics)
    m["diverged"] = float(m.get("diverged", 0.0))
    value = m.get(metric)
    if m["diverged"] or not isinstance(value, (int, float)) or not math.isfinite(value):
        m[metric] = 0.0
    return m


# --- the loop ---------------------------------------------------------------------------------------

def train_func_per_worker(config: dict[str, Any]) -> None:
    """Ray Train V2 worker: `config` is `Config.to_dict()` plus the driver's `_`-prefixed keys."""
    run_epochs(config, TrainWorkerSession())


def run_epochs(config: dict[str, Any], session: Any) -> None:
    """Train from the session's last checkpoint (if any) to `optim.epochs`, reporting every epoch."""
    cfg = Config.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    mark("worker_start", run=cfg.run.name, process_start=process_start_time())
    loop = _Loop(cfg, config, session)
    for epoch in range(loop.start_epoch + 1, cfg.optim.epochs + 1):
        if not loop.epoch(epoch):
            return  # diverged
    if loop.start_epoch >= cfg.optim.epochs and session.reports_again:
        loop.report_again()


class _Loop:
    """The state the epochs share: model, optimiser, schedule, batches, probe, metrics so far."""

    def __init__(self, cfg: Config, config: dict[str, Any], session: Any) -> None:
        self.cfg, self.config, self.session = cfg, config, session
        rank, world, device = session.rank, session.world, session.device
        if device.type == "cpu":
            from pipelines.augment import keep_freed_memory

            keep_freed_memory()  # the CPU augment path measured 2-3x faster colour ops with it (see there)
        seed_everything(cfg.run.seed, 0, 0)  # same initial weights on every rank (DDP broadcasts them anyway)
        model = prepare_for_distributed(build_model(cfg))  # BN statistics over all workers (SimCLR "global BN")
        self.state = _restore(session.checkpoint())
        if self.state is not None:
            model.load_state_dict(self.state["model"])
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        compile_model(cfg, model, device)  # optim.compile; in place, before DDP wraps it
        self.model = session.wrap(model)
        self.module = unwrap(self.model)
        self.optimizer = build_optimizer(cfg, self.module)
        self.steps = steps_per_epoch(cfg, int(config["_train_rows"]), world)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps)
        self.start_epoch, self.metrics, self.history = 0, {}, []
        if self.state is not None:
            self.optimizer.load_state_dict(self.state["optimizer"])
            self.scheduler.load_state_dict(self.state["scheduler"])
            self.start_epoch, self.metrics = int(self.state["epoch"]), dict(self.state["metrics"])
            self.history = list(self.state.get("history", []))
        decoded = None
        if config.get("_data") is not None:
            from orchestrator.data import get_decoded

            decoded = get_decoded(config["_data"])
        self.batches = TrainBatches(cfg, decoded, device, rank, world, shard=session.shard)
        self.probe = KnnProbe(cfg, device, decoded) if rank == 0 and worker_label_metrics(config) else None
        self.untrained = self.metrics.get("knn_top1_untrained")
        if self.probe is not None and self.untrained is None and self.start_epoch < cfg.optim.epochs:
            self.untrained = self.probe(representation_encoder(self.module)).get("knn_top1")  # None: unlabelled images

    def epoch(self, epoch: int) -> bool:
        """Train, evaluate, checkpoint and report one epoch; False when the loss diverged."""
        cfg, session = self.cfg, self.session
        t0 = time.perf_counter()
        mark("epoch_start", run=cfg.run.name, rank=session.rank, epoch=epoch)
        epoch_seed = seed_everything(cfg.run.seed, session.rank, epoch)
        first_of_group = epoch == self.start_epoch + 1

        def on_step(i: int) -> None:
            if i != 1:
                return
            if first_of_group and session.rank == 0:  # benchmarks/elastic_resize.py: restart -> first step
                mark("group_first_step", run=cfg.run.name, epoch=epoch, world=session.world)
            _maybe_inject_fault(self.config, epoch, session.rank, session.world)

        stats = train_one_epoch(
            self.model, self.optimizer, self.scheduler, self.batches.epoch(epoch, epoch_seed),
            device=session.device, first_step=(epoch - 1) * self.steps,
            total_steps=self.steps * cfg.optim.epochs, max_steps=self.steps, on_step=on_step)
        train_seconds, images, n_steps = stats.pop("seconds"), stats.pop("images"), stats.pop("steps")
        stats["images_per_step"] = images / max(1.0, n_steps)  # this worker's batch; its mean x world = global
        stats = _mean_over_workers(stats, session.device)
        # The global batch as the workers took it (not as configured): the same in every epoch of an
        # elastic run, whatever its world size (optim.batch_size / world per worker).
        stats["global_batch"] = round(stats.pop("images_per_step") * session.world)
        if not math.isfinite(stats.get("loss", 0.0)):  # diverged: every rank sees the same mean loss
            session.report({"epoch": epoch, "loss": stats["loss"], "diverged": 1.0}, None)
            return False
        metrics = {"epoch": epoch, **stats, "lr": self.scheduler.get_last_lr()[0],
                   "views_per_second": 2 * images * session.world / max(train_seconds, 1e-9),
                   "train_seconds": train_seconds, "steps": n_steps, "torch_threads": torch.get_num_threads(),
                   "resumed_from_epoch": self.start_epoch,  # the checkpoint this worker group started from
                   "world_size": session.world}  # the workers this epoch ran on (elastic runs: it varies)
        if hasattr(self.module, "momentum"):
            metrics["momentum"] = float(self.module.momentum)
        if self.probe is not None:
            last = epoch == cfg.optim.epochs
            metrics.update(self.probe(representation_encoder(self.module), linear=cfg.eval.linear_every_epoch or last))
            if self.untrained is not None:
                metrics["knn_top1_untrained"] = float(self.untrained)
        metrics["epoch_seconds"] = time.perf_counter() - t0
        metrics["ended_at"] = time.time()  # unix time: what a restart lost (orchestrator.elastic)
        mark("epoch_end", run=cfg.run.name, rank=session.rank, epoch=epoch)
        self._report(epoch, metrics)
        return True

    def _report(self, epoch: int, metrics: dict[str, Any]) -> None:
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        report: dict[str, Any] = dict(metrics)
        if epoch == self.start_epoch + 1 and self.history:
            # The epochs before this checkpoint, for the MLflow writer to log any it missed (the
            # command was killed between the checkpoint and the writer's log).
            report["backfill"] = json.dumps(self.history)
        self.history.append(finite)
        if self.session.rank != 0:
            self.session.report(report, None)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(Path(d) / STATE_FILE, module=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
                       epoch=epoch, metrics=finite, seed=self.cfg.run.seed, history=self.history)
            self.session.report(report, d)

    def report_again(self) -> None:
        """The checkpoint is of the last epoch (the process died after it, before its trial ended):
        report it once more, with its checkpoint and every epoch's metrics for the MLflow writer."""
        report = {**self.metrics, "epoch": int(self.metrics["epoch"]), "backfill": json.dumps(self.history)}
        if self.session.rank != 0:
            self.session.report(report, None)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(self.state, Path(d) / STATE_FILE)
            self.session.report(report, d)


def _restore(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(Path(d) / STATE_FILE)


def _mean_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _maybe_inject_fault(config: dict[str, Any], epoch: int, rank: int, world: int) -> None:
    """Test hook: SELFSUP_FAULT_KILL_AT_EPOCH=N (read by the driver) kills the last worker once, in epoch N."""
    kill_at = config.get("_fault_kill_at_epoch")
    if kill_at is None or epoch != int(kill_at) or rank != world - 1:
        return
    marker = storage.join(config["_run_dir"], FAULT_MARKER)  # the run folder: local or a URI
    if storage.exists(marker):
        return  # fires once per run, across restarts
    # Die only once the controller has registered the previous epoch's checkpoint: Ray Train V2
    # collects reports when it polls the workers (every 2 s), and a worker that dies before the
    # poll takes its group's last report with it (the restart then resumes from the one before).
    snapshot = storage.join(config["_run_dir"], CHECKPOINT_SNAPSHOT)
    deadline = time.monotonic() + 60
    while epoch > 1 and time.monotonic() < deadline:
        try:
            latest = json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result") or {}
            if int(latest.get("metrics", {}).get("epoch", 0)) >= epoch - 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    storage.write_text(marker, f"worker rank {rank} killed in epoch {epoch}\n")  # only this rank writes it
    os._exit(1)
