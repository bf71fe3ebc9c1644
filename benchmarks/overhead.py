"""Ray Train overhead: the same epochs through Ray Train (1 worker) and through a plain loop.

Both sides run the same code from `orchestrator.training` (`build_model`, `build_optimizer`,
`build_scheduler`, `TrainBatches`, `train_one_epoch`, `KnnProbe`) and `orchestrator.data.decode_all`,
with the same config, seed and thread count:

- plain (the baseline): a fresh `python` process, no Ray (this script with `--plain-only`, as a
  user would run a training script): the split decoded once (`decode_all`), then per epoch the
  memory loader's batches (`pipelines.memory`: a seeded permutation, gathered uint8 batches,
  `TwoViewAugment` on CPU), `train_one_epoch` and the kNN probe, as a hand-written PyTorch loop would.
  A fresh process, not this one: the same loop ran up to 1.3x faster inside a long-lived process
  that had already imported Ray and MLflow than in a new one, which would flatter neither side;
- Ray Train, 1 worker: `orchestrator.pretrain.run_pretrain` with `scaling.num_workers=1` and
  `data.loader=memory` (the default for data this size): the driver decodes the split into Ray's
  object store, a Train worker maps it and runs the same epochs, reports and checkpoints every
  epoch, MLflow logs from the Train controller. Ray Train / plain = what Ray Train costs;
- Ray Train, 1 worker, `data.loader=stream` (`--stream`, on by default): the shards streamed,
  shuffled and decoded through Ray Data every epoch: what streaming costs for data that fit in memory.

Reported: the median epoch time of each side, epochs 2..n of every round pooled (epoch 1 holds
each side's first-touch costs; target: Ray Train / plain <= 1.05), with the fastest epoch, each
round's ratio of summed epoch times and, for honesty, the end-to-end ratios including Ray start-up,
worker start-up and decoding. This machine's speed drifts by up to +-40% over minutes (the same
plain loop measured 1.2 to 2.2 s per demo epoch in one afternoon), so the plain loop and Ray Train
run in alternating rounds (`--rounds`, default 3) and the headline pools them.

Also reported, because it is steadier than the times: the CPU each side used during epochs 2..n-1,
from /proc (the plain process's own CPU time; on the Ray side a snapshot of every process at the
reports of epochs 1 and n-1, taken by a Train callback in the controller): the training process,
and each of Ray's other processes (the driver and everything it started). Those leave
`cores - other` cores to the Train worker, so the same CPU work per epoch takes at least
`plain cores / (cores - other)` as long: the floor that Ray's own processes set for the ratio.

    .venv/bin/python benchmarks/overhead.py                 # demo data (ingested if missing), 8 epochs
    .venv/bin/python benchmarks/overhead.py --data data/cifar10 --image-size 32 --limit 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from orchestrator import tracking  # noqa: E402
from orchestrator.config import Config, load_config  # noqa: E402


def make_config(args: argparse.Namespace, storage: str, uri: str, loader: str) -> Config:
    overrides = [f"data.path={args.data}", f"data.source={'demo' if args.data.endswith('demo') else 'null'}",
                 f"optim.epochs={args.epochs}", f"optim.batch_size={args.batch_size}",
                 f"data.image_size={args.image_size}", "scaling.num_workers=1",
                 f"scaling.cpus_per_worker={args.threads}", f"run.storage_path={storage}",
                 f"tracking.uri={uri}", "tracking.register=false", "tracking.experiment=overhead",
                 f"eval.knn_train_limit={args.knn_bank}", f"data.loader={loader}", "data.augment_on=worker"]
    if args.limit:
        overrides.append(f"data.limit={args.limit}")
    return load_config(None, overrides, check=False)


def _proc_name(cmdline: list[str]) -> str:
    """A short name for a process: `ray::Actor` as Ray titles its workers, else the program or script."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0].split(".")[0]
    script = next((a for a in cmdline[1:3] if a.endswith(".py")), None)
    return Path(script or cmdline[0]).name


