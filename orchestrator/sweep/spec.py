"""The sweep file's `sweep:` section (`SweepConfig`) and a loaded sweep (`Sweep`): the names every
other sweep module shares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


from orchestrator.config import Config, ConfigError


SWEEP_RECORD = "selfsup-sweep.json"
SEARCHERS = ("grid", "random", "bayes")
SCHEDULERS = ("asha", "fifo")
METRICS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")  # accuracies: higher is better
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
TRIAL_PREFIX = "trial-"
TRIAL_KINDS = ("auto", "in_process", "train")  # see orchestrator.sweep.trials
STATUS_ORDER = ("finished", "stopped", "diverged", "error", "not run")


@dataclass
class SweepConfig:
    """The `sweep:` section. See the module docstring for `methods` and `space`."""

    name: str | None = None  # None = "<config file stem>-<n>", the next free n (like pretrain)
    storage_path: str = "runs/sweeps"  # Tune experiment folder: STORAGE_PATH/NAME (a local folder or a URI)
    searcher: str = "grid"
    num_samples: int = 1  # grid: repeats of the whole grid; random/bayes: number of trials
    seed: int = 0  # random/bayes sampling
    metric: str = "knn_top1"  # ASHA, the searcher, the best trial and the champion compare this
    scheduler: str = "asha"
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: float = 2.0  # ASHA: keep the top 1/reduction_factor at each rung
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 0.25  # a Train-run trial's own process (its workers ask for theirs); in-process: at least this
    trial_kind: str = "auto"  # in_process: the trial's own process trains (1 worker); train: a Ray Train run
    # Tune's actor reuse (experimental in Ray) for in-process trials: an ended trial's process runs
    # the next trial, skipping a process start and its imports. Train-run trials never reuse
    # theirs (a stopped one cannot be reset: docs/design.md, "Sweeps").
    reuse_actors: bool = True
    time_budget_s: float | None = None  # stop the whole sweep after this long (running trials: "stopped")
    register: bool = True  # register the best trial's encoder and maybe move `champion`
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sweep:
    """A loaded sweep: the base pretrain config every trial starts from, and the sweep section."""

    base: Config
    sweep: SweepConfig
    source: str  # the sweep file (for messages)
    stem: str  # automatic sweep names: "<stem>-<n>"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # the base's `--set`s (for messages)


def reject(field_name: str, value: Any, allowed: str) -> None:
    """Raise the one-line `ConfigError` of a bad sweep field: its name, its value, what is allowed."""
    raise ConfigError(f"{field_name} = {value!r}: {allowed}")
