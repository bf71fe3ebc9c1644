"""One SimCLR training step, eager against `torch.compile` (`optim.compile`), with FLOPs and MFU.

What `optim.compile: auto` rests on for CPU: per model, the steady step time eager and compiled
(random views, no data or augmentation: the step alone), alternating rounds, best round kept; the
compile time (the compiled model's first step minus a steady one) apart; the FLOPs of a step
(`benchmarks/mfu.py`) and, on a GPU with a known peak, the MFU.

    .venv/bin/python benchmarks/train_step.py [--device cpu] [--steps 5] [--rounds 2]

Models: the demo's ConvNet at 28 px, batch 128 per worker (`configs/demo.yaml`), and the CIFAR-stem
ResNet-18 of `configs/cifar10-simclr.yaml` at 32 px (batch 32 on CPU, 512 on a GPU). Writes
benchmarks/results/train_step.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from mfu import mfu, peak_tflops, step_flops  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.training import autocast, build_model, build_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, views: tuple[torch.Tensor, torch.Tensor],
           n: int, device: torch.device) -> float:
    """Seconds per step over n steps (after a sync)."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        with autocast(device):
            loss = model(*views)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return (time.perf_counter() - t) / n


def measure(config: str, overrides: list[str], size: int, batch: int, device: torch.device, steps: int,
            rounds: int) -> dict[str, Any]:
    cfg = load_config(config, overrides, check=False)
    torch.manual_seed(0)
    eager = build_model(cfg).to(device)
    if device.type == "cuda":
        eager = eager.to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    opts = {"eager": build_optimizer(cfg, eager), "compiled": build_optimizer(cfg, compiled)}
    g = torch.Generator().manual_seed(0)
    views = tuple(torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(2))
    if device.type == "cuda":
        views = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
    first = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        first[name] = _steps(model, opts[name], views, 1, device)  # compile, cuDNN autotune, allocator
    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(rounds):
        for name, model in (("eager", eager), ("compiled", compiled)):
            best[name] = min(best[name], _steps(model, opts[name], views, steps, device))

    def loss() -> torch.Tensor:
        with autocast(device):
            return eager(*views)["loss"]

    flops = step_flops(loss)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"encoder": cfg.model.encoder, "batch": batch, "size": size,
            "eager_step_seconds": best["eager"], "compiled_step_seconds": best["compiled"],
            "compiled_over_eager": best["compiled"] / best["eager"],
            "compile_seconds": max(0.0, first["compiled"] - best["compiled"]),
            "flops_per_step": flops, "tflops_per_second_compiled": flops / best["compiled"] / 1e12,
            "mfu_eager": mfu(flops, best["eager"], name), "mfu_compiled": mfu(flops, best["compiled"], name)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    cases = [("demo ConvNet", str(REPO / "configs" / "demo.yaml"), [], 28, 128),
             ("ResNet-18 CIFAR stem", str(REPO / "configs" / "cifar10-simclr.yaml"), [], 32, 512 if gpu else 32)]
    rows = []
    for label, config, overrides, size, batch in cases:
        row = {"model": label, **measure(config, overrides, size, batch, device, args.steps, args.rounds)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "peak_bf16_tflops": peak_tflops(name), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"# One SimCLR training step, eager vs torch.compile ({name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)", "",
          "| model | batch | eager s/step | compiled s/step | compiled / eager | compile s | GFLOP/step | MFU eager | MFU compiled |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        md.append(f"| {r['model']} | {r['batch']} | {r['eager_step_seconds']:.4f} | {r['compiled_step_seconds']:.4f} | "
                  f"{r['compiled_over_eager']:.2f} | {r['compile_seconds']:.1f} | {r['flops_per_step'] / 1e9:.1f} | "
                  f"{fmt(r['mfu_eager'])} | {fmt(r['mfu_compiled'])} |")
    md += ["", f"Command: `python benchmarks/train_step.py --device {args.device} --steps {args.steps} --rounds {args.rounds}`"]
    write_results(args.out, "train_step", result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
