"""What one GPU gives: augmentation throughput on the device, SimCLR epochs on CIFAR-10, MFU.

Figures, each against the target issue 26 set for one H200:
  augment   `TwoViewAugment` (SimCLR preset, 32x32 views) on uint8 CIFAR-10 batches already on the
            GPU, views per second at batch 512 and 2048, for the eager sync-free ops, the compiled
            view (`compile=True`) and the compiled view as a CUDA graph (`"reduce-overhead"`)
            (target: >= 300,000 views/s at batch 512), and its share of a training step (<= 10 %);
  epoch     SimCLR with a CIFAR-stem ResNet-18 (`configs/cifar10-simclr.yaml`) at batch 512 on the
            whole 50,000-image train split, one process, the same code a Ray Train GPU worker runs
            (`orchestrator.training`: memory loader with the split on the GPU, views made there,
            bf16 autocast, channels_last, foreach LARS), with `optim.compile` false and true
            (target: <= 1.5 s), the compile time apart (the first step), then the kNN probe on a
            10,000-image bank and its cost against an epoch (target: < 5 %);
  MFU       the step's FLOPs (`benchmarks/mfu.py`, FlopCounterMode) over the steady step time,
            against the chip's dense bf16 peak.

No Ray and no MLflow: a GPU machine in this workplace has PyTorch but neither, and neither is
what these figures measure (the Ray Train overhead has its own benchmark, `overhead.py`).

    python3 benchmarks/gpu_check.py --data data/cifar10 [--epochs 2] [--out benchmarks/results/gpu_check]

Writes gpu_check.json and gpu_check.md into --out. Run by `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from mfu import mfu, peak_tflops, step_flops  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.data import decode_all  # noqa: E402
from orchestrator.probes import KnnProbe  # noqa: E402
from orchestrator.training import (TrainBatches, autocast, build_model, build_optimizer,  # noqa: E402
                                   build_scheduler, compile_model, seed_everything, steps_per_epoch,
                                   train_one_epoch)
from pipelines.augment import TwoViewAugment  # noqa: E402

AUGMENT_TARGET = 300_000  # views/s at batch 512, issue 26
EPOCH_TARGET = 1.5  # s per SimCLR ResNet-18 epoch at batch 512, issue 26
AUGMENT_SHARE_TARGET = 0.10
KNN_SHARE_TARGET = 0.05


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_augment(images: torch.Tensor, batch: int, compile: bool | str, repeats: int = 30) -> float:
    """Views/s of `TwoViewAugment` on `batch` uint8 images already on the device (after warm-up)."""
    aug = TwoViewAugment("simclr", size=32, seed=0, compile=compile)
    x = images[:batch]
    for _ in range(3):
        aug(x)
    sync(x.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        aug(x)
    sync(x.device)
    return 2 * batch * repeats / (time.perf_counter() - t0)


def measure_epochs(data: str, epochs: int, batch_size: int, device: torch.device, compile: bool,
                   decoded: dict[str, Any] | None, limit: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Epochs of SimCLR with `optim.compile=compile`, then the kNN probe and the step's FLOPs/MFU;
    returns the figures and the decoded data (reused by the next call)."""
    overrides = [f"data.path={data}", f"optim.batch_size={batch_size}", f"optim.epochs={epochs}",
                 f"eval.knn_train_limit={min(10000, limit or 10000)}", f"optim.compile={str(compile).lower()}",
                 "eval.batch_size=1024"]
    if limit:
        overrides += [f"data.limit={limit}", f"eval.knn_test_limit={limit}"]
    cfg = load_config(str(REPO / "configs" / "cifar10-simclr.yaml"), overrides, check=False)
    t0 = time.perf_counter()
    if decoded is None:
        decoded = decode_all(cfg, threads=8)
    decode_seconds = time.perf_counter() - t0
    seed_everything(cfg.run.seed, 0, 0)
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    compiled = compile_model(cfg, model, device)
    optimizer = build_optimizer(cfg, model)
    steps = steps_per_epoch(cfg, len(decoded["train"]), 1)
    scheduler = build_scheduler(cfg, optimizer, steps)
    batches = TrainBatches(cfg, decoded, device, rank=0, world=1)
    rows = []
    for epoch in range(1, epochs + 1):
        sync(device)
        t = time.perf_counter()
        stats = train_one_epoch(model, optimizer, scheduler, batches.epoch(epoch, seed_everything(cfg.run.seed, 0, epoch)),
                                device=device, first_step=(epoch - 1) * steps, total_steps=steps * epochs, max_steps=steps)
        sync(device)
        seconds = time.perf_counter() - t
        rows.append({"epoch": epoch, "seconds": seconds, "steps": stats["steps"], "loss": stats["loss"],
                     "first_step_seconds": stats["first_step_seconds"],
                     "views_per_second": 2 * stats["images"] / seconds})
        print(f"compile {compile}: epoch {epoch}: {seconds:.2f} s (first step {stats['first_step_seconds']:.2f} s), "
              f"{rows[-1]['views_per_second']:,.0f} views/s, loss {stats['loss']:.3f}", flush=True)
    probe = KnnProbe(cfg, device, decoded)
    probe(model.encoder)  # warm-up (cuDNN's choice for the eval batch)
    sync(device)
    t = time.perf_counter()
    knn = probe(model.encoder)
    sync(device)
    knn_seconds = time.perf_counter() - t
    steady = rows[-1]["seconds"]
    # compile time: the first epoch's first step against a steady step
    steady_step = steady / max(1, rows[-1]["steps"])
    compile_seconds = max(0.0, rows[0]["first_step_seconds"] - steady_step) if compiled else 0.0
    # FLOPs of one step of the (uncompiled) method on a batch of views (the model's work; the views' is not counted)
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)

    def loss() -> torch.Tensor:
        with autocast(device):
            return getattr(model, "_orig_mod", model).forward(x, x.clone())["loss"]

    flops = step_flops(loss)
    optimizer.zero_grad(set_to_none=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"decode_seconds": decode_seconds, "compiled": compiled, "compile_seconds": compile_seconds,
            "epochs": rows, "steady_epoch_seconds": steady, "steady_step_seconds": steady_step,
            "knn": knn, "knn_seconds": knn_seconds, "knn_share_of_epoch": knn_seconds / steady,
            "flops_per_step": flops, "mfu": mfu(flops, steady_step, name),
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "train_rows": len(decoded["train"])}, decoded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an ingested CIFAR-10 folder (selfsup ingest)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check"))
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test this script (with --limit)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke test)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing measured")
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, peak bf16 {peak_tflops(name)} TFLOP/s", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from pipelines.memory import decode_split

    sample = torch.from_numpy(decode_split(args.data, "train", limit=2048, threads=8).images).to(device)
    augment: dict[str, dict[str, float | str]] = {}
    modes: list[bool | str] = [False, True, "reduce-overhead"] if device.type == "cuda" else [False]
    for mode in modes:
        key = {False: "eager", True: "compiled", "reduce-overhead": "cuda_graph"}[mode]  # type: ignore[index]
        augment[key] = {}
        for b in (512, 2048):
            try:
                t = time.perf_counter()
                augment[key][str(b)] = measure_augment(sample, b, mode)
                print(f"augment {key} batch {b}: {augment[key][str(b)]:,.0f} views/s "
                      f"(target {AUGMENT_TARGET:,} at 512; {time.perf_counter() - t:.0f} s with warm-up)", flush=True)
            except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others' figures
                augment[key][str(b)] = f"failed: {type(e).__name__}: {e}"
                traceback.print_exc()
    results: dict[str, Any] = {}
    decoded = None
    for compile in ([False, True] if device.type == "cuda" else [False]):
        try:
            results[str(compile).lower()], decoded = measure_epochs(args.data, args.epochs, args.batch_size, device,
                                                                    compile, decoded, args.limit)
        except Exception as e:  # noqa: BLE001
            results[str(compile).lower()] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    best = min((r for r in results.values() if "error" not in r), key=lambda r: r["steady_epoch_seconds"], default=None)
    views_512 = augment.get("compiled" if best and best["compiled"] else "eager", {}).get("512")
    share = None
    if best and isinstance(views_512, float):
        share = (2 * args.batch_size / views_512) / best["steady_step_seconds"]
    result = {"device": name, "limit": args.limit, "torch": torch.__version__, "peak_bf16_tflops": peak_tflops(name),
              "augment_views_per_second": augment, "augment_target": AUGMENT_TARGET,
              "augment_share_of_step": share, "batch_size": args.batch_size, "epochs_by_compile": results,
              "compile_ok": "error" not in results.get("true", {"error": "not run"}), "epoch_target": EPOCH_TARGET}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# GPU check on {name} (torch {torch.__version__})", "", "| figure | value |", "|---|---:|"]
    for key, by_batch in augment.items():
        for b, r in by_batch.items():
            value = f"{r:,.0f}" + (f" ({r / AUGMENT_TARGET:.2f}x the {AUGMENT_TARGET:,} target)" if b == "512" else "") \
                if isinstance(r, float) else r
            md.append(f"| augment {key}, batch {b}, views/s | {value} |")
    if share is not None:
        md.append(f"| augmentation's share of a batch-{args.batch_size} step | {100 * share:.1f} % (target <= 10 %) |")
    for compile, r in results.items():
        if "error" in r:
            md.append(f"| SimCLR ResNet-18, optim.compile={compile} | failed: {r['error']} |")
            continue
        md += [f"| SimCLR ResNet-18 epoch {e['epoch']}, optim.compile={compile} (batch {args.batch_size}, "
               f"{r['train_rows']:,} images), s | {e['seconds']:.2f} ({e['views_per_second']:,.0f} views/s) |"
               for e in r["epochs"]]
        if r["compiled"]:
            md.append(f"| compile time (first step minus a steady one), s | {r['compile_seconds']:.1f} |")
        mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        md += [f"| step FLOPs / MFU (compile={compile}) | {r['flops_per_step'] / 1e12:.2f} TFLOP / {mfu_text} |",
               f"| kNN probe (bank 10,000, test 10,000), s / share of the epoch (compile={compile}) | "
               f"{r['knn_seconds']:.2f} / {100 * r['knn_share_of_epoch']:.1f} % (target < 5 %) |",
               f"| kNN top-1 after {len(r['epochs'])} epochs (compile={compile}) | {r['knn']['knn_top1']:.3f} |",
               f"| peak GPU memory, GiB | {r['max_memory_gib'] or 0:.1f} |"]
    md += ["", f"Command: `python3 benchmarks/gpu_check.py --data DATA --epochs {args.epochs} --batch-size {args.batch_size}`"
           f" (targets: epoch <= {EPOCH_TARGET} s; augmentation >= {AUGMENT_TARGET:,} views/s and <= 10 % of a step)."]
    write_results(out, "gpu_check", result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
