"""Per-epoch cost of a checkpoint on an S3-compatible store against a local folder, in one run.

Every epoch, rank 0 of a Train run writes `state.pt` (model incl. momentum encoder / queue,
optimiser, scheduler, RNG, metrics; `orchestrator.training.save_state`) into a temporary folder
and `ray.train.report` hands it to Ray Train, which copies it into the run's storage with its
`_upload_to_fs_path` (pyarrow `copy_files`). This benchmark times exactly those two steps, per
epoch, for `run.storage_path` = a local folder and = `s3://BUCKET/...` on a `moto_server` on
127.0.0.1 (S3-compatible, in memory: the S3 protocol's cost without a network's), alternating
epochs so both see the same machine load. Models: the demo's (SimCLR + small ConvNet) and the
CIFAR-10 recipes' (SimCLR + ResNet-18, CIFAR stem), with AdamW state as after one step.

Reported per model: checkpoint size, median seconds per epoch for each store, and the ratio
S3 / local. A real bucket adds the network's bandwidth and latency on top (a 135 MB ResNet-18
checkpoint at 100 MB/s: ~1.4 s). Writes benchmarks/results/checkpoint_storage.json and .md.

    .venv/bin/python benchmarks/checkpoint_storage.py             # 5 epochs per store and model
    .venv/bin/python benchmarks/checkpoint_storage.py --epochs 10
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
OUT = REPO / "benchmarks" / "results"
BUCKET = "selfsup-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto_server on 127.0.0.1 (this venv's) with the bucket; returns (process, endpoint)."""
    import pyarrow.fs as pafs

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("moto_server did not start (pip install 'moto[server]')")
            time.sleep(0.3)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
    return proc, endpoint


def training_state(encoder: str) -> dict[str, Any]:
    """Model, optimiser (after one step, so AdamW holds its moments) and scheduler of a run."""
    import torch

    from orchestrator.config import Config
    from orchestrator.training import build_model, build_optimizer, build_scheduler

    cfg = Config()
    cfg.model.encoder, cfg.model.cifar_stem = encoder, encoder != "convnet"
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps=10)
    size = 28 if encoder == "convnet" else 32
    x = torch.rand(4, 3, size, size)
    model(x, x)["loss"].backward()
    optimizer.step()
    scheduler.step()
    return {"module": model, "optimizer": optimizer, "scheduler": scheduler}


def checkpoint_once(state: dict[str, Any], storage_path: str, run: str, epoch: int) -> tuple[float, int]:
    """One epoch's checkpoint as Train makes it: save_state to a temp folder, upload to the run's
    storage. Returns (seconds, bytes)."""
    from ray.train.v2._internal.execution.storage import _upload_to_fs_path

    from orchestrator.training import STATE_FILE, save_state
    from pipelines import storage

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        save_state(Path(d) / STATE_FILE, epoch=epoch, metrics={"loss": 1.0}, seed=0, history=[], **state)
        nbytes = (Path(d) / STATE_FILE).stat().st_size
        fs, path = storage.resolve(storage.join(storage_path, run, f"checkpoint_{epoch:06d}"))
        _upload_to_fs_path(d, fs, path)
    return time.perf_counter() - t0, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5, help="checkpoints per store and model")
    ap.add_argument("--models", default="convnet,resnet18")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    proc, endpoint = start_moto()
    local_root = Path(tempfile.mkdtemp(prefix="selfsup-ckpt-bench-"))
    stores = {"local": str(local_root / "runs"), "s3": f"s3://{BUCKET}/runs"}
    results: dict[str, Any] = {}
    try:
        for encoder in args.models.split(","):
            state = training_state(encoder)
            times: dict[str, list[float]] = {k: [] for k in stores}
            nbytes = 0
            checkpoint_once(state, stores["local"], f"warm-{encoder}", 0)  # first-touch costs (imports)
            checkpoint_once(state, stores["s3"], f"warm-{encoder}", 0)
            for epoch in range(1, args.epochs + 1):
                order = list(stores) if epoch % 2 else list(stores)[::-1]  # alternate: same load for both
                for store in order:
                    s, nbytes = checkpoint_once(state, stores[store], encoder, epoch)
                    times[store].append(s)
            med = {k: statistics.median(v) for k, v in times.items()}
            results[encoder] = {"checkpoint_mb": round(nbytes / 1e6, 2),
                                "local_s_per_epoch": round(med["local"], 4), "s3_s_per_epoch": round(med["s3"], 4),
                                "ratio_s3_over_local": round(med["s3"] / med["local"], 2),
                                "local_s": [round(t, 4) for t in times["local"]],
                                "s3_s": [round(t, 4) for t in times["s3"]]}
            print(f"{encoder}: {nbytes / 1e6:.1f} MB, local {med['local']:.3f} s, S3 {med['s3']:.3f} s per epoch "
                  f"(x{med['s3'] / med['local']:.2f})", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(local_root, ignore_errors=True)
    meta = {"command": "python benchmarks/checkpoint_storage.py " + " ".join(sys.argv[1:]),
            "epochs": args.epochs, "cpus": os.cpu_count(), "python": platform.python_version(),
            "store": "moto_server on 127.0.0.1 (S3 API, in memory)",
            "load_average_1m": round(os.getloadavg()[0], 1)}
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["# Checkpoint cost per epoch: S3-compatible store vs local folder", "",
             f"`{meta['command'].strip()}`; {meta['epochs']} epochs per store, alternating; median seconds "
             f"per epoch (save_state + Ray Train's upload); {meta['store']}; {meta['cpus']} cores, "
             f"load average {meta['load_average_1m']}.", "",
             "| model | checkpoint MB | local s/epoch | S3 s/epoch | S3 / local |", "| --- | --- | --- | --- | --- |"]
    for enc, r in results.items():
        lines.append(f"| {enc} | {r['checkpoint_mb']} | {r['local_s_per_epoch']:.3f} | {r['s3_s_per_epoch']:.3f} "
                     f"| {r['ratio_s3_over_local']:.2f} |")
    write_results(OUT, "checkpoint_storage", {**meta, "results": results}, "\n".join(lines) + "\n")
    print((OUT / "checkpoint_storage.md").read_text())


if __name__ == "__main__":
    main()
