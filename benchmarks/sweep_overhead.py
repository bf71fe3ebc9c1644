"""Sweep overhead: the demo sweep's wall time against the sum of its trials' training time, for each
kind of trial (`sweep.trial_kind`: `in_process`, the shipped default for one-worker trials, with
and without Tune's actor reuse (`sweep.reuse_actors`, on by default), and `train`, a Ray Train run
per trial).

Runs `configs/sweep-demo.yaml` (SimCLR + BYOL on the demo digits, ASHA) end to end through
`orchestrator.sweep.run_sweep` once per kind, each with a fresh SQLite MLflow store and sweep folder
in a temporary directory, one trial at a time by default (so that the trials' times add up to the
wall time they took). Overhead per trial = (sweep wall time - sum of epoch times) / trials: Ray
start, the MLflow parent run, Tune's scheduling, each trial's process and start-up (and for `train`,
its Train controller and worker processes), the table, plot and registration at the end.

Baseline for the machine's speed, measured in the same run (before, between and after the sweeps):
the time a fresh Python process takes to import torch, ray and mlflow. On a shared machine all the
seconds grow with the load; the overhead in these gauges carries over better. Target: <= 1.5
gauges per trial for the demo sweep as shipped.

`--floor-trials N` also times a Tune sweep whose trials run an empty one-worker `TorchTrainer.fit()`
(in a fresh driver, `--floor-only N`): what a Train-run trial costs before any of selfsup's work.

    .venv/bin/python benchmarks/sweep_overhead.py [--concurrency 1] [--kinds in_process,in_process+noreuse,train] [--set KEY=VALUE ...]

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

from benchmarks.results_io import write_results  # noqa: E402
RESULTS = REPO / "benchmarks" / "results"
TARGET_GAUGES = 1.5  # overhead per trial, in import gauges (issue 17)


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
    from orchestrator.cluster import init_ray

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


def measure_sweep(config: str, concurrency: int, extra: list[str], kind: str) -> dict:
    """Run the sweep once with `sweep.trial_kind=kind` in a fresh folder and store; its figures.
    `kind` "in_process+noreuse" also sets `sweep.reuse_actors=false` ("+reuse": true)."""
    trial_kind, _, reuse = kind.partition("+")
    extra = [*extra, *([f"sweep.reuse_actors={str(reuse == 'reuse').lower()}"] if reuse else [])]
    from orchestrator.sweep import load_sweep, run_sweep
    from orchestrator.timeline import ENV as TIMELINE_ENV
    from orchestrator.timeline import PHASES, phases
    from pipelines.ingest import ingest

    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    cwd = os.getcwd()
    try:
        ingest("demo", str(work / "demo"), progress=False)
        overrides = [f"data.path={work / 'demo'}", "data.source=null",
                     f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                     f"sweep.storage_path={work / 'sweeps'}", "sweep.name=overhead",
                     f"sweep.max_concurrent_trials={concurrency}", f"sweep.trial_kind={trial_kind}", *extra]
        s = load_sweep(config, overrides)
        os.chdir(work)
        timeline = work / "timeline.jsonl"
        os.environ[TIMELINE_ENV] = str(timeline)  # before Ray starts: every process inherits it
        out = run_sweep(s, verbose=True)
        trial_phases = phases(str(timeline)) if timeline.is_file() else {}
    finally:
        os.environ.pop(TIMELINE_ENV, None)
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    t, tm = out.table, out.timings
    n = len(t)
    wall, trial, train = out.wall_seconds, float(t["trial_s"].sum()), float(t["train_s"].sum())
    return {
        "trial_kind": kind, "trials": n, "statuses": t["status"].value_counts().to_dict(),
        "epochs_run": int(t["epochs"].sum()),
        "wall_s": round(wall, 2), "sum_trial_s": round(trial, 2), "sum_train_s": round(train, 2),
        "overhead_per_trial_s": round((wall - train) / n, 2),
        "driver_setup_s": round(tm["setup_s"], 2), "driver_tune_s": round(tm["tune_s"], 2),
        "driver_finish_s": round(tm["finish_s"], 2),
        "trial_phase_medians_s": {label: round(statistics.median(v[label] for v in trial_phases.values() if label in v), 2)
                                  for label, _, _ in PHASES if any(label in v for v in trial_phases.values())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "sweep-demo.yaml"))
    ap.add_argument("--concurrency", type=int, default=1, help="sweep.max_concurrent_trials (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra overrides")
    ap.add_argument("--kinds", default="in_process,in_process+noreuse,train",
                    help="sweep.trial_kind values to measure, in order; +noreuse / +reuse: sweep.reuse_actors")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for sweep_overhead.json and .md")
    ap.add_argument("--floor-trials", type=int, default=0,
                    help="also time an empty-Train-run Tune sweep of this many trials (0: skip)")
    ap.add_argument("--floor-only", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--floor-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.floor_only is not None:
        floor_only(args.floor_only, args.floor_json)
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    gauges = [import_gauge()]
    runs = []
    for kind in kinds:
        runs.append(measure_sweep(args.config, args.concurrency, args.set, kind))
        gauges.append(import_gauge())
    g = sum(gauges) / len(gauges)
    for r in runs:
        r["overhead_per_trial_in_gauges"] = round(r["overhead_per_trial_s"] / g, 2)
    floor = measure_floor(args.floor_trials) if args.floor_trials > 0 else None
    result = {"config": os.path.relpath(args.config, REPO), "overrides": args.set,
              "max_concurrent_trials": args.concurrency, "import_gauge_s": round(g, 2),
              "import_gauges_s": [round(x, 2) for x in gauges], "target_gauges_per_trial": TARGET_GAUGES,
              "runs": runs, "floor": floor,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
              "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(result, args)
    write_results(args.out, "sweep_overhead", result, md)
    print(md)
    return 0


def markdown(result: dict, args: argparse.Namespace) -> str:
    runs, g = result["runs"], result["import_gauge_s"]
    cols = " | ".join(f"`{r['trial_kind']}` trials" for r in runs)
    row = lambda label, f: f"| {label} | " + " | ".join(f(r) for r in runs) + " |"  # noqa: E731
    phases = sorted({k for r in runs for k in r["trial_phase_medians_s"]},
                    key=lambda k: min(list(r["trial_phase_medians_s"]).index(k) for r in runs
                                      if k in r["trial_phase_medians_s"]))
    lines = [
        "# Sweep overhead (`benchmarks/sweep_overhead.py`)", "",
        f"`{result['config']}`, {result['max_concurrent_trials']} trial(s) at a time, each kind of trial "
        f"(`sweep.trial_kind`) in turn; {result['machine']}, {result['date']}. Gauge: one fresh "
        f"`import torch, ray, ray.train, mlflow` process, {g:.2f} s (mean of {len(result['import_gauges_s'])}, "
        "measured before, between and after the sweeps).", "",
        f"| measure | {cols} |", "| --- |" + " ---: |" * len(runs),
        row("trials (statuses)", lambda r: f"{r['trials']} ({', '.join(f'{v} {k}' for k, v in r['statuses'].items())})"),
        row("epochs run", lambda r: str(r["epochs_run"])),
        row("sweep wall time, s", lambda r: f"{r['wall_s']:.1f}"),
        row("sum of epoch times (training + kNN), s", lambda r: f"{r['sum_train_s']:.1f}"),
        row("overhead per trial = (wall - epochs) / trials, s", lambda r: f"{r['overhead_per_trial_s']:.1f}"),
        row(f"**overhead per trial in import gauges** (target <= {TARGET_GAUGES})",
            lambda r: f"**{r['overhead_per_trial_in_gauges']:.2f}**"),
        row("driver: Ray start, parent run (once), s", lambda r: f"{r['driver_setup_s']:.1f}"),
        row("driver: table, plot, registration (once), s", lambda r: f"{r['driver_finish_s']:.1f}"),
        "", "A trial's phases (median s over the trials that reached them; `SELFSUP_TIMELINE` marks):", "",
        f"| phase of one trial | {cols} |", "| --- |" + " ---: |" * len(runs),
        *[row(p, lambda r, p=p: f"{r['trial_phase_medians_s'][p]:.2f}" if p in r["trial_phase_medians_s"] else "-")
          for p in phases],
    ]
    if result["floor"]:
        f = result["floor"]
        lines += ["", f"Floor: a Tune trial running an empty 1-worker `TorchTrainer.fit()`: "
                      f"{f['tune_s'] / f['trials']:.1f} s per trial ({f['trials']} trials)."]
    lines += ["", "Command: `.venv/bin/python benchmarks/sweep_overhead.py"
              + (f" --concurrency {args.concurrency}" if args.concurrency != 1 else "")
              + "".join(f" --set {kv}" for kv in args.set)
              + (f" --kinds {args.kinds}" if args.kinds != "in_process,in_process+noreuse,train" else "")
              + (f" --floor-trials {args.floor_trials}" if args.floor_trials else "") + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
