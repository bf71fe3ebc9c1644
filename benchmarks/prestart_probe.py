"""Probe: would prestarted Ray worker processes take the per-trial start-up out of a sweep?

Not a product feature: a measurement behind issue 5's note. Every sweep trial starts about five
fresh Python processes (the Tune trial, the Train controller, its PlacementGroupCleaner and
SynchronizationActor, the Train worker), each importing Ray and most of them torch. Ray's raylet
can start idle workers ahead of time (its internal `PrestartWorkers` RPC, which Ray's Python API
does not expose) with modules imported at start-up (`_system_config={"preload_python_modules"}`);
an actor takes such an idle worker only when its runtime_env string matches exactly, so the probe
prestarts, at each trial start, 1 worker with the Tune trial's runtime_env and 4 with the Train
controller's (the controller's helpers and the worker inherit it).

Each mode runs in its own process with its own local Ray (4 logical CPUs, as `init_ray`):
`off` (plain), `preload` (modules imported at worker start, nothing prestarted) and `prestart`
(both). Each runs a Tune grid of N trials, one at a time, whose trial is an empty 1-worker
`TorchTrainer.fit()` (the worker imports torch, calls `ray.train.report` and sleeps 1 s).
A fourth mode, `local`, runs the same function through Ray Train's local mode
(`ScalingConfig(num_workers=0)`: no controller, no worker process; the function runs in the Tune
trial's own process) and records whether `ray.train.report` works there. Reported: sweep wall time
per trial.

    .venv/bin/python benchmarks/prestart_probe.py [--trials 4] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
PRELOAD = ["torch", "ray.train.torch", "ray.tune", "orchestrator.training", "orchestrator.tracking"]
MODES = ("off", "preload", "prestart", "local")


def _age_s() -> float:
    """How long this process has lived: a prestarted one is older than its actor."""
    from orchestrator.timeline import process_start_time

    return time.time() - process_start_time()


def _train_fn(config: dict) -> None:
    import time
    from pathlib import Path

    import ray
    import ray.train
    import torch  # noqa: F401  (as a real worker)

    Path(config["age_file"]).write_text(str(_age_s()))
    Path(config["age_file"] + ".env").write_text(ray.get_runtime_context().get_runtime_env_string())
    try:
        ray.train.report({"done": 1})
        outcome = "works"
    except Exception as e:  # Ray Train's local mode inside a Tune trial refuses it
        outcome = f"{type(e).__name__}: {str(e).split('. ')[0]}"
    Path(config["age_file"] + ".report").write_text(outcome)
    time.sleep(1.0)


def _trial(config: dict) -> None:
    from pathlib import Path

    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer

    trial_age = _age_s()
    age_file = Path(config["storage"]) / f"worker-age-{config['i']}"
    age_file.parent.mkdir(parents=True, exist_ok=True)
    scaling = (ray.train.ScalingConfig(num_workers=0) if config["local"]  # Train's local mode: in this process
               else ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}))
    TorchTrainer(_train_fn, train_loop_config={"age_file": str(age_file)}, scaling_config=scaling,
                 run_config=ray.train.RunConfig(name=f"t{config['i']}", storage_path=config["storage"])).fit()
    tune.report({"trial_age_s": trial_age, "worker_age_s": float(age_file.read_text())})


def _runtime_envs() -> list[tuple[str, int]]:
    """(serialized runtime_env, count) to prestart per trial: the Tune trial's, then the Train
    controller's (as the trial process builds it, merged by Ray's core worker with its parent's)."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE

    trial = {**DEFAULT_ENV_VARS, **{k: os.environ[k] for k in ENV_VARS_TO_PROPAGATE if k in os.environ}}
    controller = {**trial, **get_env_vars_to_propagate(), "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}
    return [(json.dumps({"env_vars": dict(sorted(trial.items()))}), 1),
            (json.dumps({"env_vars": dict(sorted(controller.items()))}, separators=(",", ":")), 4)]


def _prestart(envs: list[tuple[str, int]]) -> None:
    import grpc
    import ray
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc, runtime_environment_pb2
    from ray.runtime_env import RuntimeEnvConfig

    w = ray._private.worker.global_worker
    with grpc.insecure_channel(f"{w.node.node_ip_address}:{w.node.node_manager_port}") as channel:
        stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        for serialized, n in envs:
            info = runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env=serialized)
            info.runtime_env_config.CopyFrom(RuntimeEnvConfig.default_config().build_proto_runtime_env_config())
            stub.PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.PYTHON, job_id=w.current_job_id.binary(), runtime_env_info=info,
                keep_alive_duration_secs=300, num_workers=n), timeout=10)


