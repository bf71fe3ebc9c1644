"""Reading a sweep file and checking it before Ray starts: one message naming the field."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any


from orchestrator.config import (METHOD_NAMES, METHOD_ONLY, RUN_NAME, Config, ConfigError, parse_value,
                                 apply_overrides, parse_overrides, read_yaml, validate, where_set)
from orchestrator.sweep.space import (check_dimension, check_points, describe, method_dims, n_grid_trials,
                                      trial_defaults, trial_worker_counts)
from orchestrator.sweep.spec import METRICS, SCHEDULERS, SEARCHERS, TRIAL_KINDS, Sweep, SweepConfig, reject


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
        path = str(Path(__file__).resolve().parents[2] / "configs" / "sweep-demo.yaml")
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
        set_sweep_field(sweep, key[len("sweep."):], value, f"--set {key}={value}")
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
        set_sweep_field(sweep, str(key), value, f"{source}: sweep.{key}")
    return sweep


def set_sweep_field(sweep: SweepConfig, key: str, value: Any, where: str) -> None:
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
    setattr(sweep, key, parse_value(typing.get_type_hints(SweepConfig)[key], value, where))


def check_sweep(s: Sweep) -> None:
    """Reject a sweep that cannot run, before Ray starts (one message naming the field).

    Every grid point (or, for random/bayes, every categorical value and every range end) is
    applied to the base config and validated like a pretrain config.
    """
    sw = s.sweep
    if sw.searcher not in SEARCHERS:
        reject("sweep.searcher", sw.searcher, f"allowed: {', '.join(SEARCHERS)}")
    if sw.scheduler not in SCHEDULERS:
        reject("sweep.scheduler", sw.scheduler, f"allowed: {', '.join(SCHEDULERS)}")
    if sw.metric not in METRICS:
        reject("sweep.metric", sw.metric, f"allowed: {', '.join(METRICS)}")
    if sw.metric.startswith("linear_"):
        if s.base.eval.linear_epochs <= 0:
            reject("sweep.metric", sw.metric, "needs the linear probe: set eval.linear_epochs > 0")
        # The probe runs after the last epoch only; ASHA compares trials at every rung, so a
        # sweep ranking by it probes after every epoch (~1 s each on the demo).
        if sw.scheduler == "asha":
            s.base.eval.linear_every_epoch = True
    for name in ("num_samples", "max_concurrent_trials", "grace_period"):
        if getattr(sw, name) < 1:
            reject(f"sweep.{name}", getattr(sw, name), "must be >= 1")
    if sw.reduction_factor <= 1:
        reject("sweep.reduction_factor", sw.reduction_factor, "must be > 1")
    if sw.cpus_per_trial <= 0:
        reject("sweep.cpus_per_trial", sw.cpus_per_trial, "must be > 0")
    if sw.trial_kind not in TRIAL_KINDS:
        reject("sweep.trial_kind", sw.trial_kind, f"allowed: {', '.join(TRIAL_KINDS)}")
    if sw.time_budget_s is not None and sw.time_budget_s <= 0:
        reject("sweep.time_budget_s", sw.time_budget_s, "must be > 0 (or null)")
    if sw.name is not None and not RUN_NAME.match(sw.name):
        reject("sweep.name", sw.name, "use letters, digits, '.', '_' and '-'")
    if sw.searcher == "bayes":
        try:
            import optuna  # noqa: F401
        except ImportError:
            reject("sweep.searcher", "bayes", "needs the optuna package (pip install optuna)")
    _check_space(s)


def _check_space(s: Sweep) -> None:
    """The methods and dimensions: known methods, method-only fields under their methods, and every
    grid point (or range end) a valid pretrain config."""
    sw = s.sweep
    if not sw.methods:
        sw.methods = {s.base.method.name: {}}
    for m in sw.methods:
        if m not in METHOD_NAMES:
            reject("sweep.methods", m, f"allowed methods: {', '.join(METHOD_NAMES)}")
    for key in sw.space:
        if key == "method.name" or key in {f"method.{f}" for f in METHOD_ONLY}:
            reject(f"sweep.space.{key}", sw.space[key],
                  "method-specific: list it under sweep.methods.<method> for the methods that take it")
    for m, dims in sw.methods.items():
        if "method.name" in dims:
            reject(f"sweep.methods.{m}.method.name", dims["method.name"], "the method is the key above it")
    for m in sw.methods:
        dims = method_dims(sw, m)
        for key, spec in dims.items():
            where = f"sweep.methods.{m}.{key}" if key in sw.methods[m] else f"sweep.space.{key}"
            check_dimension(where, spec, sw.searcher)
        for point in check_points(dims):
            over = {**trial_defaults(m), **point}
            try:
                cfg = apply_overrides(s.base, over, source=f"{s.source}: sweep {m}")
                validate(cfg, check_data=False, check_gpu=False)
                if cfg.scaling.elastic:  # why not: docs/design.md, "Elastic runs"
                    reject("scaling.num_workers", cfg.scaling.num_workers,
                           "a sweep's trials have a fixed number of workers (an integer); [min, max] is for "
                           "selfsup pretrain")
            except ConfigError as e:
                # A base field set by --set (and not swept) is blamed on the --set, else on the file.
                msg = where_set(str(e), path=None, raw=None,
                                overrides={k: v for k, v in s.overrides.items() if k not in point})
                if msg != str(e):
                    raise ConfigError(f"{msg} (in sweep trial {describe(over)})") from None
                raise ConfigError(f"{s.source}: sweep trial {describe(over)}: {e}") from None
    workers = max(trial_worker_counts(sw, s.base.scaling.num_workers))
    if sw.trial_kind == "in_process" and workers > 1:
        reject("sweep.trial_kind", sw.trial_kind, f"runs one worker per trial, but a trial has scaling.num_workers = "
               f"{workers}: use train (or auto)")
    if n_grid_trials(sw) == 0:
        reject("sweep.methods", sw.methods, "the sweep has no trials")


