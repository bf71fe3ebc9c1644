"""Ray Tune sweeps across methods and hyper-parameters: `selfsup sweep --config FILE [--resume]`.

A sweep file is a pretrain config (same sections, same defaults; optionally `base: FILE` names a
pretrain YAML, relative to the sweep file, whose values the sections here override) plus a
`sweep:` section (`SweepConfig`):

    sweep:
      searcher: grid              # grid | random | bayes (Optuna TPE)
      methods:                    # the method dimension; each method lists only the fields it takes
        simclr: {method.temperature: [0.1, 0.2, 0.5]}
        moco:   {method.temperature: [0.2], method.momentum: [0.99, 0.999]}
        byol:   {method.momentum: [0.99, 0.996, 0.999]}
      space:                      # dimensions shared by every method
        optim.batch_size: [256, 512]
        optim.lr: {loguniform: [1.0e-4, 1.0e-2]}   # random/bayes only; grid takes lists
      scheduler: asha             # asha | fifo; ASHA stops trials early on `metric` per epoch
      max_concurrent_trials: 2

Conditional spaces: a method's trials are the product of the shared dimensions and of its own,
so a dimension that a method ignores does not multiply that method's trials (grid: SimCLR 3 x 2,
MoCo 2 x 2, BYOL 3 x 2 = 16 trials, not 3 x 3 x 3 x 2). Grid: the explicit trial list goes to
`tune.grid_search`; random: one `tune.sample_from` draws the method, then that method's values;
bayes: Optuna's define-by-run API asks for the method, then for that method's parameters.

Each trial is a Tune function trainable that runs one `orchestrator.pretrain.run_pretrain` (a
Ray Train `TorchTrainer` with N workers) with `TuneReportCallback`, so every epoch's metrics
reach Tune (ASHA, searcher) and, through the pretrain MLflow callback, the trial's child run.

MLflow: the driver creates the experiment and the parent run before any trial starts, and each
trial's child run (nested under the parent) as Tune starts the trial, one after another in one
process, so concurrent trials never race on the store; the trial's Train controller logs its
epochs into it; the driver closes it as the trial ends (FINISHED, KILLED when ASHA stopped it,
FAILED when it diverged or failed), then writes the table and the plot and registers the best
encoder.

Resume: the Tune experiment lives in `sweep.storage_path/<name>` (a local folder or a URI such as
`s3://BUCKET/sweeps`, read and written through `pipelines.storage` and given to Tune as is), each
trial's Train run in its `trials/` folder there under a stable name (`trial-<trial id>`). `--resume` restores the Tune
experiment (`Tuner.restore`): finished trials are not run again; a trial that was running
continues its Train run from the last checkpoint and its MLflow run, so no epoch is logged twice.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import random
import re
import tempfile
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import (METHOD_NAMES, METHOD_ONLY, RUN_NAME, Config, ConfigError, _parse_value,
                                 apply_overrides, parse_overrides, read_yaml, storage_location, validate,
                                 where_set)
from orchestrator.errors import UserError
from pipelines import storage

SWEEP_RECORD = "selfsup-sweep.json"
SEARCHERS = ("grid", "random", "bayes")
SCHEDULERS = ("asha", "fifo")
METRICS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")  # accuracies: higher is better
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
TRIAL_PREFIX = "trial-"
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
    cpus_per_trial: float = 0.25  # the trial's driver process; its Train workers ask for their own
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


# --- loading ---------------------------------------------------------------------------------------

def load_sweep(path: str | None, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file: `base:` pretrain YAML, pretrain sections, `sweep:`; then `--set` overrides.

    `--set sweep.FIELD=V` sets a scalar sweep field; any other `--set` goes to the base pretrain
    config (every trial).

    Raises:
        ConfigError: unreadable file, unknown key, bad value, or a space that does not fit its
            searcher or methods (the message names the field and what is allowed).
    """
    if path is None:
        path = str(Path(__file__).resolve().parents[1] / "configs" / "sweep-demo.yaml")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    raw = _read_yaml(p)
    base_dict: dict[str, Any] = {}
    if raw.get("base") is not None:
        base_path = (p.parent / str(raw.pop("base"))).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: base = {base_path}: no such file")
        base_dict = _read_yaml(base_path)
        base_dict.pop("sweep", None)
    raw.pop("base", None)
    sweep_raw = raw.pop("sweep", None) or {}
    merged = {s: {**(base_dict.get(s) or {}), **(raw.get(s) or {})} for s in {*base_dict, *raw}}
    base = Config.from_dict(merged, source=str(path))
    sweep = parse_sweep_section(sweep_raw, source=str(path))
    base_over, sweep_over = {}, {}
    for key, value in parse_overrides(overrides or []).items():
        (sweep_over if key.startswith("sweep.") else base_over)[key] = value
    base = apply_overrides(base, base_over)
    for key, value in sweep_over.items():
        _set_sweep_field(sweep, key[len("sweep."):], value, f"--set {key}={value}")
    s = Sweep(base=base, sweep=sweep, source=str(path), stem=p.stem, overrides=base_over)
    try:
        check_sweep(s)
    except ConfigError as e:  # told from where the field was set, as pretrain's messages are
        raise ConfigError(where_set(str(e), path=str(path), raw={**merged, "sweep": sweep_raw},
                                    overrides={**base_over, **sweep_over})) from None
    return s


