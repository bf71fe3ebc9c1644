"""Sweep overhead: the demo sweep's wall time against the sum of its trials' training time.

Runs `configs/sweep-demo.yaml` (SimCLR + BYOL on the demo digits, ASHA) end to end through
`orchestrator.sweep.run_sweep`, with a fresh SQLite MLflow store and sweep folder in a temporary
directory, one trial at a time by default (so that the trials' times add up to the wall time they
took). Three times are compared, all from the same run:

- wall: the whole `run_sweep` call (Ray start, MLflow parent run, Tune, table, plot, registration);
- trial: the sum of the trials' own wall times (Tune's `time_total_s`: Train start, data, epochs);
- train: the sum of the trials' epoch times (training steps + the per-epoch kNN evaluation).

Overhead per trial = (wall - train) / trials; it splits into the sweep driver's share
((wall - trial) / trials: Ray start, MLflow parent run, Tune's scheduling, table/plot/registration
at the end) and the trial's own start-up ((trial - train) / trials: the trial process, its MLflow
run, the Train controller and worker processes, the Ray Data pipeline, the kNN images and the
untrained-encoder kNN, closing the run). Target: <= 10 s.

Floor, measured in the same run (a fresh driver process, `--floor-only N`, the same Ray settings
through `orchestrator.pretrain.init_ray`): a Tune sweep of N trials, one at a time, whose function
trainable runs an empty one-worker `TorchTrainer.fit()` (the worker imports torch and reports once).
That is what a Tune trial that is a Ray Train run costs here before any of selfsup's work; the
overhead is also given as a multiple of it.

Baseline for the machine's speed, measured in the same run (before and after the sweep): the time
a fresh Python process takes to import torch, ray and mlflow (every trial starts several such
processes). On a shared machine all the seconds above grow with the load; the ratio to this gauge
carries over better.

    .venv/bin/python benchmarks/sweep_overhead.py [--concurrency 1] [--set KEY=VALUE ...]

Writes benchmarks/results/sweep_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
TARGET_S = 10.0


def import_gauge() -> float:
    """Seconds for a fresh interpreter to import torch, ray and mlflow (the cost of one process start)."""
    import subprocess

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, ray, ray.train, mlflow"], check=True)
    return time.perf_counter() - t0


def _floor_trial(config: dict) -> None:
    """A Tune trial whose whole work is an empty one-worker Ray Train run."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer

    def train_fn(_: dict) -> None:
        import torch  # noqa: F401  (every real worker imports it)

        ray.train.report({"done": 1})

    TorchTrainer(train_fn, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name=f"floor-{config['i']}", storage_path=config["storage"])).fit()
    tune.report({"done": 1})