def cpu_snapshot() -> dict[str, Any]:
    """Every process's (parent, name, CPU seconds so far) from /proc, and the time."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                cmdline = [a for a in f.read().split("\0") if a]
        except OSError:  # gone meanwhile
            continue
        procs[int(pid)] = (int(fields[1]), _proc_name(cmdline), (int(fields[11]) + int(fields[12])) / tick)
    return {"t": time.time(), "procs": procs}


def descendants_of(parent: dict[int, int], root: int) -> set[int]:
    """`root` and every process below it, from a {pid: parent pid} map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree


def cpu_snapshots_callback(path: str, last_epoch: int) -> Any:
    """A Ray Train callback that, in the Train controller, appends a `cpu_snapshot()` to `path` at
    the reports of epochs 1 and `last_epoch`: the window between them is epochs 2..last_epoch with
    their reports, checkpoints and MLflow logging (and at most one health-check interval of lag at
    each end). The run's last epoch is left out of the window: after it MLflow's callback draws the
    curves PNG, once per run, before this callback runs. A snapshot costs a few ms of CPU. (Defined
    in a function so that the plain loop's process imports no Ray.)"""
    import ray.train

    class CpuSnapshots(ray.train.UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            epoch = int(metrics[0].get("epoch", 0)) if metrics else 0
            if epoch in (1, last_epoch):
                with open(path, "a") as f:
                    f.write(json.dumps({"epoch": epoch, **cpu_snapshot()}) + "\n")

    return CpuSnapshots()


def ray_cpu_split(path: str, root: int, cores: int) -> dict[str, Any] | None:
    """Cores used in the snapshots' window by the Train worker and by every other process of the
    run (`root`, the driver, and its descendants: GCS, raylet, agents, Train's actors)."""
    try:
        with open(path) as f:
            snaps = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return None
    if len(snaps) < 2:
        return None
    a, b = snaps[0], snaps[-1]
    tree = descendants_of({int(k): v[0] for s in (a, b) for k, v in s["procs"].items()}, root)
    seconds = b["t"] - a["t"]
    by_name: dict[str, float] = {}
    worker = 0.0
    for pid in tree:
        if str(pid) not in a["procs"] or str(pid) not in b["procs"]:
            continue  # started or ended inside the window: not counted (none should)
        _, name, cpu_b = b["procs"][str(pid)]
        used = (cpu_b - a["procs"][str(pid)][2]) / seconds
        if name == "ray::RayTrainWorker":
            worker += used
        else:
            label = "driver (this script)" if pid == root else name
            by_name[label] = by_name.get(label, 0.0) + used
    other = sum(by_name.values())
    return {"window_seconds": seconds, "cores": cores, "train_worker_cores": worker, "other_cores": other,
            "other_by_process": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))}


def run_ray(cfg: Config, cpu_file: str | None = None) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from orchestrator.pretrain import run_pretrain

    callbacks = [cpu_snapshots_callback(cpu_file, cfg.optim.epochs - 1)] if cpu_file else None  # < 3 epochs: no window
    start = time.perf_counter()
    r = run_pretrain(cfg, stem="overhead", callbacks=callbacks)
    wall = time.perf_counter() - start
    c = MlflowClient(cfg.tracking.uri)

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(c.get_metric_history(r.mlflow_run_id, key), key=lambda m: m.step)]

    return {"wall_seconds": wall, "epoch_seconds": history("epoch_seconds"), "train_seconds": history("train_seconds"),
            "torch_threads": history("torch_threads")[-1:], "knn_top1": r.knn_top1 or float("nan"),
            "loss": r.loss or float("nan"),
            "cpu": ray_cpu_split(cpu_file, os.getpid(), os.cpu_count() or 1) if cpu_file else None}