def _read_yaml(p: Path) -> dict[str, Any]:
    raw = read_yaml(p) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def parse_sweep_section(raw: Any, *, source: str) -> SweepConfig:
    """The `sweep:` mapping as a `SweepConfig` (types checked, unknown keys rejected)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section 'sweep' must be a mapping, got {raw!r}")
    sweep = SweepConfig()
    for key, value in raw.items():
        _set_sweep_field(sweep, str(key), value, f"{source}: sweep.{key}")
    return sweep


def _set_sweep_field(sweep: SweepConfig, key: str, value: Any, where: str) -> None:
    names = [f.name for f in dataclasses.fields(SweepConfig)]
    if key not in names:
        raise ConfigError(f"{where}: unknown field 'sweep.{key}'; sweep has: {', '.join(names)}")
    if key in ("methods", "space"):
        if not isinstance(value, dict) or (key == "methods" and not all(
                isinstance(v, dict) or v is None for v in value.values())):
            raise ConfigError(f"{where}: expected a mapping"
                              + (" of method -> {field: values}" if key == "methods" else
                                 " of field -> values"))
        if key == "methods":
            value = {str(m): dict(v or {}) for m, v in value.items()}
        setattr(sweep, key, dict(value))
        return
    setattr(sweep, key, _parse_value(typing.get_type_hints(SweepConfig)[key], value, where))


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name} = {value!r}: {allowed}")


def check_sweep(s: Sweep) -> None:
    """Reject a sweep that cannot run, before Ray starts (one message naming the field).

    Every grid point (or, for random/bayes, every categorical value and every range end) is
    applied to the base config and validated like a pretrain config.
    """
    sw = s.sweep
    if sw.searcher not in SEARCHERS:
        _fail("sweep.searcher", sw.searcher, f"allowed: {', '.join(SEARCHERS)}")
    if sw.scheduler not in SCHEDULERS:
        _fail("sweep.scheduler", sw.scheduler, f"allowed: {', '.join(SCHEDULERS)}")
    if sw.metric not in METRICS:
        _fail("sweep.metric", sw.metric, f"allowed: {', '.join(METRICS)}")
    if sw.metric.startswith("linear_"):
        if s.base.eval.linear_epochs <= 0:
            _fail("sweep.metric", sw.metric, "needs the linear probe: set eval.linear_epochs > 0")
        # The probe runs after the last epoch only; ASHA compares trials at every rung, so a
        # sweep ranking by it probes after every epoch (~1 s each on the demo).
        if sw.scheduler == "asha":
            s.base.eval.linear_every_epoch = True
    for name in ("num_samples", "max_concurrent_trials", "grace_period"):
        if getattr(sw, name) < 1:
            _fail(f"sweep.{name}", getattr(sw, name), "must be >= 1")
    if sw.reduction_factor <= 1:
        _fail("sweep.reduction_factor", sw.reduction_factor, "must be > 1")
    if sw.cpus_per_trial <= 0:
        _fail("sweep.cpus_per_trial", sw.cpus_per_trial, "must be > 0")
    if sw.time_budget_s is not None and sw.time_budget_s <= 0:
        _fail("sweep.time_budget_s", sw.time_budget_s, "must be > 0 (or null)")
    if sw.name is not None and not RUN_NAME.match(sw.name):
        _fail("sweep.name", sw.name, "use letters, digits, '.', '_' and '-'")
    if sw.searcher == "bayes":
        try:
            import optuna  # noqa: F401
        except ImportError:
            _fail("sweep.searcher", "bayes", "needs the optuna package (pip install optuna)")
    if not sw.methods:
        sw.methods = {s.base.method.name: {}}
    for m in sw.methods:
        if m not in METHOD_NAMES:
            _fail("sweep.methods", m, f"allowed methods: {', '.join(METHOD_NAMES)}")
    for key in sw.space:
        if key == "method.name" or key in {f"method.{f}" for f in METHOD_ONLY}:
            _fail(f"sweep.space.{key}", sw.space[key],
                  "method-specific: list it under sweep.methods.<method> for the methods that take it")
    for m, dims in sw.methods.items():
        if "method.name" in dims:
            _fail(f"sweep.methods.{m}.method.name", dims["method.name"], "the method is the key above it")
    for m in sw.methods:
        dims = _method_dims(sw, m)
        for key, spec in dims.items():
            where = f"sweep.methods.{m}.{key}" if key in sw.methods[m] else f"sweep.space.{key}"
            _check_dimension(where, spec, sw.searcher)
        for point in _check_points(dims):
            over = {**trial_defaults(m), **point}
            try:
                cfg = apply_overrides(s.base, over, source=f"{s.source}: sweep {m}")
                validate(cfg, check_data=False, check_gpu=False)
            except ConfigError as e:
                # A base field set by --set (and not swept) is blamed on the --set, else on the file.
                msg = where_set(str(e), path=None, raw=None,
                                overrides={k: v for k, v in s.overrides.items() if k not in point})
                if msg != str(e):
                    raise ConfigError(f"{msg} (in sweep trial {_describe(over)})") from None
                raise ConfigError(f"{s.source}: sweep trial {_describe(over)}: {e}") from None
    if n_grid_trials(sw) == 0:
        _fail("sweep.methods", sw.methods, "the sweep has no trials")


def _method_dims(sw: SweepConfig, method: str) -> dict[str, Any]:
    """The dimensions of one method: the shared ones, then its own (which win)."""
    return {**sw.space, **sw.methods.get(method, {})}


def _finite(values: Any) -> bool:
    """No NaN or infinity among `values` (YAML `.nan`/`.inf`); other types are checked by field type."""
    return all(math.isfinite(v) for v in values if isinstance(v, float))


def _check_dimension(where: str, spec: Any, searcher: str) -> None:
    if isinstance(spec, list):
        if not spec:
            _fail(where, spec, "an empty list has no values to try")
        if not _finite(spec):
            _fail(where, spec, "values must be finite numbers (no .nan or .inf)")
        return
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            _fail(where, spec, f"a distribution is one of {{{': [...]}, {'.join(DISTRIBUTIONS)}: [...]}}")
        kind, args = next(iter(spec.items()))
        if kind != "choice" and searcher == "grid":
            _fail(where, spec, "the grid searcher takes lists of values; use searcher random or bayes "
                  "for ranges")
        if kind == "choice":
            if not isinstance(args, list) or not args:
                _fail(where, spec, "choice takes a non-empty list")
            if not _finite(args):
                _fail(where, spec, "values must be finite numbers (no .nan or .inf)")
        elif not (isinstance(args, list) and len(args) == 2
                  and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
                  and args[0] < args[1]):
            _fail(where, spec, f"{kind} takes [low, high]: finite numbers with low < high")
        elif kind == "loguniform" and args[0] <= 0:
            _fail(where, spec, "loguniform needs low > 0")
        return
    if spec is None:
        _fail(where, spec, "null cannot be swept; leave the field out")


def _values(spec: Any) -> list[Any]:
    """The grid values of a dimension (a scalar is one value)."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        return list(next(iter(spec.values())))  # choice: the values; ranges: both ends (validation)
    return [spec]