def run_mode(mode: str, trials: int) -> dict:
    """One mode in this process: its own Ray, a Tune grid of `trials` empty Train runs."""
    import ray
    from ray import tune

    from orchestrator.ray_compat import quiet_ray_env

    quiet_ray_env()
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"  # the ResultGrid reads the trials' result files
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the private local Ray's setting (init_ray); the RPC needs it
    temp = tempfile.mkdtemp(prefix="selfsup-ray-")
    work = Path(tempfile.mkdtemp(prefix="prestart-probe-"))
    system = {"preload_python_modules": PRELOAD} if mode != "off" else {}
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
                 _system_config=system)
        envs = _runtime_envs()

        class Prestart(tune.Callback):
            def on_trial_start(self, iteration: int, trials: list, trial: object, **info: object) -> None:
                _prestart(envs)

        if mode == "prestart":
            _prestart(envs)
        time.sleep(10)  # Ray's own start-up settles; the first prestarted workers finish importing
        t0 = time.perf_counter()
        grid = tune.Tuner(
            tune.with_resources(_trial, {"cpu": 0.25}),
            param_space={"i": tune.grid_search(list(range(trials))), "storage": str(work / "train"),
                         "local": mode == "local"},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=False),
            run_config=tune.RunConfig(name="probe", storage_path=str(work / "tune"), verbose=0,
                                      callbacks=[Prestart()] if mode == "prestart" else [])).fit()
        wall = time.perf_counter() - t0
        if grid.errors:
            raise RuntimeError(f"{mode}: a trial failed: {grid.errors[0]}")
        ages = [(r.metrics["trial_age_s"], r.metrics["worker_age_s"]) for r in grid]
        # Is the Train worker's runtime_env the string the probe prestarts for it?
        worker_envs = {p.read_text() for p in (work / "train").glob("worker-age-*.env")}
        reports = sorted({p.read_text() for p in (work / "train").glob("worker-age-*.report")})
        return {"mode": mode, "trials": trials, "wall_s": round(wall, 2), "per_trial_s": round(wall / trials, 2),
                "trial_age_s": [round(a, 2) for a, _ in ages], "worker_age_s": [round(b, 2) for _, b in ages],
                "worker_env_is_prestarted_env": worker_envs == {envs[1][0]}, "ray_train_report": reports}
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in its own process
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trials < 1:
        ap.error(f"--trials {args.trials}: use 1 or more")
    if args.mode:
        args.json.write_text(json.dumps(run_mode(args.mode, args.trials)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mode in MODES:
            path = Path(d) / f"{mode}.json"
            subprocess.run([sys.executable, __file__, "--mode", mode, "--trials", str(args.trials),
                            "--json", str(path)], check=True)
            rows.append(json.loads(path.read_text()))
            print(f"{mode}: {rows[-1]['per_trial_s']:.2f} s per trial", flush=True)
    base = rows[0]["per_trial_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "prestart_probe", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average": os.getloadavg()[0], "preload": PRELOAD, "rows": rows}
    lines = ["# Prestarted Ray workers vs per-trial start-up (`benchmarks/prestart_probe.py`)", "",
             f"{args.trials} Tune trials, one at a time, each an empty 1-worker `TorchTrainer.fit()`; "
             f"{result['machine']}, load average {result['load_average']:.1f}.", "",
             "| mode | s per trial | vs off | trial process age at trial fn (s) | worker process age at train fn (s) |",
             "| --- | ---: | ---: | --- | --- |"]
    what = {"off": "off: plain local Ray (baseline)", "preload": "preload: modules imported at worker start",
            "prestart": "prestart: preload + 1 trial and 4 controller-env workers prestarted per trial",
            "local": "local: Ray Train local mode (`num_workers=0`), the function in the trial's process"}
    lines += [f"| {what[r['mode']]} | {r['per_trial_s']:.2f} | {r['per_trial_s'] / base:.2f} | "
              f"{', '.join(f'{a:.1f}' for a in r['trial_age_s'])} | {', '.join(f'{a:.1f}' for a in r['worker_age_s'])} |"
              for r in rows]
    lines += ["", "A process age well above its own start-up (~3-5 s here) means the actor took a prestarted worker "
              "(in local mode the \"worker\" is the trial process itself).",
              "The Train worker's runtime_env string equals the one prestarted for it: "
              + ", ".join(f"{r['mode']} {'yes' if r['worker_env_is_prestarted_env'] else 'no'}"
                          for r in rows if r["mode"] != "local") + ".",
              "`ray.train.report` in the training function: "
              + "; ".join(f"{r['mode']} {' / '.join(r['ray_train_report'])}" for r in rows) + "."]
    lines += ["", f"Command: `.venv/bin/python benchmarks/prestart_probe.py --trials {args.trials}`", ""]
    write_results(args.out, "prestart_probe", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
