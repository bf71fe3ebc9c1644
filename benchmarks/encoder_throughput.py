"""Training throughput of the encoders: SimCLR steps (forward + backward + SGD) in views/s on CPU.

One step is a batch of 256 images, i.e. 512 views of 32x32, through `methods.SimCLR` (paper
projector, NT-Xent) and an SGD-with-momentum update. Each (encoder, torch threads) setting is timed
in interleaved rounds so that all see the same machine load. The table gives views/s by the wall
clock, its ratio to the 1,000 views/s the small ConvNet must reach on 2 cores (issue 2), and its
ratio to ResNet-18 with the CIFAR stem at the same thread count, measured in the same run.

The development machine is shared (other processes load its 2 cores), so the process CPU time is
recorded as well: views per CPU-second x threads is what those threads reach with the cores to
themselves. With one thread that is exact up to cache effects; with two it is an underestimate
under load, because OpenMP threads spin (burning CPU time) while they wait for each other.

    .venv/bin/python benchmarks/encoder_throughput.py [--rounds 2] [--threads 1,2]

Writes benchmarks/results/encoder_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from methods import SimCLR, build_encoder  # noqa: E402

TARGET_VIEWS_PER_S = 1000.0
BASELINE = "resnet18-cifar"
# name -> (encoder, cifar_stem, timed steps per round)
ENCODERS = {"convnet": ("convnet", False, 4), "resnet18-cifar": ("resnet18", True, 1)}


def _stepper(name: str, batch: int, size: int) -> Callable[[], None]:
    enc_name, stem, _ = ENCODERS[name]
    torch.manual_seed(0)
    model = SimCLR(build_encoder(enc_name, cifar_stem=stem))
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(batch, 3, size, size, generator=g)
    x2 = torch.randn(batch, 3, size, size, generator=g)

    def step() -> None:
        loss = model(x1, x2)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (2 views each)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    steppers = {name: _stepper(name, args.batch_size, args.size) for name in ENCODERS}
    settings = [(name, t) for t in thread_counts for name in ENCODERS]
    wall = dict.fromkeys(settings, 0.0)
    cpu = dict.fromkeys(settings, 0.0)
    steps = dict.fromkeys(settings, 0)
    for t in thread_counts:  # warm-up: allocator, oneDNN primitive caches
        torch.set_num_threads(t)
        for step in steppers.values():
            step()
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, t in settings:
            torch.set_num_threads(t)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(ENCODERS[name][2]):
                steppers[name]()
            wall[name, t] += time.perf_counter() - t0
            cpu[name, t] += time.process_time() - c0
            steps[name, t] += ENCODERS[name][2]
    load_after = os.getloadavg()[0]

    rows = []
    for name, t in settings:
        views = steps[name, t] * 2 * args.batch_size
        base_views = steps[BASELINE, t] * 2 * args.batch_size
        rows.append({
            "encoder": name, "threads": t, "steps": steps[name, t],
            "views_per_second": round(views / wall[name, t], 1),
            "ratio_to_target": round(views / wall[name, t] / TARGET_VIEWS_PER_S, 3),
            f"ratio_to_{BASELINE}": round(views / wall[name, t] / (base_views / wall[BASELINE, t]), 2),
            "seconds": round(wall[name, t], 2), "cpu_seconds": round(cpu[name, t], 2),
            "views_per_second_cores_to_itself": round(views / cpu[name, t] * t, 1),
        })
    result = {
        "benchmark": "encoder_throughput",
        "what": "SimCLR training step (forward+backward+SGD), views/s, CPU",
        "batch_images": args.batch_size, "views_per_step": 2 * args.batch_size, "size": args.size,
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "target_views_per_second": TARGET_VIEWS_PER_S, "baseline": BASELINE, "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"SimCLR training step on CPU ({os.cpu_count()} cores), batch {args.batch_size} images = "
        f"{2 * args.batch_size} views of {args.size}x{args.size}; torch {torch.__version__}; "
        f"1-min load average of the machine {load_before:.1f} -> {load_after:.1f} "
        "(other processes' work competes for the cores).",
        "",
        f"| encoder | threads | views/s (wall) | vs 1,000 views/s target | vs {BASELINE} "
        "| views/CPU-s x threads | vs target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['encoder']} | {r['threads']} | {r['views_per_second']:,.0f} | "
              f"{r['ratio_to_target']:.2f}x | {r[f'ratio_to_{BASELINE}']:.1f}x | "
              f"{r['views_per_second_cores_to_itself']:,.0f} | "
              f"{r['views_per_second_cores_to_itself'] / TARGET_VIEWS_PER_S:.2f}x |" for r in rows]
    write_results(args.out_dir, "encoder_throughput", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