def _check_points(dims: dict[str, Any]) -> list[dict[str, Any]]:
    """Enough points to validate every value: each value of each dimension, the others at their first."""
    first = {k: _values(v)[0] for k, v in dims.items()}
    points = [first]
    for k, spec in dims.items():
        for v in _values(spec)[1:]:
            points.append({**first, k: v})
    return points


def trial_defaults(method: str) -> dict[str, Any]:
    """`method.name` plus null for the method-specific fields this method does not take."""
    return {"method.name": method,
            **{f"method.{f}": None for f, allowed in METHOD_ONLY.items() if method not in allowed}}


def grid_trials(sw: SweepConfig) -> list[dict[str, Any]]:
    """The grid: per method, the product of its dimensions (never of other methods' dimensions)."""
    trials = []
    for method in sw.methods:
        dims = _method_dims(sw, method)
        keys = list(dims)
        for values in itertools.product(*(_values(dims[k]) for k in keys)):
            trials.append({"method.name": method, **dict(zip(keys, values))})
    return trials


def n_grid_trials(sw: SweepConfig) -> int:
    return len(grid_trials(sw)) * sw.num_samples if sw.searcher == "grid" else sw.num_samples


def _describe(over: dict[str, Any]) -> str:
    """"simclr: temperature=0.1, batch_size=256" for a trial's overrides."""
    rest = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in over.items() if v is not None and k != "method.name")
    return f"{over.get('method.name', '?')}: {rest}" if rest else str(over.get("method.name", "?"))


# --- the Tune search space ---------------------------------------------------------------------------

def _sample(spec: Any, rng: random.Random) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    if isinstance(spec, dict):
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            return rng.choice(args)
        if kind == "uniform":
            return rng.uniform(*args)
        if kind == "loguniform":
            return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
        return rng.randint(int(args[0]), int(args[1]) - 1)  # randint: high exclusive, as in Tune
    return spec


def random_trial(sw: SweepConfig, rng: random.Random) -> dict[str, Any]:
    """One random trial: a method (uniformly), then a value of each of that method's dimensions."""
    method = rng.choice(sorted(sw.methods))
    dims = _method_dims(sw, method)
    return {"method.name": method, **{k: _sample(v, rng) for k, v in dims.items()}}


class OptunaSpace:
    """A define-by-run space for OptunaSearch: the method first, then only its own parameters.

    Parameter names carry the method (`simclr:method.temperature`): Optuna keeps one distribution
    per name, and two methods may list different values for the same field. A class, not a
    closure: Tune pickles the searcher (with its space) into the experiment state for --resume.
    """

    def __init__(self, sw: SweepConfig) -> None:
        self.methods = {m: _method_dims(sw, m) for m in sorted(sw.methods)}

    def __call__(self, trial: Any) -> dict[str, Any]:
        method = trial.suggest_categorical("method", list(self.methods))
        over: dict[str, Any] = {"method.name": method}
        for key, spec in self.methods[method].items():
            name = f"{method}:{key}"
            if isinstance(spec, list) or (isinstance(spec, dict) and "choice" in spec):
                choices = spec if isinstance(spec, list) else spec["choice"]
                over[key] = trial.suggest_categorical(name, choices)
            elif isinstance(spec, dict):
                kind, (lo, hi) = next(iter(spec.items()))
                if kind == "randint":
                    over[key] = trial.suggest_int(name, int(lo), int(hi) - 1)
                else:
                    over[key] = trial.suggest_float(name, lo, hi, log=kind == "loguniform")
            else:
                over[key] = spec
        return {"overrides": over}


def optuna_space(sw: SweepConfig) -> OptunaSpace:
    """The conditional define-by-run space of a sweep (see `OptunaSpace`)."""
    return OptunaSpace(sw)


def trial_resources(sw: SweepConfig) -> dict[str, float]:
    """What Tune reserves for each trial's own process (`sweep.cpus_per_trial`); the trial's Train
    workers ask for theirs (`scaling.*`) when it starts them."""
    return {"cpu": sw.cpus_per_trial}


def build_search(sw: SweepConfig) -> tuple[dict[str, Any], Any, int]:
    """(param_space, search_alg or None, num_samples) for the Tuner."""
    from ray import tune

    if sw.searcher == "grid":
        return {"overrides": tune.grid_search(grid_trials(sw))}, None, sw.num_samples
    if sw.searcher == "random":
        rng = random.Random(sw.seed)
        return {"overrides": tune.sample_from(lambda _spec: random_trial(sw, rng))}, None, sw.num_samples
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    searcher = OptunaSearch(space=optuna_space(sw), metric=sw.metric, mode="max",
                            sampler=optuna.samplers.TPESampler(seed=sw.seed))
    return {}, ConcurrencyLimiter(searcher, max_concurrent=sw.max_concurrent_trials), sw.num_samples


