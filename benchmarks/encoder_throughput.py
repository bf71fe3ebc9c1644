"""Training throughput of the encoders: SimCLR steps (forward + backward + SGD) in views/s on CPU.

One step is a batch of 256 images, i.e. 512 views of 32x32, through `methods.SimCLR` (paper
projector, NT-Xent) and an SGD-with-momentum update. The encoders are timed in interleaved rounds
so that both see the same machine load; the table gives each one's views/s, its ratio to the 1,000
views/s the small ConvNet must reach on 2 cores (issue 2), and its ratio to ResNet-18 with the
CIFAR stem measured in the same run. On a shared machine the wall-clock rate drops with the load
of other processes, so the process CPU time is recorded too: views per CPU-second x threads is what
the same threads would reach with the cores to themselves (if they scale; spinning threads make it
an underestimate rather than an overestimate).

    .venv/bin/python benchmarks/encoder_throughput.py [--rounds 3] [--threads 2]

Writes benchmarks/results/encoder_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from methods import SimCLR, build_encoder  # noqa: E402

TARGET_VIEWS_PER_S = 1000.0
BASELINE = "resnet18-cifar"
# name -> (encoder, cifar_stem, timed steps per round)
ENCODERS = {"convnet": ("convnet", False, 4), "resnet18-cifar": ("resnet18", True, 1)}


def _stepper(name: str, batch: int, size: int):  # type: ignore[no-untyped-def]
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (2 views each)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    steppers = {name: _stepper(name, args.batch_size, args.size) for name in ENCODERS}
    for step in steppers.values():  # warm-up: allocator, oneDNN primitive caches
        step()
    seconds = {name: 0.0 for name in ENCODERS}
    cpu_seconds = {name: 0.0 for name in ENCODERS}
    steps = {name: 0 for name in ENCODERS}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, step in steppers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(ENCODERS[name][2]):
                step()
            seconds[name] += time.perf_counter() - t0
            cpu_seconds[name] += time.process_time() - c0
            steps[name] += ENCODERS[name][2]
    views_per_s = {n: steps[n] * 2 * args.batch_size / seconds[n] for n in ENCODERS}
    views_per_cpu_s = {n: steps[n] * 2 * args.batch_size / cpu_seconds[n] for n in ENCODERS}
    rows = [{"encoder": n, "views_per_second": round(views_per_s[n], 1), "steps": steps[n],
             "seconds": round(seconds[n], 2), "cpu_seconds": round(cpu_seconds[n], 2),
             "views_per_cpu_second": round(views_per_cpu_s[n], 1),
             "views_per_second_cores_to_itself": round(views_per_cpu_s[n] * args.threads, 1),
             "ratio_to_target": round(views_per_s[n] / TARGET_VIEWS_PER_S, 2),
             f"ratio_to_{BASELINE}": round(views_per_s[n] / views_per_s[BASELINE], 2)}
            for n in ENCODERS]
    result = {
        "benchmark": "encoder_throughput",
        "what": "SimCLR training step (forward+backward+SGD), views/s, CPU",
        "batch_images": args.batch_size, "views_per_step": 2 * args.batch_size, "size": args.size,
        "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "target_views_per_second": TARGET_VIEWS_PER_S, "baseline": BASELINE, "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "encoder_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"SimCLR training step on CPU ({args.threads} threads), batch {args.batch_size} images = "
        f"{2 * args.batch_size} views of {args.size}x{args.size}; torch {torch.__version__}; "
        f"1-min load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}.",
        "",
        f"| encoder | views/s (wall) | vs 1,000 views/s target | vs {BASELINE} "
        f"| views/CPU-s x {args.threads} threads | vs target |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['encoder']} | {r['views_per_second']:,.0f} | {r['ratio_to_target']:.2f}x | "
              f"{r[f'ratio_to_{BASELINE}']:.2f}x | {r['views_per_second_cores_to_itself']:,.0f} | "
              f"{r['views_per_second_cores_to_itself'] / TARGET_VIEWS_PER_S:.2f}x |" for r in rows]
    (args.out_dir / "encoder_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
