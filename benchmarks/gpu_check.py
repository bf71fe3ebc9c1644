"""What one GPU gives: augmentation throughput on the device, and SimCLR epochs on CIFAR-10.

Two figures, each against the target the project set for a GPU machine:
  augment   `TwoViewAugment` (SimCLR preset, 32x32 views) on uint8 CIFAR-10 batches already on the
            GPU, views per second at batch 512 and 2048 (target: 100,000 views/s);
  epoch     SimCLR with a CIFAR-stem ResNet-18 (`configs/cifar10-simclr.yaml`) at batch 512 on the
            whole 50,000-image train split, one process, the same code a Ray Train GPU worker runs
            (`orchestrator.train_loop`: memory loader with the split on the GPU, views made there,
            bf16 autocast, channels_last, LARS), then the kNN probe on a 10,000-image bank.

No Ray and no MLflow: a GPU machine in this workplace has PyTorch but neither, and neither is
what these figures measure (the Ray Train overhead has its own benchmark, `overhead.py`).

    python3 benchmarks/gpu_check.py --data data/cifar10 [--epochs 2] [--out benchmarks/results/gpu_check]

Writes gpu_check.json and gpu_check.md into --out. Run by `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.data import decode_all  # noqa: E402
from orchestrator.train_loop import (KnnProbe, TrainBatches, build_model, build_optimizer,  # noqa: E402
                                     build_scheduler, seed_everything, steps_per_epoch, train_one_epoch)
from pipelines.augment import TwoViewAugment  # noqa: E402

AUGMENT_TARGET = 100_000  # views/s, issue 18


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_augment(images: torch.Tensor, batch: int, repeats: int = 30) -> float:
    """Views/s of `TwoViewAugment` on `batch` uint8 images already on the device (after warm-up)."""
    aug = TwoViewAugment("simclr", size=32, seed=0)
    x = images[:batch]
    for _ in range(3):
        aug(x)
    sync(x.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        aug(x)
    sync(x.device)
    return 2 * batch * repeats / (time.perf_counter() - t0)


def measure_epochs(data: str, epochs: int, batch_size: int, device: torch.device,
                   limit: int | None = None) -> dict[str, Any]:
    overrides = [f"data.path={data}", f"optim.batch_size={batch_size}", f"optim.epochs={epochs}",
                 f"eval.knn_train_limit={min(10000, limit or 10000)}"]
    if limit:
        overrides += [f"data.limit={limit}", f"eval.knn_test_limit={limit}"]
    cfg = load_config(str(REPO / "configs" / "cifar10-simclr.yaml"), overrides, check=False)
    t0 = time.perf_counter()
    decoded = decode_all(cfg, threads=8)
    decode_seconds = time.perf_counter() - t0
    seed_everything(cfg.run.seed, 0, 0)
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
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
                     "views_per_second": 2 * stats["images"] / seconds})
        print(f"epoch {epoch}: {seconds:.2f} s, {rows[-1]['views_per_second']:,.0f} views/s, loss {stats['loss']:.3f}",
              flush=True)
    t = time.perf_counter()
    knn = KnnProbe(cfg, device, decoded)(model.encoder)
    return {"decode_seconds": decode_seconds, "epochs": rows, "knn": knn, "knn_seconds": time.perf_counter() - t,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None, "train_rows": len(decoded["train"])}


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
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    from pipelines.memory import decode_split

    sample = torch.from_numpy(decode_split(args.data, "train", limit=2048, threads=8).images).to(device)
    augment = {str(b): measure_augment(sample, b) for b in (512, 2048)}
    for b, rate in augment.items():
        print(f"augment batch {b}: {rate:,.0f} views/s (target {AUGMENT_TARGET:,})", flush=True)
    epochs = measure_epochs(args.data, args.epochs, args.batch_size, device, args.limit)
    result = {"device": name, "limit": args.limit, "torch": torch.__version__, "augment_views_per_second": augment,
              "augment_target": AUGMENT_TARGET, "batch_size": args.batch_size, **epochs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    last = epochs["epochs"][-1]
    md = [f"# GPU check on {name} (torch {torch.__version__})", "",
          "| figure | value |", "|---|---:|"]
    md += [f"| augment, batch {b}, views/s | {r:,.0f} ({r / AUGMENT_TARGET:.2f}x the 100,000 target) |"
           for b, r in augment.items()]
    md += [f"| SimCLR ResNet-18 epoch {e['epoch']} (batch {args.batch_size}, {epochs['train_rows']:,} images), s | "
           f"{e['seconds']:.2f} ({e['views_per_second']:,.0f} views/s) |" for e in epochs["epochs"]]
    md += [f"| kNN top-1 after {len(epochs['epochs'])} epochs (bank of up to 10,000 train images) | {epochs['knn']['knn_top1']:.3f} |",
           f"| peak GPU memory, GiB | {epochs['max_memory_gib'] or 0:.1f} |", "",
           f"Command: `python3 benchmarks/gpu_check.py --data DATA --epochs {args.epochs} --batch-size {args.batch_size}`"
           f" (last epoch {last['seconds']:.2f} s)."]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