def build_scheduler(sw: SweepConfig, epochs: int) -> Any:
    """ASHA (Li et al., 2020, "A System for Massively Parallel Hyperparameter Tuning") on the metric
    per epoch, or FIFO (every trial runs all its epochs)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sw.scheduler == "fifo":
        return FIFOScheduler()
    # time_attr "epoch", not Tune's training_iteration: a trial restarted by --resume continues its
    # Train run at epoch k+1, while Tune would count its iterations from 1 again.
    # stop_last_trials=False: a trial that reaches max_t ends by itself (run_pretrain closes its
    # run); Tune stopping it there would kill it while it closes its MLflow run and run record.
    return ASHAScheduler(time_attr="epoch", metric=sw.metric, mode="max", max_t=epochs,
                         grace_period=min(sw.grace_period, epochs), reduction_factor=sw.reduction_factor,
                         stop_last_trials=False)


# --- one trial ------------------------------------------------------------------------------------

def _report_callback(metric: str) -> Any:
    """Tune's `TuneReportCallback`, plus `diverged` on every report and `metric` = 0 on a diverged one.

    A diverged epoch reports no kNN accuracy; Tune requires the scheduler's metric in every result,
    and 0 (the worst accuracy) is what a diverged encoder is worth to ASHA and to the searcher.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReportCallback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                m = dict(metrics[0])
                m["diverged"] = float(m.get("diverged", 0.0))
                if m["diverged"] or not isinstance(m.get(metric), (int, float)) or not math.isfinite(m[metric]):
                    m[metric] = 0.0
                metrics = [m, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    return TrialReportCallback()


def _placement_group_recorder(path: str) -> Any:
    """A Train worker-group callback that appends each worker group's placement group id to `path`.

    Workaround: Train V2 creates the workers' placement group from its controller, with the job's
    lifetime; its `PlacementGroupCleaner` removes it when the controller dies only if the Ray state
    API answers, which needs the dashboard (not started here) and a single Ray instance per machine.
    When Tune stops a trial (ASHA) the controller dies with the trial and the placement group
    would keep its CPUs until the sweep ends, starving later trials. The driver removes the
    groups recorded here when the trial ends (`_release_placement_groups`). `path` is a folder (local
    or in an object store, which cannot append): one empty file per group, named by its id.
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group: Any) -> None:
            try:
                pg = worker_group._worker_group_state.placement_group_handle.placement_group
                storage.write_text(storage.join(path, pg.id.hex()), "")
            except Exception:  # internal API moved: then only the cleanup is lost
                pass

    return PlacementGroupRecorder()


def _pg_dir(trials_dir: str, trial_id: str) -> str:
    return storage.join(trials_dir, "placement-groups", f"{TRIAL_PREFIX}{trial_id}")


def _release_placement_groups(path: str) -> int:
    """Remove the still-existing placement groups recorded in the folder `path`; returns how many."""
    recorded = [n for n in storage.list_names(path) if re.fullmatch(r"[0-9a-f]+", n)]
    if not recorded:
        return 0
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    table = placement_group_table()
    for pg_hex in set(recorded):
        if table.get(pg_hex, {}).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            try:
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))
                removed += 1
            except Exception:
                pass
    return removed


def trial_config(base: dict[str, Any], overrides: dict[str, Any], trial_id: str, trials_dir: str) -> Config:
    """The pretrain config of one trial: the sweep's base (`Config.to_dict()`, paths absolute), the
    method's defaults, the trial's swept values; its Train run is `trials_dir/trial-<id>`."""
    over = {**trial_defaults(str(overrides.get("method.name", base["method"]["name"]))), **overrides}
    cfg = apply_overrides(Config.from_dict(base), over, source="sweep trial")
    cfg.run.name = f"{TRIAL_PREFIX}{trial_id}"
    cfg.run.storage_path = trials_dir
    cfg.tracking.register = False  # the driver registers the best trial only
    cfg.data.source = None  # the driver made sure the data is there
    return cfg


def _record_file(trials_dir: str, trial_id: str) -> str:
    """The run record of a trial's Train run (written by `run_pretrain` as the run starts)."""
    from orchestrator.pretrain import RUN_RECORD

    return storage.join(trials_dir, f"{TRIAL_PREFIX}{trial_id}", RUN_RECORD)


def _read_json(location: str) -> dict[str, Any] | None:
    """A JSON record (local or in an object store), or None when it is not there."""
    return json.loads(storage.read_text(location)) if storage.is_file(location) else None


def _run_id_file(trials_dir: str, trial_id: str) -> str:
    """Where the driver leaves the MLflow run id it made for a trial (see `_driver_callback`)."""
    return storage.join(trials_dir, "mlflow-runs", f"{TRIAL_PREFIX}{trial_id}.json")


def _driver_run_id(trials_dir: str, trial_id: str) -> str | None:
    """The MLflow run id the driver made for this trial, or None."""
    rec = _read_json(_run_id_file(trials_dir, trial_id))
    return str(rec["mlflow_run_id"]) if rec is not None else None


def run_trial(config: dict[str, Any], *, base: dict[str, Any], trials_dir: str, parent_run_id: str,
              metric: str, data: Any = None) -> None:
    """The Tune function trainable: one pretraining run (a Ray Train `TorchTrainer`) per trial.

    Args:
        config: Tune's trial config; `config["overrides"]` = {"section.field": value}.
        base: the sweep's base config (`Config.to_dict()`, paths absolute).
        trials_dir: where the trials' Train runs live (`trial-<trial id>` each).
        parent_run_id: the sweep's MLflow run; this trial's run is nested under it.
        metric: the sweep metric (filled with 0 on a diverged report, see `_report_callback`).
        data: the sweep's decoded data in the object store (`orchestrator.data.DecodedData`), made
            once by the driver; a trial whose data fields differ decodes its own.

    The trial's MLflow run is the one the driver made as the trial started (it closes it too);
    without it (the driver's callback not installed) the trial makes and closes its own.
    """
    from ray import tune

    from orchestrator.pretrain import run_pretrain
    from orchestrator.timeline import mark, process_start_time

    trial_id = tune.get_context().get_trial_id()
    mark("trial_start", run=f"{TRIAL_PREFIX}{trial_id}", process_start=process_start_time())
    cfg = trial_config(base, dict(config["overrides"]), trial_id, trials_dir)
    record = _read_json(_record_file(trials_dir, trial_id))
    if record is not None and record.get("status") in ("finished", "diverged"):
        # The Train run ended but the driver died before Tune saved that: report its end, don't rerun.
        done = {"epoch": cfg.optim.epochs, metric: float(record.get(metric) or 0.0),
                "diverged": float(record.get("status") == "diverged")}
        tune.report(done)
        return
    run_id = _driver_run_id(trials_dir, trial_id)
    callbacks = [_report_callback(metric), _placement_group_recorder(_pg_dir(trials_dir, trial_id))]
    run_pretrain(cfg, resume=record is not None, stem="trial", callbacks=callbacks,
                 mlflow_parent_run_id=parent_run_id, mlflow_run_id=run_id, close_run=run_id is None,
                 progress=False, data=data, curves=False)


# --- paths, records ---------------------------------------------------------------------------------

def _absolute(s: Sweep) -> Config:
    """The base config with every relative path made absolute: Tune runs trials in their own folders."""
    cfg = Config.from_dict(s.base.to_dict())
    cfg.data.path = storage.absolute(cfg.data.path)
    from orchestrator import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    cfg.tracking.uri = uri
    return cfg


def resolve_sweep_dir(s: Sweep, *, resume: bool) -> str:
    """STORAGE_PATH/NAME (a local folder or a URI); NAME = sweep.name or the next free `<stem>-<n>`
    (resume: the newest)."""
    from orchestrator.pretrain import numbered_dir

    root = storage_location(s.sweep.storage_path)
    return numbered_dir(root, name=s.sweep.name, stem=s.stem, record=SWEEP_RECORD, resume=resume, kind="sweep")


def _write_record(path: str, record: dict[str, Any]) -> None:
    storage.write_text(path, json.dumps(record, indent=2, default=str) + "\n")


# --- results -------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """What a sweep produced: the table (one row per trial), where it went, and what was registered."""

    name: str
    sweep_dir: str
    parent_run_id: str
    tracking_uri: str
    table: Any  # pandas.DataFrame
    best: dict[str, Any] | None = None
    model_uri: str | None = None
    champion: bool = False
    champion_note: str = ""  # why the champion stayed, when it did
    wall_seconds: float = 0.0
    markdown: str = ""
    metric: str = "knn_top1"
    timings: dict[str, float] = field(default_factory=dict)  # setup_s, tune_s, finish_s (driver)
    planned: int = 0  # trials the sweep asked for (a time budget can end it before all started)
    budget_ran_out: bool = False  # sweep.time_budget_s ended the sweep


def _swept_keys(sw: SweepConfig) -> list[str]:
    keys: list[str] = []
    for m in sw.methods:
        for k in _method_dims(sw, m):
            if k not in keys:
                keys.append(k)
    return keys


def _short(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else key


# A trial's status (the table's) -> its MLflow run's final status.
RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "not run": "KILLED", "diverged": "FAILED",
              "error": "FAILED"}


def _status(m: dict[str, Any], epochs: int, *, error: bool = False, started: bool = True) -> str:
    """A trial's status from its last result `m`; `started`: its Train run began (it wrote its run record)."""
    if error:
        return "error"
    if m.get("diverged"):
        return "diverged"
    if "epoch" not in m:  # started: Tune ended it (time budget) before its first epoch
        return "stopped" if started else "not run"
    return "finished" if int(m["epoch"]) >= epochs else "stopped"


def _trial_status(result: Any, epochs: int, started: bool) -> str:
    return _status(result.metrics or {}, epochs, error=result.error is not None, started=started)


def _epoch_seconds(client: Any, run_id: str | None) -> float:
    """The sum of a trial's epoch times (training + kNN eval), from its MLflow run (one per epoch)."""
    if not run_id:
        return 0.0
    by_step = {m.step: m.value for m in client.get_metric_history(run_id, "epoch_seconds")}
    return float(sum(by_step.values()))


def results_table(results: Any, sw: SweepConfig, epochs: int, trials_dir: str, client: Any) -> Any:
    """One row per trial: trial, method, swept values, epochs, metric, loss, status, train seconds."""
    import pandas as pd

    keys = _swept_keys(sw)
    rows = []
    for r in results:
        over = dict((r.config or {}).get("overrides") or {})
        m = r.metrics or {}
        trial_id = str(m.get("trial_id") or (Path(r.path).name if r.path else ""))
        rec = _read_json(_record_file(trials_dir, trial_id)) or {}
        train_s = _epoch_seconds(client, rec.get("mlflow_run_id"))
        status = _trial_status(r, epochs, started=bool(rec))
        value = m.get(sw.metric)
        row = {"trial": trial_id, "method": over.get("method.name", ""),
               **{_short(k): over.get(k) for k in keys},
               "epochs": int(m.get("epoch", 0)),
               sw.metric: (float(value) if status not in ("diverged", "error", "not run") and value is not None
                           else math.nan),
               "loss": float(m["loss"]) if isinstance(m.get("loss"), (int, float)) else math.nan,
               "status": status, "train_s": round(train_s, 2),
               "trial_s": round(float(m.get("time_total_s") or 0.0), 2),
               "mlflow_run_id": rec.get("mlflow_run_id", ""),
               "checkpoint_path": m.get("checkpoint_path") or ""}
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values([sw.metric, "trial"], ascending=[False, True], na_position="last")
    return df.reset_index(drop=True)


def markdown_table(df: Any, metric: str) -> str:
    """A GitHub markdown table of the visible columns (no `tabulate` dependency)."""
    cols = [c for c in df.columns if c not in ("mlflow_run_id", "checkpoint_path", "trial_s")]

    def cell(c: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if c in (metric, "loss") and isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(c, row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_png(df: Any, sw: SweepConfig, path: Path) -> None:
    """kNN top-1 by method and hyper-parameter: one panel per swept field, one colour per method.

    Diverged trials are drawn as crosses at 0; trials ASHA stopped as hollow markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _swept_keys(sw) or ["method.name"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(sorted(sw.methods))}
    for ax, key in zip(axes[0], keys):
        col = _short(key) if key != "method.name" else "method"
        for method, group in df.groupby("method"):
            for _, row in group.iterrows():
                x = row[col]
                if x is None or (isinstance(x, float) and math.isnan(x)):
                    continue
                y = row[sw.metric]
                c = colors.get(method, "gray")
                if row["status"] == "diverged":
                    ax.scatter([x], [0.0], marker="x", color=c)
                elif isinstance(y, float) and math.isnan(y):
                    continue
                elif row["status"] == "stopped":
                    ax.scatter([x], [y], facecolors="none", edgecolors=c)
                else:
                    ax.scatter([x], [y], color=c)
        if key == "optim.lr":
            ax.set_xscale("log")
        ax.set(xlabel=_short(key), ylabel=sw.metric, title=f"{sw.metric} by {_short(key)}")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in colors.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", color="gray", label="stopped (ASHA)"),
                plt.Line2D([], [], marker="x", ls="", color="gray", label="diverged")]
    axes[0][-1].legend(handles=handles, loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the driver -----------------------------------------------------------------------------------

def _driver_callback(trials_dir: str, metric: str, verbose: bool, *, base: dict[str, Any], uri: str,
                     parent_run_id: str, epochs: int) -> Any:
    """Tune callback in the driver: makes each trial's MLflow child run as the trial starts and
    closes it as the trial ends, frees an ended trial's Train placement group, prints one line per
    trial start and end.

    The driver makes the child runs, one after another in one process, so concurrent trials never
    race on the store (SQLite) and a trial process needs no MLflow until its Train controller logs
    the first epoch (~2.5 s of imports and store opening less per trial on 2 cores). Tune calls
    `on_trial_start` before it schedules the trial function, so the run id is there when it runs.
    """
    from ray.tune import Callback

    from orchestrator import tracking
    from orchestrator.pretrain import create_run, mark_diverged

    def release(trial: Any) -> None:
        _release_placement_groups(_pg_dir(trials_dir, trial.trial_id))

    class SweepDriverCallback(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            over = (trial.config or {}).get("overrides") or {}
            # A trial restarted by --resume keeps its run: the id file, or its Train run's record.
            if (_driver_run_id(trials_dir, trial.trial_id) is None
                    and not storage.is_file(_record_file(trials_dir, trial.trial_id))):
                cfg = trial_config(base, dict(over), trial.trial_id, str(trials_dir))
                run_id = create_run(cfg, uri=uri, parent_run_id=parent_run_id)
                _write_record(_run_id_file(trials_dir, trial.trial_id), {"mlflow_run_id": run_id})
            if verbose:
                print(f"  trial {trial.trial_id} started: {_describe(over)}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release(trial)
            m = trial.last_result or {}
            run_id = _driver_run_id(trials_dir, trial.trial_id)
            if run_id is not None:
                status = _status(m, epochs)  # as the sweep's table will say (ASHA-stopped: KILLED)
                if status == "diverged":
                    mark_diverged(uri, run_id)
                else:
                    tracking.finish_run(uri, run_id, RUN_STATUS[status])
            if verbose:
                what = "diverged" if m.get("diverged") else f"{metric} {float(m.get(metric, math.nan)):.4f}"
                print(f"  trial {trial.trial_id} ended after epoch {m.get('epoch', '?')}: {what}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release(trial)
            run_id = _driver_run_id(trials_dir, trial.trial_id)
            if run_id is not None:
                tracking.finish_run(uri, run_id, RUN_STATUS["error"])
            if verbose:
                print(f"  trial {trial.trial_id} failed (see {trial.local_path})", flush=True)

    return SweepDriverCallback()


def run_sweep(s: Sweep, *, resume: bool = False, verbose: bool = True) -> SweepResult:
    """Run (or continue) a sweep; returns its table and what was registered.

    Raises:
        UserError: bad sweep name / resume request, missing data.
    """
    from ray import tune

    from orchestrator import tracking
    from orchestrator.pretrain import config_differences, ensure_data, init_ray

    start = time.perf_counter()
    sweep_dir = resolve_sweep_dir(s, resume=resume)  # a local folder or a URI
    sweep_name = storage.name(sweep_dir)
    record_path = storage.join(sweep_dir, SWEEP_RECORD)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # --resume loses at most ~2 s of Tune state
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Trial result files (result.json, progress.csv): ResultGrid reads them; pretrain turns them off.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"
    if resume:
        record = json.loads(storage.read_text(record_path))
        results_md = storage.join(sweep_dir, "results.md")
        if record.get("status") == "finished":
            raise UserError(f"sweep {sweep_name!r} has finished ({results_md}); nothing to resume")
        if record.get("status") == "time budget":
            raise UserError(f"sweep {sweep_name!r} ended on its time budget (sweep.time_budget_s = "
                            f"{record['sweep'].get('time_budget_s')} s; {results_md}); --resume "
                            "cannot extend it: start a new sweep with a larger sweep.time_budget_s")
        base = Config.from_dict(record["base"], source=str(record_path))
        # As `pretrain --resume`: the trials that ran and the ones still to run share one base config.
        diff = config_differences(base, _absolute(s))
        if diff:
            raise UserError(f"--resume continues sweep {sweep_name!r} with its recorded base config "
                            f"({record_path}); these differ: {', '.join(diff)} (start a new sweep instead)")
        recorded_sweep = parse_sweep_section(record["sweep"], source=str(record_path))
        if dataclasses.asdict(recorded_sweep) != {**dataclasses.asdict(s.sweep), "name": recorded_sweep.name}:
            raise UserError(f"--resume continues sweep {sweep_name!r} with its recorded sweep section "
                            f"({record_path}); start a new sweep to change it")
        s = Sweep(base=base, sweep=recorded_sweep, source=s.source, stem=s.stem)
        uri, parent = record["tracking_uri"], record["parent_run_id"]
    else:
        ensure_data(s.base, quiet=not verbose)
        from orchestrator.data import check_data

        check_data(s.base, need_labels=f"a sweep ranks its trials by {s.sweep.metric}")  # before Ray starts
        s = Sweep(base=_absolute(s), sweep=s.sweep, source=s.source, stem=s.stem)
        uri = str(s.base.tracking.uri)
    sw = s.sweep
    trials_dir = storage.join(sweep_dir, "trials")  # the trials' Train runs: under the sweep's storage

    started, temp_dir = init_ray(s.base)
    try:
        from orchestrator.data import put_decoded, resolve_loader
        from orchestrator.pretrain import check_cluster_storage

        check_cluster_storage(s.base, {"sweep.storage_path": storage_location(s.sweep.storage_path)},
                              streams_data=resolve_loader(s.base) == "stream")

        # data.loader=memory: decode once here, for every trial (their data fields are the base's
        # unless the sweep varies one; such a trial decodes its own). Before anything is written:
        # a data.loader=memory that cannot fit is refused here.
        data = put_decoded(s.base) if resolve_loader(s.base) == "memory" else None
        if not resume:
            base = s.base
            # The store and the experiment exist before any trial process opens them (SQLite races).
            exp_id = tracking.ensure_experiment(uri, base.tracking.experiment)
            params = {f"sweep.{k}": (json.dumps(v) if isinstance(v, (dict, list)) else v)
                      for k, v in dataclasses.asdict(sw).items()}
            params["sweep.trials"] = n_grid_trials(sw)
            sweep_yaml = yaml.safe_dump({**base.to_dict(), "sweep": dataclasses.asdict(sw)}, sort_keys=False)
            parent = tracking.start_run(uri, exp_id, sweep_name, params, sweep_yaml,
                                        tags={"selfsup.kind": "sweep", "dataset": _dataset(base)})
            record = {"name": sweep_name, "status": "running", "parent_run_id": parent, "tracking_uri": uri,
                      "base": base.to_dict(), "sweep": dataclasses.asdict(sw)}
            _write_record(record_path, record)
        if verbose:
            what = "resuming" if resume else "running"
            how = f", decoded once into memory for every trial ({data.nbytes / 1e6:,.0f} MB)" if data else ""
            print(f"selfsup sweep: {what} {sweep_name}: {sw.searcher} search, "
                  f"{n_grid_trials(sw)} trials over {', '.join(sorted(sw.methods))}, "
                  f"{sw.scheduler.upper()} on {sw.metric}, {sw.max_concurrent_trials} at a time; "
                  f"{s.base.optim.epochs} epochs x {s.base.scaling.num_workers} worker(s) each{how}", flush=True)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=s.base.to_dict(), trials_dir=trials_dir,
                                 parent_run_id=parent, metric=sw.metric, data=data),
            trial_resources(sw))
        if resume and tune.Tuner.can_restore(sweep_dir):
            tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True,
                                       param_space=None)
        else:
            param_space, search_alg, num_samples = build_search(sw)
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=search_alg, scheduler=build_scheduler(sw, s.base.optim.epochs),
                    num_samples=num_samples, max_concurrent_trials=sw.max_concurrent_trials,
                    # No actor reuse: a trial Tune stops (ASHA) is still inside trainer.fit(), whose
                    # Train controller keeps running in a reused process; tried: Tune could not
                    # reset the actor and the sweep hung. A fresh process per trial costs ~3 s here.
                    time_budget_s=sw.time_budget_s, reuse_actors=False),
                run_config=tune.RunConfig(name=sweep_name, storage_path=storage.parent(sweep_dir),
                                          callbacks=[_driver_callback(
                                              trials_dir, sw.metric, verbose, base=s.base.to_dict(), uri=uri,
                                              parent_run_id=parent, epochs=s.base.optim.epochs)],
                                          verbose=0))
        fit_start = time.perf_counter()
        results = tuner.fit()
        fit_end = time.perf_counter()
        # Tune ends a sweep whose time budget ran out without an error: tell it from a complete one.
        budget = sw.time_budget_s is not None and fit_end - fit_start >= sw.time_budget_s
        out = _finish(s, sweep_dir, record, results, uri, parent, verbose=verbose, budget_ran_out=budget)
        out.timings = {"setup_s": fit_start - start, "tune_s": fit_end - fit_start,
                       "finish_s": time.perf_counter() - fit_end}
    finally:
        if started:
            import ray

            ray.shutdown()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
    out.wall_seconds = time.perf_counter() - start
    if verbose:
        _print_summary(out)
    return out


def _dataset(cfg: Config) -> str:
    from orchestrator.pretrain import dataset_name

    return dataset_name(cfg)


def _finish(s: Sweep, sweep_dir: str, record: dict[str, Any], results: Any, uri: str, parent: str, *,
            verbose: bool, budget_ran_out: bool = False) -> SweepResult:
    """Final statuses on the child runs, table + plot artifacts, best encoder, champion."""
    from orchestrator import tracking

    sw, epochs = s.sweep, s.base.optim.epochs
    c = tracking.client(uri)
    table = results_table(results, sw, epochs, storage.join(sweep_dir, "trials"), c)
    for _, row in table.iterrows():
        run_id = row["mlflow_run_id"]
        if not run_id:
            continue
        c.set_tag(run_id, "selfsup.trial_status", row["status"])
        c.set_tag(run_id, "selfsup.trial_id", row["trial"])
        # A trial Tune stopped (ASHA, time budget) or that failed was killed before it could
        # close its run (or closed it as FAILED on the way down): the driver says what happened.
        if row["status"] in ("stopped", "error", "not run") or c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, RUN_STATUS[row["status"]])

    md = markdown_table(table, sw.metric)
    # Made in a local folder, then logged to MLflow and copied next to the sweep's record (which
    # may be in an object store).
    with tempfile.TemporaryDirectory(prefix="selfsup-sweep-") as d:
        local = Path(d)
        table.to_csv(local / "results.csv", index=False)
        (local / "results.md").write_text(md)
        plot_png(table, sw, local / "knn_by_hparam.png")
        for f in ("results.csv", "results.md", "knn_by_hparam.png"):
            c.log_artifact(parent, str(local / f))
            storage.upload(local / f, storage.join(sweep_dir, f))

    out = SweepResult(name=storage.name(sweep_dir), sweep_dir=sweep_dir, parent_run_id=parent, tracking_uri=uri,
                      table=table, metric=sw.metric, planned=n_grid_trials(sw), budget_ran_out=budget_ran_out)
    counts = table["status"].value_counts().to_dict() if not table.empty else {}
    metrics = {f"trials_{k.replace(' ', '_')}": float(v) for k, v in counts.items()}
    ok = table[table["status"].isin(["finished", "stopped"]) & table[sw.metric].notna()] if not table.empty else table
    finished = ok[ok["status"] == "finished"] if not ok.empty else ok
    pool = finished if not finished.empty else ok
    if not pool.empty:
        best = pool.iloc[0].to_dict()
        out.best = best
        metrics[f"best_{sw.metric}"] = float(best[sw.metric])
        c.set_tag(parent, "best_trial", best["trial"])
        if sw.register and s.base.tracking.register:
            if record.get("model_uri"):  # registered by an earlier run of this sweep's driver
                out.model_uri, out.champion = record["model_uri"], bool(record.get("champion"))
                out.champion_note = str(record.get("champion_note", ""))
            else:
                out.model_uri, out.champion, out.champion_note = _register_best(s, best, uri, sweep_dir)
                record.update(model_uri=out.model_uri, champion=out.champion, champion_note=out.champion_note)
                c.set_tag(parent, "registered_model", out.model_uri)
    if metrics:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        c.log_batch(parent, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
    if budget_ran_out:
        c.set_tag(parent, "selfsup.ended_by", "time_budget_s")
    c.set_terminated(parent, "FINISHED")
    _write_record(storage.join(sweep_dir, SWEEP_RECORD), {**record, "status": "time budget" if budget_ran_out else "finished"})
    out.markdown = md
    return out


def _register_best(s: Sweep, best: dict[str, Any], uri: str, sweep_dir: str) -> tuple[str | None, bool, str]:
    """Register the best trial's encoder (from its last checkpoint) and maybe move `champion`."""
    from orchestrator import tracking
    from orchestrator.pretrain import protocol_tags
    from orchestrator.registry import promote_if_better
    from orchestrator.train_loop import STATE_FILE, build_model, encoder_state, load_state

    ckpt = best.get("checkpoint_path")  # Ray's Checkpoint.path: without the URI's scheme on object stores
    state_file = ""
    if isinstance(ckpt, str) and ckpt:
        state_file = storage.join(storage.with_scheme_of(storage_location(s.sweep.storage_path), ckpt), STATE_FILE)
    if not state_file or not storage.is_file(state_file):
        # A trial that had finished when a killed driver's sweep was resumed reports its end again
        # without a checkpoint (`run_trial`): its Train run's newest checkpoint (names sort by time).
        run_dir = storage.join(sweep_dir, "trials", f"{TRIAL_PREFIX}{best['trial']}")
        # Not checkpoint_manager_snapshot.json: the checkpoints are checkpoint_<date>_<time> folders.
        names = sorted(n for n in storage.list_names(run_dir) if re.match(r"checkpoint_\d{4}-", n))
        state_file = storage.join(run_dir, names[-1], STATE_FILE) if names else ""
        if not state_file or not storage.is_file(state_file):
            print(f"selfsup sweep: no checkpoint of trial {best['trial']} under {run_dir}; nothing registered",
                  file=sys.stderr, flush=True)
            return None, False, ""
    state = load_state(io.BytesIO(storage.read_bytes(state_file)))
    cfg = _trial_config(s, best)
    model = build_model(cfg)
    model.encoder.load_state_dict(encoder_state(state["model"]))
    protocol = protocol_tags(cfg)
    name = cfg.tracking.model_name or f"{protocol['dataset']}-encoder"
    c = tracking.client(uri)
    status = c.get_run(best["mlflow_run_id"]).info.status
    mv = tracking.register_encoder(
        model.encoder, tracking_uri=uri, run_id=best["mlflow_run_id"], model_name=name,
        image_size=cfg.data.image_size,
        # every accuracy of the last epoch (kNN, linear): `registry best` can rank by any of them
        tags={**{k: v for k, v in state["metrics"].items() if k in METRICS},
              "method": cfg.method.name, s.sweep.metric: best[s.sweep.metric], "encoder": cfg.model.encoder,
              "run_name": f"{TRIAL_PREFIX}{best['trial']}", "sweep": s.stem, **protocol})
    c.set_terminated(best["mlflow_run_id"], status)  # registering reopened the trial's run
    promotion = promote_if_better(c, name, str(mv.version), metric=s.sweep.metric)
    return f"models:/{name}/{mv.version}", promotion.moved, promotion.reason


def _trial_config(s: Sweep, row: dict[str, Any]) -> Config:
    """The config a trial ran with, rebuilt from its table row (the swept values)."""
    over = dict(trial_defaults(str(row["method"])))
    for key in _swept_keys(s.sweep):
        v = row.get(_short(key))
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            over[key] = v.item() if hasattr(v, "item") else v
    return apply_overrides(s.base, over, source="best trial")


def _print_summary(out: SweepResult) -> None:
    print(f"\nselfsup sweep {out.name}: {len(out.table)} trials in {out.wall_seconds:.0f}s\n")
    print(out.markdown)
    if out.budget_ran_out:
        done = int((out.table["status"] == "finished").sum()) if not out.table.empty else 0
        print(f"  time budget:  ran out: {len(out.table)} of {out.planned} trials started, {done} finished; "
              "the trials it cut short are 'stopped', the rest did not run")
    print(f"  table, plot:  {out.sweep_dir}/results.csv, results.md, knn_by_hparam.png "
          f"(also artifacts of MLflow run {out.parent_run_id})")
    if out.best:
        print(f"  best trial:   {out.best['trial']} ({out.best['method']}), "
              f"{out.metric} {out.best[out.metric]:.4f}")
    if out.model_uri:
        print(f"  registered:   {out.model_uri}" + ("  (now the champion)" if out.champion else
                                                    f"  (not the champion: {out.champion_note})"))
    if not out.budget_ran_out:
        print("  an interrupted sweep continues with the same command plus --resume", flush=True)


def main(config: str | None = None, overrides: list[str] | None = None, resume: bool = False) -> int:
    """`selfsup sweep`: returns the exit code (UserError propagates to the CLI: exit 2)."""
    s = load_sweep(config, overrides or [])
    out = run_sweep(s, resume=resume, verbose=True)
    if out.best is None:
        why = " before the time budget (sweep.time_budget_s) ran out" if out.budget_ran_out else ""
        print(f"selfsup sweep: no trial reported {out.metric}{why}; nothing registered", file=sys.stderr, flush=True)
        return 1
    return 0