def floor_only(trials: int, out_json: Path) -> None:
    """Time a Tune sweep of `trials` empty Train runs (see the module docstring); writes seconds."""
    from ray import tune

    from orchestrator.config import Config
    from orchestrator.pretrain import init_ray

    import ray

    work = Path(tempfile.mkdtemp(prefix="sweep-floor-"))
    temp_dir = None
    try:
        t0 = time.perf_counter()
        _, temp_dir = init_ray(Config())
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"  # as run_sweep: trials write result files
        t1 = time.perf_counter()
        tuner = tune.Tuner(tune.with_resources(_floor_trial, {"cpu": 0.25}),
                           param_space={"i": tune.grid_search(list(range(trials))), "storage": str(work / "train")},
                           tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=False),
                           run_config=tune.RunConfig(name="floor", storage_path=str(work / "tune"), verbose=0))
        grid = tuner.fit()
        t2 = time.perf_counter()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"floor trial failed: {errors[0]}")
        out_json.write_text(json.dumps({"trials": trials, "ray_start_s": t1 - t0, "tune_s": t2 - t1}))
    finally:  # also when a trial failed: the private Ray and its session folder go
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def measure_floor(trials: int) -> dict:
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "floor.json"
        subprocess.run([sys.executable, __file__, "--floor-only", str(trials), "--floor-json", str(path)],
                       check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        return json.loads(path.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "sweep-demo.yaml"))
    ap.add_argument("--concurrency", type=int, default=1, help="sweep.max_concurrent_trials (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra overrides")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for sweep_overhead.json and .md")
    ap.add_argument("--floor-trials", type=int, default=4, help="trials of the empty-Train-run floor sweep")
    ap.add_argument("--floor-only", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--floor-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.floor_trials < 1:
        ap.error(f"--floor-trials {args.floor_trials}: the overhead table compares against the floor; use 1 or more")
    if args.floor_only is not None:
        floor_only(args.floor_only, args.floor_json)
        return 0

    from orchestrator.sweep import load_sweep, run_sweep
    from orchestrator.timeline import ENV as TIMELINE_ENV
    from orchestrator.timeline import PHASES, phases
    from pipelines.ingest import ingest

    gauge = [import_gauge()]
    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    cwd = os.getcwd()
    try:
        t0 = time.perf_counter()
        ingest("demo", str(work / "demo"), progress=False)
        ingest_s = time.perf_counter() - t0
        overrides = [f"data.path={work / 'demo'}", "data.source=null",
                     f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                     f"sweep.storage_path={work / 'sweeps'}", "sweep.name=overhead",
                     f"sweep.max_concurrent_trials={args.concurrency}", *args.set]
        s = load_sweep(args.config, overrides)
        os.chdir(work)
        timeline = work / "timeline.jsonl"
        os.environ[TIMELINE_ENV] = str(timeline)  # before Ray starts: every process inherits it
        out = run_sweep(s, verbose=True)
        trial_phases = phases(str(timeline)) if timeline.is_file() else {}
    finally:
        os.environ.pop(TIMELINE_ENV, None)
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)

    gauge.append(import_gauge())
    g = sum(gauge) / len(gauge)
    floor = measure_floor(args.floor_trials)
    floor_per_trial = floor["tune_s"] / floor["trials"]
    t = out.table
    n = len(t)
    tm = out.timings
    wall, trial, train = out.wall_seconds, float(t["trial_s"].sum()), float(t["train_s"].sum())
    result = {
        "config": os.path.relpath(args.config, REPO), "overrides": args.set,
        "max_concurrent_trials": args.concurrency, "trials": n,
        "statuses": t["status"].value_counts().to_dict(),
        "epochs_run": int(t["epochs"].sum()),
        "wall_s": round(wall, 2), "sum_trial_s": round(trial, 2), "sum_train_s": round(train, 2),
        "overhead_per_trial_s": round((wall - train) / n, 2),
        "driver_overhead_per_trial_s": round((wall - trial) / n, 2),
        "trial_startup_per_trial_s": round((trial - train) / n, 2),
        "target_per_trial_s": TARGET_S,
        "driver_setup_s": round(tm["setup_s"], 2), "driver_tune_s": round(tm["tune_s"], 2),
        "driver_finish_s": round(tm["finish_s"], 2),
        "tune_scheduling_per_trial_s": round((tm["tune_s"] - trial) / n, 2),
        "import_gauge_s": round(g, 2),
        "floor_trials": floor["trials"], "floor_tune_s": round(floor["tune_s"], 2),
        "floor_per_trial_s": round(floor_per_trial, 2),
        "overhead_per_trial_in_floors": round((wall - train) / n / floor_per_trial, 2),
        "overhead_per_trial_in_gauges": round((wall - train) / n / g, 2),
        "demo_ingest_s (not in wall)": round(ingest_s, 2),
        "trial_phases_s": trial_phases,
        "trial_phase_medians_s": {label: round(statistics.median(v[label] for v in trial_phases.values() if label in v), 2)
                                  for label, _, _ in PHASES
                                  if any(label in v for v in trial_phases.values())},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Sweep overhead (`benchmarks/sweep_overhead.py`)",
        "",
        f"`{result['config']}`: {n} trials ({', '.join(f'{v} {k}' for k, v in result['statuses'].items())}), "
        f"{result['epochs_run']} epochs in all, {args.concurrency} trial(s) at a time; {result['machine']}.",
        "",
        "| measure | seconds | per trial |",
        "| --- | ---: | ---: |",
        f"| sweep wall time | {wall:.1f} | {wall / n:.1f} |",
        f"| sum of trial wall times (Tune `time_total_s`) | {trial:.1f} | {trial / n:.1f} |",
        f"| sum of epoch times (training + kNN eval) | {train:.1f} | {train / n:.1f} |",
        f"| **overhead = wall - epochs** | {wall - train:.1f} | **{(wall - train) / n:.1f}** (target <= {TARGET_S:.0f}) |",
        # With trials overlapping, "wall - trials" is no longer the driver's share: split it only at 1.
        *([f"| of which sweep driver (wall - trials) | {wall - trial:.1f} | {(wall - trial) / n:.1f} |",
           f"| &nbsp;&nbsp;driver: Ray start, parent run (once) | {tm['setup_s']:.1f} | {tm['setup_s'] / n:.1f} |",
           f"| &nbsp;&nbsp;driver: Tune scheduling (Tune time - trials) | {tm['tune_s'] - trial:.1f} | {(tm['tune_s'] - trial) / n:.1f} |",
           f"| &nbsp;&nbsp;driver: table, plot, registration (once) | {tm['finish_s']:.1f} | {tm['finish_s'] / n:.1f} |",
           f"| of which trial start-up (trials - epochs) | {trial - train:.1f} | {(trial - train) / n:.1f} |"]
          if args.concurrency == 1 else
          [f"| driver: Ray start, parent run (once) | {tm['setup_s']:.1f} | {tm['setup_s'] / n:.1f} |",
           f"| driver: table, plot, registration (once) | {tm['finish_s']:.1f} | {tm['finish_s'] / n:.1f} |"]),
        f"| floor: Tune trial running an empty 1-worker `TorchTrainer.fit()` ({floor['trials']} trials, 1 at a time) "
        f"| {floor['tune_s']:.1f} | {floor_per_trial:.1f} (overhead = {(wall - train) / n / floor_per_trial:.1f} x this) |",
        f"| baseline: one `import torch, ray, mlflow` process | {g:.1f} | overhead = {(wall - train) / n / g:.1f} x this |",
        "",
        "A trial's phases (median over the trials that reached them; `SELFSUP_TIMELINE` marks; a trial ASHA "
        "stopped has no end phases):",
        "",
        "| phase of one trial | median s |",
        "| --- | ---: |",
        *[f"| {k} | {v:.2f} |" for k, v in result["trial_phase_medians_s"].items()],
        "",
        "Command: `.venv/bin/python benchmarks/sweep_overhead.py"
        + (f" --concurrency {args.concurrency}" if args.concurrency != 1 else "")
        + "".join(f" --set {kv}" for kv in args.set)
        + (f" --out {os.path.relpath(args.out, REPO)}" if args.out.resolve() != RESULTS.resolve() else "") + "`",
        "",
    ]
    (args.out / "sweep_overhead.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
