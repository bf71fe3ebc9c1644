"""kNN and linear-probe top-1 on the CIFAR-10 test split per method after a fixed budget on this machine.

Each method runs its recipe (`configs/cifar10-<method>.yaml`) through `selfsup pretrain`'s own
code path (`orchestrator.pretrain.run_pretrain`: Ray Train, 2 workers, MLflow) with the budget
overrides below, and reports the kNN top-1 (k=200, T=0.1, InstDisc weighted kNN) of the final
encoder on all 10,000 test images, against the untrained encoder's, and the linear probe's top-1
(`eval.linear_epochs` on frozen features of the kNN bank, scored on the same test images) that
every pretraining runs after its last epoch.

On a 2-core CPU a ResNet-18 manages ~15 images/s, so the CPU budget swaps in the small ConvNet
(`--encoder convnet`, the default here) and a subset of the training split; on a GPU pass
`--encoder resnet18 --gpu`. The recipes' 10 warm-up epochs become 1 and MoCo's queue 4,096 (the
official MoCo CIFAR-10 demo's size; 32,768 keys would be mostly random for a short run).
The ViT recipes (`mae`, `dino-vit`: `configs/cifar10-mae.yaml`, `configs/cifar10-dino-vit.yaml`)
keep their ViT-Tiny/4 whatever `--encoder` says (MAE needs a ViT), at the same budget.

    selfsup ingest ../shared/datasets/cifar10 data/cifar10        # once
    .venv/bin/python benchmarks/cifar10_knn.py --epochs 3 --limit 10000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from methods import METHODS  # noqa: E402
from orchestrator.config import load_config  # noqa: E402


# Recipes that train a ViT-Tiny/4 (their preset's encoder is kept); "dino-vit" is DINO's ViT recipe.
VIT_RECIPES = ("mae", "dino-vit")
RECIPES = [*METHODS, "dino-vit"]


def overrides(args: argparse.Namespace, method: str, tmp: str) -> list[str]:
    encoder = [] if method in VIT_RECIPES else [f"model.encoder={args.encoder}"]
    out = [f"data.path={args.data}", *encoder, f"optim.epochs={args.epochs}",
           "optim.warmup_epochs=1", f"optim.batch_size={args.batch_size}", f"scaling.num_workers={args.workers}",
           f"scaling.use_gpu={'true' if args.gpu else 'false'}", f"run.storage_path={tmp}/runs",
           f"run.name=knn-{method}", f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.experiment=cifar10-knn",
           "tracking.register=false", f"eval.knn_train_limit={args.knn_bank}"]
    if args.limit:
        out.append(f"data.limit={args.limit}")
    if method == "moco":
        out.append("method.queue_size=4096")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/cifar10", help="CIFAR-10 shard folder (selfsup ingest output)")
    p.add_argument("--methods", nargs="+", default=RECIPES, choices=RECIPES)
    p.add_argument("--encoder", default="convnet")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=10000, help="training images per epoch (0 = all 50,000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--knn-bank", type=int, default=10000, help="train images in the kNN memory bank")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    from orchestrator import tracking
    from orchestrator.pretrain import run_pretrain

    rows = []
    with tempfile.TemporaryDirectory(prefix="cifar10-knn-") as tmp:
        for method in args.methods:
            cfg = load_config(str(REPO / "configs" / f"cifar10-{method}.yaml"), overrides(args, method, tmp))
            # Artifacts (checkpointed encoders, curves) stay in the temporary folder, not ./mlruns.
            tracking.ensure_experiment(str(cfg.tracking.uri), cfg.tracking.experiment, artifact_location=f"{tmp}/mlruns")
            start = time.perf_counter()
            r = run_pretrain(cfg, progress=True)
            minutes = (time.perf_counter() - start) / 60
            rows.append({"method": method, "knn_top1": r.knn_top1, "knn_top5": r.knn_top5,
                         "knn_top1_untrained": r.knn_top1_untrained, "linear_top1": r.linear_top1,
                         "linear_top5": r.linear_top5, "epochs": r.epochs, "minutes": minutes, "loss": r.loss})
            print(f"{method}: kNN top-1 {r.knn_top1:.4f} (untrained {r.knn_top1_untrained:.4f}), linear top-1 "
                  f"{r.linear_top1 or float('nan'):.4f} in {minutes:.1f} min", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "cifar10_knn", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average_1min_at_end": os.getloadavg()[0], "config": {k: v for k, v in vars(args).items() if k != "out"},
              "results": rows}
    cmd = "python benchmarks/cifar10_knn.py " + " ".join(sys.argv[1:])
    md = ["# kNN and linear top-1 on the CIFAR-10 test split after a fixed budget", "",
          f"`{cmd.strip()}` on {result['machine']} ({'GPU' if args.gpu else 'CPU'}): encoder {args.encoder}, "
          f"{args.epochs} epochs over {args.limit or 50000:,} training images per epoch, global batch {args.batch_size}, "
          f"{args.workers} Ray Train workers; kNN k=200, T=0.1, bank {args.knn_bank:,} train images, all 10,000 test images.",
          "", "| method | kNN top-1 | top-5 | untrained encoder kNN top-1 | linear top-1 | linear top-5 | epochs | minutes |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    for r in rows:
        md.append(f"| {r['method']} | {pct(r['knn_top1'])} | {pct(r['knn_top5'])} | {pct(r['knn_top1_untrained'])} | "
                  f"{pct(r['linear_top1'])} | {pct(r['linear_top5'])} | {r['epochs']} | {r['minutes']:.1f} |")
    md += ["", "Recipes: configs/cifar10-<method>.yaml with the overrides above (warm-up 1 epoch, MoCo queue 4,096; "
           "the linear probe with the run's `eval.linear_*` defaults). "
           "Minutes are wall time per run including Ray start-up, on a shared machine "
           f"(1-min load average at the end: {result['load_average_1min_at_end']:.1f})."]
    write_results(out, "cifar10_knn", result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
