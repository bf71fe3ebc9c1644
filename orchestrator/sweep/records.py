"""Where a sweep keeps its state: its folder and record, and each trial's MLflow run id.

A sweep lives in `sweep.storage_path/<name>` (a local folder or a URI; `pipelines.storage`): Tune's
experiment state and the trials' Tune folders (with the checkpoints of one-process trials), the sweep
record `selfsup-sweep.json`, `trials/trial-<id>` for the Train runs of Train-run trials, and
`trials/mlflow-runs/trial-<id>.json`, the MLflow run the driver made for each trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.config import Config, storage_location
from orchestrator.reservation import Lease
from orchestrator.run_folders import RUN_RECORD, read_json, reserve_dir, write_json
from orchestrator.sweep.spec import SWEEP_RECORD, TRIAL_PREFIX, Sweep
from pipelines import storage


def resolve_sweep_dir(s: Sweep, *, resume: bool) -> tuple[str, Lease]:
    """STORAGE_PATH/NAME (a local folder or a URI); NAME = sweep.name or the next free `<stem>-<n>`
    (resume: the newest), reserved for this command (`run_folders.reserve_dir`): (the folder, its lease)."""
    root = storage_location(s.sweep.storage_path)
    return reserve_dir(root, name=s.sweep.name, stem=s.stem, record=SWEEP_RECORD, resume=resume, kind="sweep")


def absolute_base(s: Sweep) -> Config:
    """The base config with every relative path made absolute: Tune runs trials in their own folders."""
    cfg = Config.from_dict(s.base.to_dict())
    cfg.data.path = storage.absolute(cfg.data.path)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    cfg.tracking.uri = uri
    return cfg


def trials_dir_of(sweep_dir: str) -> str:
    return storage.join(sweep_dir, "trials")


def train_record_file(trials_dir: str, trial_id: str) -> str:
    """The run record of a Train-run trial (written by `pretrain.run_trial` as the run starts)."""
    return storage.join(trials_dir, f"{TRIAL_PREFIX}{trial_id}", RUN_RECORD)


def run_id_file(trials_dir: str, trial_id: str) -> str:
    """Where the driver leaves the MLflow run id it made for a trial (`driver.SweepDriverCallback`)."""
    return storage.join(trials_dir, "mlflow-runs", f"{TRIAL_PREFIX}{trial_id}.json")


def driver_run_id(trials_dir: str, trial_id: str) -> str | None:
    """The MLflow run id the driver made for this trial, or None."""
    rec = read_json(run_id_file(trials_dir, trial_id))
    return str(rec["mlflow_run_id"]) if rec is not None else None


def save_run_id(trials_dir: str, trial_id: str, run_id: str) -> None:
    write_json(run_id_file(trials_dir, trial_id), {"mlflow_run_id": run_id})


def placement_group_dir(trials_dir: str, trial_id: str) -> str:
    """Where a Train-run trial records its workers' placement groups (`ray_compat`)."""
    return storage.join(trials_dir, "placement-groups", f"{TRIAL_PREFIX}{trial_id}")


def write_sweep_record(sweep_dir: str, record: dict[str, Any]) -> None:
    write_json(storage.join(sweep_dir, SWEEP_RECORD), record)
