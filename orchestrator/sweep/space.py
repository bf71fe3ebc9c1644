"""Search spaces (grid, random, Optuna TPE; method-conditional) and the trial scheduler (ASHA)."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any


from orchestrator.config import METHOD_ONLY
from orchestrator.sweep.spec import DISTRIBUTIONS, SweepConfig, reject


def method_dims(sw: SweepConfig, method: str) -> dict[str, Any]:
    """The dimensions of one method: the shared ones, then its own (which win)."""
    return {**sw.space, **sw.methods.get(method, {})}


def _finite(values: Any) -> bool:
    """No NaN or infinity among `values` (YAML `.nan`/`.inf`); other types are checked by field type."""
    return all(math.isfinite(v) for v in values if isinstance(v, float))


def check_dimension(where: str, spec: Any, searcher: str) -> None:
    if isinstance(spec, list):
        if not spec:
            reject(where, spec, "an empty list has no values to try")
        if not _finite(spec):
            reject(where, spec, "values must be finite numbers (no .nan or .inf)")
        return
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            reject(where, spec, f"a distribution is one of {{{': [...]}, {'.join(DISTRIBUTIONS)}: [...]}}")
        kind, args = next(iter(spec.items()))
        if kind != "choice" and searcher == "grid":
            reject(where, spec, "the grid searcher takes lists of values; use searcher random or bayes "
                  "for ranges")
        if kind == "choice":
            if not isinstance(args, list) or not args:
                reject(where, spec, "choice takes a non-empty list")
            if not _finite(args):
                reject(where, spec, "values must be finite numbers (no .nan or .inf)")
        elif not (isinstance(args, list) and len(args) == 2
                  and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
                  and args[0] < args[1]):
            reject(where, spec, f"{kind} takes [low, high]: finite numbers with low < high")
        elif kind == "loguniform" and args[0] <= 0:
            reject(where, spec, "loguniform needs low > 0")
        return
    if spec is None:
        reject(where, spec, "null cannot be swept; leave the field out")


def _values(spec: Any) -> list[Any]:
    """The grid values of a dimension (a scalar is one value)."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        return list(next(iter(spec.values())))  # choice: the values; ranges: both ends (validation)
    return [spec]


def check_points(dims: dict[str, Any]) -> list[dict[str, Any]]:
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
        dims = method_dims(sw, method)
        keys = list(dims)
        for values in itertools.product(*(_values(dims[k]) for k in keys)):
            trials.append({"method.name": method, **dict(zip(keys, values))})
    return trials


def n_grid_trials(sw: SweepConfig) -> int:
    return len(grid_trials(sw)) * sw.num_samples if sw.searcher == "grid" else sw.num_samples


def describe(over: dict[str, Any]) -> str:
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
    dims = method_dims(sw, method)
    return {"method.name": method, **{k: _sample(v, rng) for k, v in dims.items()}}


class OptunaSpace:
    """A define-by-run space for OptunaSearch: the method first, then only its own parameters.

    Parameter names carry the method (`simclr:method.temperature`): Optuna keeps one distribution
    per name, and two methods may list different values for the same field. A class, not a
    closure: Tune pickles the searcher (with its space) into the experiment state for --resume.
    """

    def __init__(self, sw: SweepConfig) -> None:
        self.methods = {m: method_dims(sw, m) for m in sorted(sw.methods)}

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


def build_scheduler(sw: SweepConfig, epochs: int, rungs_file: str | None = None) -> Any:
    """ASHA (Li et al., 2020, "A System for Massively Parallel Hyperparameter Tuning") on the metric
    per epoch, or FIFO (every trial runs all its epochs). `rungs_file`: where ASHA keeps its rungs
    for a resumed sweep (`ray_compat.resumable_asha`)."""
    # Imported here: loading a sweep file (this module) must not import Ray Tune.
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator.ray_compat import resumable_asha

    if sw.scheduler == "fifo":
        return FIFOScheduler()
    # time_attr "epoch", not Tune's training_iteration: a trial restarted by --resume continues its
    # Train run at epoch k+1, while Tune would count its iterations from 1 again.
    # stop_last_trials=False: a trial that reaches max_t ends by itself (pretrain.run_trial closes its
    # run); Tune stopping it there would kill it while it closes its MLflow run and run record.
    asha = dict(time_attr="epoch", metric=sw.metric, mode="max", max_t=epochs,
                grace_period=min(sw.grace_period, epochs), reduction_factor=sw.reduction_factor,
                stop_last_trials=False)
    return resumable_asha(rungs_file, **asha) if rungs_file else ASHAScheduler(**asha)


# --- one trial ------------------------------------------------------------------------------------


def trial_worker_counts(sw: SweepConfig, base_workers: int) -> set[int]:
    """The `scaling.num_workers` values the sweep's trials can have (the base's, or the swept ones)."""
    counts = {base_workers}
    for dims in [sw.space, *sw.methods.values()]:
        spec = dims.get("scaling.num_workers")
        if isinstance(spec, list):
            counts |= {int(v) for v in spec}
        elif isinstance(spec, dict):
            counts |= {int(v) for v in next(iter(spec.values()))}
    return counts
