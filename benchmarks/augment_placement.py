"""Where should augmentation run on a CPU-only machine: in Ray Data tasks or on the Train worker?

Streams a CIFAR-10 slice (real JPEGs) through `pipelines.stream` into 2 Ray Train workers
(1 CPU each, `ray.init(num_cpus=4)` as the driver does on 2 cores) and measures two-view views/s
per epoch for `augment_on="worker"` and `augment_on="data"`, both in the same run, alternating.
Each worker also runs a small encoder forward/backward per batch (`--step`), as training would;
`--no-step` measures the data path alone.

    .venv/bin/python benchmarks/augment_placement.py [--rows 8192] [--epochs 2] [--no-step]

Writes benchmarks/results/augment_placement.json and .md. The faster mode is the CPU default
(`pipelines.stream.CPU_AUGMENT_ON`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"
BATCH = 256


def train_loop(config: dict) -> None:
    import ray.train
    import torch

    from pipelines.augment import TwoViewAugment
    from pipelines.stream import iter_two_view_batches

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    augment = TwoViewAugment(preset="simclr", size=32, seed=ray.train.get_context().get_world_rank())
    shard = ray.train.get_dataset_shard("train")
    times = []
    for epoch in range(config["epochs"]):
        t0, views = time.perf_counter(), 0
        for v1, v2 in iter_two_view_batches(shard, batch_size=BATCH, augment=augment,
                                            augment_on=config["augment_on"]):
            if config["step"]:
                loss = (model(v1) - model(v2)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            views += 2 * len(v1)
        times.append((views, time.perf_counter() - t0))
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(times))


def run(folder: Path, augment_on: str, epochs: int, step: bool, storage: Path) -> list[float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.stream import read_split

    trainer = TorchTrainer(
        train_loop, train_loop_config={"augment_on": augment_on, "epochs": epochs, "step": step,
                                       "out": str(storage / f"{augment_on}.json")},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets={"train": read_split(folder, "train", augment_on=augment_on, preset="simclr", view_size=32)},
        run_config=RunConfig(storage_path=str(storage), name=f"placement-{augment_on}-{time.time_ns()}"))
    trainer.fit()
    # rank 0's per-epoch (views, seconds); both ranks get the same number of views.
    return [2 * v / s for v, s in json.loads((storage / f"{augment_on}.json").read_text())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-step", dest="step", action="store_false")
    args = p.parse_args()

    import pyarrow.parquet as pq
    import ray

    from pipelines.ingest import ingest

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="placement-"))
    ray_tmp = tempfile.mkdtemp(prefix="selfsup-ray-", dir="/tmp")
    try:
        src = work / "source"
        src.mkdir()
        table = pq.read_table(CIFAR10 / "train-00000-of-00005.parquet").slice(0, args.rows + 1000)
        pq.write_table(table.slice(0, args.rows), src / "train-00000-of-00001.parquet")
        pq.write_table(table.slice(args.rows), src / "test-00000-of-00001.parquet")
        ingest(str(src), work / "shards", progress=False)
        (work / "runs").mkdir()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
        results: dict[str, list[float]] = {"worker": [], "data": []}
        for _ in range(args.rounds):  # alternate, so background load hits both alike
            for mode in ("worker", "data"):
                rates = run(work / "shards", mode, args.epochs, args.step, work / "runs")
                results[mode] += rates[1:] if len(rates) > 1 else rates  # first epoch = warm-up
                print(mode, [round(r) for r in rates], flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    best = {m: max(r) for m, r in results.items()}
    median = {m: statistics.median(r) for m, r in results.items()}
    ratio = median["worker"] / median["data"]
    out = {"rows": args.rows, "batch_per_worker": BATCH, "workers": 2, "train_step": args.step,
           "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
           "views_per_second": results, "best_views_per_second": best,
           "median_views_per_second": median, "worker_over_data": ratio,
           "faster": "worker" if ratio >= 1 else "data"}
    res = REPO / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    write_results(res, "augment_placement", out, markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    rows = "".join(f"| {m} | {out['median_views_per_second'][m]:,.0f} | {out['best_views_per_second'][m]:,.0f} | "
                   f"{', '.join(f'{v:,.0f}' for v in out['views_per_second'][m])} |\n" for m in ("worker", "data"))
    return ("| augment_on | views/s median | best | every measured epoch |\n| --- | --- | --- | --- |\n" + rows +
            f"\nworker / data (medians) = {out['worker_over_data']:.2f}; 2 Train workers x 1 CPU, batch "
            f"{out['batch_per_worker']}, train step {out['train_step']}, {out['rows']} CIFAR-10 rows, "
            f"load avg {out['load_avg_1min']:.1f} on {out['cpu_count']} cores\n")


if __name__ == "__main__":
    main()