def run_plain(cfg: Config, threads: int) -> dict[str, Any]:
    """The same epochs in this process, no Ray: decode once, then the memory loader's batches."""
    from orchestrator.data import decode_all
    from orchestrator.probes import KnnProbe
    from orchestrator.training import (TrainBatches, build_model, build_optimizer, build_scheduler,
                                       seed_everything, steps_per_epoch, train_one_epoch)
    from pipelines.augment import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()  # as the CPU Train worker does
    start = time.perf_counter()
    device = torch.device("cpu")
    decoded = decode_all(cfg)
    seed_everything(cfg.run.seed, 0, 0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    steps = steps_per_epoch(cfg, len(decoded["train"]), 1)
    scheduler = build_scheduler(cfg, optimizer, steps)
    batches = TrainBatches(cfg, decoded, device, rank=0, world=1)
    probe = KnnProbe(cfg, device, decoded)
    probe(model.encoder)  # the Ray side computes knn_top1_untrained once too
    epochs, train = [], []
    cpu_marks: list[tuple[float, float]] = []  # (wall, CPU seconds of this process) after epochs 1 and n-1
    for epoch in range(1, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        epoch_seed = seed_everything(cfg.run.seed, 0, epoch)
        stats = train_one_epoch(model, optimizer, scheduler, batches.epoch(epoch, epoch_seed), device=device,
                                first_step=(epoch - 1) * steps, total_steps=steps * cfg.optim.epochs, max_steps=steps)
        knn = probe(model.encoder)
        epochs.append(time.perf_counter() - t0)
        train.append(stats["seconds"])
        if epoch in (1, cfg.optim.epochs - 1):  # < 3 epochs: one mark, no window
            cpu_marks.append((time.perf_counter(), time.process_time()))
    cpu = None
    if len(cpu_marks) == 2:
        cpu = {"window_seconds": cpu_marks[1][0] - cpu_marks[0][0],
               "cores_used": (cpu_marks[1][1] - cpu_marks[0][1]) / (cpu_marks[1][0] - cpu_marks[0][0])}
    return {"wall_seconds": time.perf_counter() - start, "epoch_seconds": epochs, "train_seconds": train,
            "torch_threads": [torch.get_num_threads()], "knn_top1": knn["knn_top1"], "loss": stats["loss"], "cpu": cpu}


def run_plain_process(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """`run_plain` in a new Python process (this script with --plain-only)."""
    import subprocess

    out = Path(tmp) / "plain.json"
    argv = [sys.executable, __file__, "--plain-only", str(out), "--storage", tmp, "--data", args.data,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
            "--knn-bank", str(args.knn_bank), "--threads", str(args.threads)]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    subprocess.run(argv, check=True)
    return json.loads(out.read_text())


def cpu_summary(plains: list[dict[str, Any]], rays: list[dict[str, Any]], cores: int) -> dict[str, Any] | None:
    """Medians over the rounds of the cores each side used in epochs 2..n, and the floor they set."""
    splits = [r["cpu"] for r in rays if r.get("cpu")]
    plain = [p["cpu"]["cores_used"] for p in plains if p.get("cpu")]
    if not splits or not plain:
        return None
    names = {n for s in splits for n in s["other_by_process"]}
    by_name = {n: statistics.median(s["other_by_process"].get(n, 0.0) for s in splits) for n in names}
    out = {"cores": cores, "plain_training_process": statistics.median(plain),
           "ray_train_worker": statistics.median(s["train_worker_cores"] for s in splits),
           "ray_other_processes": statistics.median(s["other_cores"] for s in splits),
           "ray_other_by_process": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))}
    out["floor_ratio"] = max(1.0, out["plain_training_process"] / (cores - out["ray_other_processes"]))
    return out


def _total(xs: list[float]) -> float:
    """Epochs 2..n: epoch 1 holds first-touch costs."""
    return sum(xs[1:]) if len(xs) > 1 else sum(xs)


def _pooled(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [v for run in runs for v in run[key][1:]]


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return _total(a[key]) / _total(b[key]) if key != "wall_seconds" else a[key] / b[key]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo", help="shard folder (data/demo is ingested if missing)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="alternating plain / Ray Train rounds; best of each kept")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--limit", type=int, default=None, help="training images per epoch")
    p.add_argument("--knn-bank", type=int, default=2000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on both sides")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="skip the data.loader=stream column")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--plain-only", metavar="JSON", help=argparse.SUPPRESS)  # the baseline's own process
    p.add_argument("--storage", help=argparse.SUPPRESS)
    return p.parse_args()


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """Alternating rounds of the plain loop and the 1-worker Ray Train run, then one streamed run:
    (plain rounds, Ray rounds, the streamed run or None)."""
    from orchestrator.config import absolute_paths
    from orchestrator.data import ensure_data

    plains: list[dict[str, Any]] = []
    rays: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        cfg = absolute_paths(make_config(args, f"{tmp}/runs", f"sqlite:///{tmp}/mlflow.db", "memory"))
        ensure_data(cfg)
        # The runs' artifacts go into the temporary folder too (MLflow's default is ./mlruns in the cwd).
        tracking.ensure_experiment(cfg.tracking.uri, cfg.tracking.experiment, artifact_location=f"{tmp}/mlruns")
        for r in range(args.rounds):
            plains.append(run_plain_process(args, tmp))  # first: its decode warms the page cache for both
            rays.append(run_ray(cfg, cpu_file=f"{tmp}/cpu-{r}.jsonl"))
            print(f"round {r}: plain {_total(plains[-1]['epoch_seconds']):.2f} s, Ray Train "
                  f"{_total(rays[-1]['epoch_seconds']):.2f} s (epochs 2..n)", flush=True)
        streamed = run_ray(absolute_paths(make_config(args, f"{tmp}/runs", f"sqlite:///{tmp}/mlflow.db", "stream"))) \
            if args.stream else None
    return plains, rays, streamed


def summarise(args: argparse.Namespace, plains: list[dict[str, Any]], rays: list[dict[str, Any]],
              streamed: dict[str, Any] | None) -> dict[str, Any]:
    """The result: the best round of each side, medians over every round, the ratios, CPU use."""
    plain = min(plains, key=lambda x: _total(x["epoch_seconds"]))  # best round of each side
    ray_side = min(rays, key=lambda x: _total(x["epoch_seconds"]))
    result: dict[str, Any] = {
        "benchmark": "overhead", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1min_at_end": os.getloadavg()[0], "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "plain": plain, "ray_train_1_worker": ray_side, "ray_train_1_worker_stream": streamed,
        "rounds": {"plain": plains, "ray_train_1_worker": rays,
                   "epoch_ratio_per_round": [_total(b["epoch_seconds"]) / _total(a["epoch_seconds"])
                                             for a, b in zip(plains, rays)]},
        "median_epoch_seconds": {"plain": statistics.median(_pooled(plains, "epoch_seconds")),
                                 "ray_train": statistics.median(_pooled(rays, "epoch_seconds"))},
        "fastest_epoch_seconds": {"plain": min(_pooled(plains, "epoch_seconds")),
                                  "ray_train": min(_pooled(rays, "epoch_seconds"))},
        "median_epoch_ratio": statistics.median(_pooled(rays, "epoch_seconds"))
        / statistics.median(_pooled(plains, "epoch_seconds")),
        "fastest_epoch_ratio": min(_pooled(rays, "epoch_seconds")) / min(_pooled(plains, "epoch_seconds")),
        "best_round_epoch_ratio": _ratio(ray_side, plain, "epoch_seconds"),
        "train_ratio": _ratio(ray_side, plain, "train_seconds"),
        "end_to_end_ratio": _ratio(ray_side, plain, "wall_seconds"),
        "target_median_epoch_ratio": 1.05,
    }
    cpu = cpu_summary(plains, rays, os.cpu_count() or 1)
    if cpu is not None:
        result["cpu_cores"] = cpu
    if streamed is not None:
        result.update(stream_epoch_ratio=_ratio(streamed, plain, "epoch_seconds"),
                      stream_train_ratio=_ratio(streamed, plain, "train_seconds"),
                      stream_end_to_end_ratio=_ratio(streamed, plain, "wall_seconds"))
    return result


def _best_rounds_table(plain: dict[str, Any], ray_side: dict[str, Any], streamed: dict[str, Any] | None) -> list[str]:
    sides = [ray_side] + ([streamed] if streamed is not None else [])
    head = "| | plain loop (baseline) | Ray Train, 1 worker | ratio |"
    sep = "| --- | ---: | ---: | ---: |"
    if streamed is not None:
        head += " Ray Train, data.loader=stream | ratio |"
        sep += " ---: | ---: |"

    def row(label: str, key: str, fmt: str = "{:.1f}") -> str:
        cells = [label, fmt.format(_total(plain[key]) if key != "wall_seconds" else plain[key])]
        for side in sides:
            v = _total(side[key]) if key != "wall_seconds" else side[key]
            cells += [fmt.format(v), f"{_ratio(side, plain, key):.3f}"]
        return "| " + " | ".join(cells) + " |"

    knn = [f"{plain['knn_top1']:.3f}"] + [c for side in sides for c in (f"{side['knn_top1']:.3f}", "")]
    threads = [str(plain["torch_threads"])] + [c for side in sides for c in (str(side["torch_threads"]), "")]
    return [head, sep,
            row("epoch time (s, epochs 2..n)", "epoch_seconds"),
            row("of which training steps (s)", "train_seconds"),
            row("end to end incl. start-up (s)", "wall_seconds"),
            "| final kNN top-1 | " + " | ".join(knn) + " |",
            "| torch threads in the training process | " + " | ".join(threads) + " |"]


def _cpu_table(cpu: dict[str, Any]) -> list[str]:
    md = ["", f"CPU during epochs 2..n-1, in cores of this machine's {cpu['cores']} (from /proc; median of the "
          f"rounds; Ray side: every process of the run, the driver and its descendants):", "",
          "| | plain loop (baseline) | Ray Train, 1 worker |", "| --- | ---: | ---: |",
          f"| the training process | {cpu['plain_training_process']:.3f} | {cpu['ray_train_worker']:.3f} |",
          f"| Ray's other processes | 0 | {cpu['ray_other_processes']:.3f} |"]
    md += [f"| … {name} | | {v:.3f} |" for name, v in cpu["ray_other_by_process"].items() if v >= 0.001]
    md += ["", f"Floor this puts under the ratio: plain loop's cores / (cores − Ray's other processes) = "
           f"{cpu['plain_training_process']:.3f} / ({cpu['cores']} − {cpu['ray_other_processes']:.3f}) = "
           f"**{cpu['floor_ratio']:.3f}** (1 when the plain loop leaves room for them): the same CPU work "
           "per epoch, on the cores that Ray's own processes leave."]
    return md


def markdown(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    cmd = "python benchmarks/overhead.py " + " ".join(sys.argv[1:])
    md = [
        "# Ray Train overhead (1 worker) vs a plain loop, same code",
        "",
        f"`{cmd.strip()}` on {result['machine']} (1-min load average at the end {result['load_avg_1min_at_end']:.1f}); "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.image_size}px, {args.threads} torch threads, "
        f"best of {args.rounds} alternating rounds per side (ratios per round: "
        + ", ".join(f"{x:.3f}" for x in result["rounds"]["epoch_ratio_per_round"]) + "), "
        f"data `{args.data}`" + (f" (limit {args.limit})" if args.limit else "") + ".",
        "",
        "| | plain loop (baseline) | Ray Train, 1 worker | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| median epoch, epochs 2..n of all rounds (s) | {result['median_epoch_seconds']['plain']:.3f} | "
        f"{result['median_epoch_seconds']['ray_train']:.3f} | **{result['median_epoch_ratio']:.3f}** |",
        f"| fastest epoch (s) | {result['fastest_epoch_seconds']['plain']:.3f} | "
        f"{result['fastest_epoch_seconds']['ray_train']:.3f} | {result['fastest_epoch_ratio']:.3f} |",
        "",
        "Best round of each side:",
        "",
        *_best_rounds_table(result["plain"], result["ray_train_1_worker"], result["ray_train_1_worker_stream"]),
        "",
        "Target: median epoch ratio <= 1.05 (Ray Train vs the plain loop, both on the decoded split in memory). "
        "Epoch time = training steps + kNN probe. End to end adds Ray start-up, the Train controller and "
        "worker processes, decoding, MLflow and checkpoints. The stream column feeds the same worker "
        "through Ray Data (read, shuffle and decode every epoch on the same cores).",
    ]
    if "cpu_cores" in result:
        md += _cpu_table(result["cpu_cores"])
    return md


def main() -> None:
    args = parse_args()
    if args.plain_only:
        from orchestrator.config import absolute_paths

        cfg = make_config(args, f"{args.storage}/runs", f"sqlite:///{args.storage}/mlflow.db", "memory")
        Path(args.plain_only).write_text(json.dumps(run_plain(absolute_paths(cfg), args.threads)))
        return
    plains, rays, streamed = measure(args)
    result = summarise(args, plains, rays, streamed)
    md = markdown(args, result)
    write_results(args.out, "overhead", result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
