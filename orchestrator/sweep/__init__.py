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

Trials (`trials`): a trial of one worker runs the epoch loop in the Tune trial's own process; a
trial of several workers runs a Ray Train `TorchTrainer` (`sweep.trial_kind`). Both report every
epoch to Tune (ASHA, the searcher).

MLflow (`driver`): the driver creates the experiment and the parent run before any trial starts,
and each trial's child run as Tune starts the trial, one after another in one process, so
concurrent trials never race on the store; the driver closes it as the trial ends (FINISHED,
KILLED when ASHA stopped it, FAILED when it diverged or failed), then writes the table and the plot
and registers the best encoder (`finish`).

Resume (`records`): the Tune experiment lives in `sweep.storage_path/<name>` (a local folder or a
URI such as `s3://BUCKET/sweeps`, read and written through `pipelines.storage` and given to Tune as
is). `--resume` restores the Tune experiment (`Tuner.restore`): finished trials are not run again;
a trial that was running continues from its last checkpoint and in its MLflow run, so no epoch is
logged twice.

Modules: `spec` (the `sweep:` section), `loading` (reading and checking a sweep file), `space`
(search spaces, ASHA), `trials` (the two kinds of trial), `records`, `driver` (`run_sweep`),
`results` (table, plot), `finish` (registration, summary).
"""

from __future__ import annotations

import sys

from orchestrator.sweep.driver import run_sweep
from orchestrator.sweep.section import load_sweep
from orchestrator.sweep.results import SweepResult
from orchestrator.sweep.spec import Sweep, SweepConfig


def main(config: str | None = None, overrides: list[str] | None = None, resume: bool = False) -> int:
    """`selfsup sweep`: returns the exit code (UserError propagates to the CLI: exit 2)."""
    s = load_sweep(config, overrides or [])
    out = run_sweep(s, resume=resume, verbose=True)
    if out.best is None:
        why = " before the time budget (sweep.time_budget_s) ran out" if out.budget_ran_out else ""
        print(f"selfsup sweep: no trial reported {out.metric}{why}; nothing registered", file=sys.stderr, flush=True)
        return 1
    return 0


__all__ = ["Sweep", "SweepConfig", "SweepResult", "load_sweep", "main", "run_sweep"]
