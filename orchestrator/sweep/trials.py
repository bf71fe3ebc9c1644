"""One trial: its config, the resources it asks for, and the two kinds of trial function.

- In-process (`run_trial_in_process`): a trial of one worker runs `epoch_loop.run_epochs` in the
  Tune trial's own process, reporting through `ray.tune.report` with a checkpoint each epoch and
  restoring from `ray.tune.get_checkpoint()`; Tune's `FailureConfig` restarts a failed trial from
  its last checkpoint. No Train controller or worker processes: see `benchmarks/sweep_overhead.py`.
- Train run (`run_train_trial`): a trial of several workers runs `pretrain.run_trial`, a Ray
  Train `TorchTrainer`, whose reports reach Tune through `TuneReportCallback`.

`sweep.trial_kind` picks one (`auto`: in-process when every trial has one worker). Either way the
sweep driver made the trial's MLflow run before the trial started and closes it after it ended.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.cluster import cpus_per_worker
from orchestrator.config import Config, apply_overrides
from orchestrator.data import matches, put_decoded, resolve_loader, train_dataset, train_rows
from orchestrator.epoch_loop import TuneTrialSession, run_epochs, scored_for_tune
from orchestrator.pretrain import SweepTrial, run_trial
from orchestrator.ray_compat import placement_group_recorder
from orchestrator.run_folders import read_json
from orchestrator.sweep.records import driver_run_id, placement_group_dir, train_record_file
from orchestrator.sweep.space import trial_defaults, trial_worker_counts
from orchestrator.sweep.spec import TRIAL_PREFIX, Sweep
from orchestrator.timeline import mark, process_start_time

IN_PROCESS, TRAIN_RUN = "in_process", "train"


def resolved_trial_kind(s: Sweep) -> str:
    """`sweep.trial_kind`, with `auto` resolved: in-process when no trial needs more than one worker."""
    if s.sweep.trial_kind != "auto":
        return s.sweep.trial_kind
    return IN_PROCESS if max(trial_worker_counts(s.sweep, s.base.scaling.num_workers)) == 1 else TRAIN_RUN


def trial_resources(s: Sweep, kind: str) -> dict[str, float]:
    """What Tune reserves for a trial's own process. A Train-run trial's process only drives its Train
    run (`sweep.cpus_per_trial`; its workers ask for theirs, `scaling.*`); an in-process trial is
    the worker itself, so it holds the worker's CPUs (and GPU)."""
    if kind == TRAIN_RUN:
        return {"cpu": s.sweep.cpus_per_trial}
    resources = {"cpu": max(s.sweep.cpus_per_trial, cpus_per_worker(s.base))}
    if s.base.scaling.use_gpu:
        resources["gpu"] = s.base.scaling.gpus_per_worker
    return resources


def trial_config(base: dict[str, Any], overrides: dict[str, Any], trial_id: str, trials_dir: str) -> Config:
    """The pretrain config of one trial: the sweep's base (`Config.to_dict()`, paths absolute), the
    method's defaults, the trial's swept values; a Train run goes to `trials_dir/trial-<id>`."""
    over = {**trial_defaults(str(overrides.get("method.name", base["method"]["name"]))), **overrides}
    cfg = apply_overrides(Config.from_dict(base), over, source="sweep trial")
    cfg.run.name = f"{TRIAL_PREFIX}{trial_id}"
    cfg.run.storage_path = trials_dir
    cfg.tracking.register = False  # the driver registers the best trial only
    cfg.data.source = None  # the driver made sure the data is there
    return cfg


def run_trial_in_process(config: dict[str, Any], *, base: dict[str, Any], trials_dir: str, metric: str,
                         data: Any = None) -> None:
    """The Tune function trainable of a one-worker trial: the epoch loop, here.

    Args:
        config: Tune's trial config; `config["overrides"]` = {"section.field": value}.
        base: the sweep's base config (`Config.to_dict()`, paths absolute).
        trials_dir: the sweep's `trials` folder (the trial's config names its run after it).
        metric: the sweep metric (0 on a diverged epoch, `epoch_loop.scored_for_tune`).
        data: the sweep's decoded data in the object store (`orchestrator.data.DecodedData`), made
            once by the driver; a trial whose data fields differ decodes its own.
    """
    trial_id = tune.get_context().get_trial_id()
    mark("trial_start", run=f"{TRIAL_PREFIX}{trial_id}", process_start=process_start_time())
    cfg = trial_config(base, dict(config["overrides"]), trial_id, trials_dir)
    decoded = None
    if resolve_loader(cfg) == "memory":
        decoded = data if matches(data, cfg) else put_decoded(cfg)
    loop_config = {**cfg.to_dict(), "_train_rows": decoded.train_rows if decoded is not None else train_rows(cfg),
                   "_data": decoded.for_worker() if decoded is not None else None,
                   "_label_metrics": True}  # a sweep ranks trials by a label metric: labels were checked
    dataset = train_dataset(cfg) if decoded is None else None
    run_epochs(loop_config, TuneTrialSession(cfg, metric, dataset))


def run_train_trial(config: dict[str, Any], *, base: dict[str, Any], trials_dir: str, parent_run_id: str,
                    metric: str, data: Any = None) -> None:
    """The Tune function trainable of a multi-worker trial: one Ray Train run (`pretrain.run_trial`).

    Arguments as `run_trial_in_process`, plus `parent_run_id`: the sweep's MLflow run, under which a
    trial without a driver-made run (the driver's callback not installed) makes its own.
    """
    trial_id = tune.get_context().get_trial_id()
    mark("trial_start", run=f"{TRIAL_PREFIX}{trial_id}", process_start=process_start_time())
    cfg = trial_config(base, dict(config["overrides"]), trial_id, trials_dir)
    record = read_json(train_record_file(trials_dir, trial_id))
    if record is not None and record.get("status") in ("finished", "diverged"):
        # The Train run ended but the driver died before Tune saved that: report its end, don't rerun.
        done = {"epoch": cfg.optim.epochs, metric: float(record.get(metric) or 0.0),
                "diverged": float(record.get("status") == "diverged")}
        tune.report(done)
        return
    run_id = driver_run_id(trials_dir, trial_id)
    callbacks = [TrialReportCallback(metric)]
    recorder = placement_group_recorder(placement_group_dir(trials_dir, trial_id))
    if recorder is not None:
        callbacks.append(recorder)
    run_trial(cfg, SweepTrial(parent_run_id=parent_run_id, mlflow_run_id=run_id, data=data),
              resume=record is not None, callbacks=callbacks)


class TrialReportCallback(TuneReportCallback):
    """Tune's `TuneReportCallback`, with rank 0's report scored as an in-process trial's is
    (`epoch_loop.scored_for_tune`)."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            metrics = [scored_for_tune(metrics[0], self.metric), *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)
