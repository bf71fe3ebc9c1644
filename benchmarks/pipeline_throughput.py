"""Two-view augmented views per second from the CIFAR-10 shards: selfsup's pipeline vs the PIL baseline.

Every row decodes real CIFAR-10 JPEGs and makes two 32x32 views per image with the same preset
(SimCLR, CIFAR convention: crop (0.08, 1), flip, jitter 0.8 x (0.4, 0.4, 0.4, 0.1), grayscale 0.2,
no blur), then normalises. The encoded bytes are read from the shards into memory first (not
timed, for every row alike).

Rows, measured in one run, alternating in rounds so background load hits all alike (best round kept):
  baseline     torchvision transforms on PIL images in a DataLoader with 2 workers (solo-learn /
               lightly without DALI);
  selfsup_plain_loop  the headline: one Python thread in a plain loop calling
               `pipelines.decode.decode_and_augment(batch_bytes, TwoViewAugment)`, which spreads each
               batch's decode and augmentation over `torch.get_num_threads()` threads (the default:
               one per core);
  selfsup_plain_loop_decode_on_caller  the same loop with `decode_batch` (decode on the calling
               thread, as before `pipelines.decode`) + `TwoViewAugment` (its rows still split);
  selfsup_plain_loop_1_thread  `decode_and_augment(..., threads=1)`: all on one core; the cores
               times this is what the plain loop can reach on this machine (the floor of its cost);
  selfsup      in-process: batched `torchvision.io.decode_jpeg` + `TwoViewAugment` (its CPU
               backend, the numba kernel), 2 Python threads each decoding and augmenting its own
               batches (1 intra-op thread each);
  selfsup_torch_ops  the same with `TwoViewAugment(backend="torch")` (the PyTorch ops, as on a GPU);
  selfsup_dataloader  the same work per batch of 512 in a DataLoader with 2 worker processes (views
               come back through shared memory), as a CPU training loop without Ray would use it;
  kornia       the same decode, then `kornia.augmentation` 0.9 with the same preset, same 2 threads;
  ray_data     `pipelines.stream.read_split(augment_on="data")` on a local Ray (num_cpus=4):
               shuffle, decode and augment inside Ray Data, iterated by the driver;
  selfsup_decoded_once  not decode + augment: what an epoch after the first costs with
               `data.loader=memory` (the split decoded once; each epoch gathers shuffled batches
               from the uint8 array and augments them, 2 threads). Reported apart from the target.
Plus augmentation alone on an already-decoded batch, per op, selfsup vs kornia (`ops`), and with
`--device cuda` (or `--gpu`) the same augmentation on the GPU (`device_views_per_second`).

    .venv/bin/python benchmarks/pipeline_throughput.py [--images 10000] [--rounds 3] [--gpu] [--no-ray]

Writes benchmarks/results/pipeline_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from pipelines import augment as A  # noqa: E402
from pipelines.decode import decode_and_augment, decode_batch_threaded  # noqa: E402
from pipelines.images import decode_batch  # noqa: E402

BATCH = 512
CORE_THREADS = torch.get_num_threads()  # PyTorch's default (one per core), before any row changes it
PRESET = "simclr"
SIZE = 32
warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision 0.29 io -> TorchCodec notice
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def load_bytes(folder: Path, n: int) -> list[bytes]:
    """The first ``n`` encoded training images (bytes), read from the shards."""
    out: list[bytes] = []
    for f in sorted(folder.glob("train-*.parquet")):
        out += pq.read_table(f, columns=["image"]).column("image").to_pylist()
        if len(out) >= n:
            break
    if len(out) < n:
        raise SystemExit(f"only {len(out)} training images in {folder}, asked for {n}")
    return out[:n]


# ------------------------------------------------------------------------------- baseline: PIL

class PILTwoViews(torch.utils.data.Dataset):
    """The per-image path: PIL decode, torchvision transforms twice (solo-learn/lightly style)."""

    def __init__(self, data: list[bytes]) -> None:
        from torchvision import transforms as T

        self.data = data
        s = A.resolve_views(PRESET, SIZE)[0]
        b, c, sat, h = s.jitter
        self.transform = T.Compose([
            T.RandomResizedCrop(SIZE, scale=s.crop_scale, ratio=s.crop_ratio),
            T.RandomHorizontalFlip(s.flip_prob),
            T.RandomApply([T.ColorJitter(b, c, sat, h)], p=s.jitter_prob),
            T.RandomGrayscale(s.grayscale_prob),
            T.ToTensor(),
            T.Normalize(A.MEAN, A.STD),
        ])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        img = Image.open(io.BytesIO(self.data[i])).convert("RGB")
        return self.transform(img), self.transform(img)


def run_baseline(data: list[bytes]) -> float:
    torch.set_num_threads(2)
    loader = torch.utils.data.DataLoader(PILTwoViews(data), batch_size=256, num_workers=2)
    t0, views = time.perf_counter(), 0
    for v1, v2 in loader:  # worker start-up included, as in every non-persistent epoch
        views += len(v1) + len(v2)
    return views / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------- selfsup in-process

def decode(data: list[bytes]) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in data]
    return torch.stack(decode_jpeg(tensors, mode=ImageReadMode.RGB))


def _in_threads(n_items: int, batch: Callable[[int], torch.Tensor], work: Callable[[torch.Tensor], object],
                threads: int) -> float:
    """``threads`` Python threads (1 intra-op thread each) run ``work(batch(start))`` over their
    share of the batch starts; returns views/s (two per image)."""
    torch.set_num_threads(1)
    starts = list(range(0, n_items, BATCH))

    def worker(k: int) -> None:
        for s in starts[k::threads]:
            work(batch(s))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return 2 * n_items / (time.perf_counter() - t0)


def run_threads(data: list[bytes], work: Callable[[torch.Tensor], object], threads: int) -> float:
    """Each thread decodes and augments its own batches of encoded images."""
    return _in_threads(len(data), lambda s: decode(data[s:s + BATCH]), work, threads)


def run_plain_loop(data: list[bytes], decode_augment: Callable[[list[bytes]], object]) -> float:
    """One Python thread, batch after batch, PyTorch's default thread count: views/s."""
    torch.set_num_threads(CORE_THREADS)
    t0 = time.perf_counter()
    for s in range(0, len(data), BATCH):
        decode_augment(data[s:s + BATCH])
    return 2 * len(data) / (time.perf_counter() - t0)


def run_decode_only(data: list[bytes], threads: int) -> float:
    """`decode_batch_threaded` alone, batch after batch from one Python thread: images/s."""
    t0 = time.perf_counter()
    for s in range(0, len(data), BATCH):
        decode_batch_threaded(data[s:s + BATCH], threads=threads)
    return len(data) / (time.perf_counter() - t0)


def run_decoded_once(images: torch.Tensor, work: Callable[[torch.Tensor], object], threads: int) -> float:
    """Augment shuffled batches gathered from an already decoded uint8 array (``data.loader=memory``)."""
    order = torch.randperm(len(images))
    return _in_threads(len(images), lambda s: images[order[s:s + BATCH]], work, threads)


class BatchedTwoViews(torch.utils.data.Dataset):
    """One item = one decoded, augmented batch; the augmenter is made in the worker (seed=None draws
    from torch's RNG, which the DataLoader seeds per worker, so workers don't repeat each other)."""

    def __init__(self, data: list[bytes]) -> None:
        self.data = data
        self.aug: A.TwoViewAugment | None = None

    def __len__(self) -> int:
        return (len(self.data) + BATCH - 1) // BATCH

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.aug is None:
            self.aug = A.TwoViewAugment(PRESET, SIZE)
        with torch.no_grad():
            return self.aug(decode(self.data[k * BATCH:(k + 1) * BATCH]))


def run_batched_loader(data: list[bytes]) -> float:
    torch.set_num_threads(2)
    loader = torch.utils.data.DataLoader(BatchedTwoViews(data), batch_size=None, num_workers=2)
    t0, views = time.perf_counter(), 0
    for v1, v2 in loader:
        views += len(v1) + len(v2)
    return views / (time.perf_counter() - t0)


def kornia_pipeline() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    import kornia.augmentation as K

    s = A.resolve_views(PRESET, SIZE)[0]
    b, c, sat, h = s.jitter
    seq = K.AugmentationSequential(
        K.RandomResizedCrop((SIZE, SIZE), scale=s.crop_scale, ratio=s.crop_ratio),
        K.RandomHorizontalFlip(p=s.flip_prob),
        K.ColorJitter(b, c, sat, h, p=s.jitter_prob),
        K.RandomGrayscale(p=s.grayscale_prob),
        K.Normalize(torch.tensor(A.MEAN), torch.tensor(A.STD)),
    )

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float().div_(255)
        return seq(x), seq(x)

    return run


# ------------------------------------------------------------------------------- per op vs kornia

def op_pairs(images: torch.Tensor) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """(selfsup, kornia) callables for each op on a float batch; ours draw per-sample params too."""
    import kornia.augmentation as K

    device = images.device
    x = images.float().div_(255)
    n, _, height, width = x.shape
    g = torch.Generator(device=device).manual_seed(0)
    cfg = A.resolve_views(PRESET, SIZE, blur=True)[0]  # blur on so it can be timed (kernel 3)

    def crop() -> object:
        box = A.sample_crop_params(n, height, width, cfg.crop_scale, cfg.crop_ratio, g, device)
        return A.resized_crop(x, box, torch.rand(n, generator=g, device=device) < 0.5, SIZE)

    def jitter() -> object:
        return A.color_jitter(x, A.sample_view_params(n, height, width, cfg, g, device))

    def subset(p: float, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            y = x.clone()
            rows = torch.nonzero(torch.rand(n, generator=g, device=device) < p).squeeze(1)
            y[rows] = fn(y[rows], rows)
            return y
        return run

    sigma = 0.1 + 1.9 * torch.rand(n, generator=g, device=device)
    ours = {
        "crop+flip+resize": crop,
        "colour jitter (p=0.8)": jitter,
        "grayscale (p=0.2)": subset(0.2, lambda y, r: A.rgb_to_grayscale(y).expand(-1, 3, -1, -1)),
        "gaussian blur k=3 (p=0.5)": subset(0.5, lambda y, r: A.gaussian_blur(y, sigma[r], 3)),
        "solarize (p=0.2)": subset(0.2, lambda y, r: A.solarize(y)),
    }
    b, c, sat, h = cfg.jitter
    kornia_ops = {
        "crop+flip+resize": K.AugmentationSequential(
            K.RandomResizedCrop((SIZE, SIZE), scale=cfg.crop_scale, ratio=cfg.crop_ratio), K.RandomHorizontalFlip()),
        "colour jitter (p=0.8)": K.ColorJitter(b, c, sat, h, p=0.8),
        "grayscale (p=0.2)": K.RandomGrayscale(p=0.2),
        "gaussian blur k=3 (p=0.5)": K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=0.5),
        "solarize (p=0.2)": K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2),
    }
    pairs = {name: (ours[name], (lambda m=kornia_ops[name]: m(x))) for name in ours}
    aug = A.TwoViewAugment(PRESET, SIZE, seed=0)
    pipe = kornia_pipeline()
    pairs["whole preset, 2 views"] = (lambda: aug(images), lambda: pipe(images))
    return pairs


def time_per_image(fn: Callable[[], object], n: int, device: torch.device, repeats: int = 5) -> float:
    """Best-of-``repeats`` images/s of ``fn`` on an ``n``-image batch."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


def measure_ops(images: torch.Tensor, device: torch.device, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Per op, selfsup vs kornia, 1 intra-op thread (2 OpenMP threads on 2 busy cores mostly measure
    the scheduler), alternating, best of ``rounds`` x 5."""
    torch.set_num_threads(1)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, (ours, theirs) in op_pairs(images.to(device)).items():
            mult = 2 if name.startswith("whole") else 1  # views per image
            best = {"selfsup": 0.0, "kornia": 0.0}
            for _ in range(rounds):
                best["selfsup"] = max(best["selfsup"], mult * time_per_image(ours, len(images), device))
                best["kornia"] = max(best["kornia"], mult * time_per_image(theirs, len(images), device))
            out[name] = best
            print(f"  op {name}: selfsup {out[name]['selfsup']:,.0f} / kornia {out[name]['kornia']:,.0f} per s",
                  flush=True)
    return out


def measure_device(images: torch.Tensor, device: torch.device, batch: int) -> float:
    """Augmentation alone on ``device`` (decoded uint8 batch already there): views/s."""
    x = images.to(device)
    x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
    aug = A.TwoViewAugment(PRESET, SIZE, seed=0)
    with torch.no_grad():
        return 2 * time_per_image(lambda: aug(x), batch, device, repeats=20)


# ------------------------------------------------------------------------------- Ray Data

def run_ray(folder: Path, n_views_expected: int) -> float:
    from pipelines.stream import read_split

    ds = read_split(folder, "train", augment_on="data", preset=PRESET, view_size=SIZE, batch_size=BATCH)
    t0, views = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy"):
        views += 2 * len(batch["view1"])
    assert views == n_views_expected, (views, n_views_expected)
    return views / (time.perf_counter() - t0)


def ray_setup(data_dir: Path, n: int, work: Path) -> Path:
    import pyarrow as pa

    from pipelines.ingest import ingest

    src = work / "source"
    src.mkdir()
    table = pq.read_table(data_dir / "train-00000-of-00005.parquet")
    if n > len(table) - 500:
        table = pa.concat_tables([pq.read_table(f) for f in sorted(data_dir.glob("train-*.parquet"))])
    pq.write_table(table.slice(0, n), src / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(n, 500), src / "test-00000-of-00001.parquet")
    ingest(str(src), work / "shards", progress=False)
    return work / "shards"


# ------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=3, help="measure every row this often, alternating; keep the best")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the device-augmentation row runs (cuda when available)")
    p.add_argument("--gpu", action="store_true", help="same as --device cuda")
    p.add_argument("--gpu-batch", type=int, default=4096)
    p.add_argument("--no-ray", dest="ray", action="store_false")
    p.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                   help="leave glibc malloc's defaults (see pipelines.augment.keep_freed_memory)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args()


def measure_rounds(args: argparse.Namespace, data: list[bytes]
                   ) -> tuple[dict[str, list[float]], dict[int, list[float]]]:
    """Every pipeline row, `args.rounds` times alternating (views/s per round), and the decode
    alone on 1 and on all cores (images/s per round)."""
    rows: dict[str, list[float]] = {"baseline": [], "selfsup_plain_loop": [], "selfsup_plain_loop_decode_on_caller": [],
                                    "selfsup_plain_loop_1_thread": [], "selfsup": [], "selfsup_torch_ops": [],
                                    "selfsup_dataloader": [], "kornia": []}
    decoded = torch.cat([decode(data[s:s + BATCH]) for s in range(0, len(data), BATCH)])
    work = Path(tempfile.mkdtemp(prefix="pipeline-throughput-"))
    ray_tmp = tempfile.mkdtemp(prefix="selfsup-ray-", dir="/tmp")
    try:
        if args.ray:
            import logging

            import ray
            import ray.data

            logging.getLogger("ray.data").setLevel(logging.WARNING)
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            shards = ray_setup(args.data, args.images, work)
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp,
                     logging_level="WARNING")
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            rows["ray_data"] = []
        aug = A.TwoViewAugment(PRESET, SIZE, seed=0)
        aug_torch = A.TwoViewAugment(PRESET, SIZE, seed=0, backend="torch")
        kornia = kornia_pipeline()
        with torch.no_grad():
            aug(decoded[:BATCH])  # numba: compiled (or loaded from its cache) before any timing
        decoded_once: list[float] = []
        decode_only: dict[int, list[float]] = {t: [] for t in sorted({1, CORE_THREADS})}  # threads -> images/s
        for r in range(args.rounds):
            rows["baseline"].append(run_baseline(data))
            with torch.no_grad():
                rows["selfsup_plain_loop"].append(run_plain_loop(data, lambda b: decode_and_augment(b, aug)))
                rows["selfsup_plain_loop_decode_on_caller"].append(run_plain_loop(data, lambda b: aug(decode_batch(b))))
                rows["selfsup_plain_loop_1_thread"].append(
                    run_plain_loop(data, lambda b: decode_and_augment(b, aug, threads=1)))
                rows["selfsup"].append(run_threads(data, aug, threads=2))
                rows["selfsup_torch_ops"].append(run_threads(data, aug_torch, threads=2))
                rows["kornia"].append(run_threads(data, kornia, threads=2))
            rows["selfsup_dataloader"].append(run_batched_loader(data))
            if args.ray:
                rows["ray_data"].append(run_ray(shards, 2 * args.images))
            with torch.no_grad():
                decoded_once.append(run_decoded_once(decoded, aug, threads=2))
            for threads, rates in decode_only.items():
                rates.append(run_decode_only(data, threads))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rows.items()) + " views/s", flush=True)
    finally:
        if args.ray:
            import ray

            ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    rows["selfsup_decoded_once"] = decoded_once
    return rows, decode_only


LABELS = {
    "baseline": "PIL + torchvision transforms, DataLoader 2 workers (baseline)",
    "selfsup_plain_loop": "**selfsup: plain loop, 1 Python thread: `decode_and_augment` (decode + numba kernel "
                          f"over {CORE_THREADS} threads)**",
    "selfsup_plain_loop_decode_on_caller": "plain loop, 1 Python thread: `decode_batch` on the caller + TwoViewAugment",
    "selfsup_plain_loop_1_thread": "plain loop, all on 1 thread: `decode_and_augment(threads=1)`",
    "selfsup": "selfsup: batched decode_jpeg + TwoViewAugment (numba CPU kernel), 2 Python threads, own batches",
    "selfsup_torch_ops": "selfsup with TwoViewAugment(backend='torch') (PyTorch ops), in-process, 2 threads",
    "selfsup_decoded_once": "(not decode + augment) data.loader=memory after epoch 1: gather + augment, 2 threads",
    "selfsup_dataloader": "selfsup: the same per batch in a DataLoader with 2 workers",
    "kornia": "batched decode_jpeg + kornia.augmentation 0.9, 2 threads",
    "ray_data": "selfsup via Ray Data: read_split(augment_on='data'), local Ray num_cpus=4",
}


def markdown(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    rows, best, ops = result["views_per_second"], result["best_views_per_second"], result["ops_images_per_second_cpu"]
    md = ["| pipeline (decode + 2 views, 32x32, SimCLR CIFAR preset) | views/s | vs baseline | vs kornia |",
          "| --- | ---: | ---: | ---: |"]
    md += [f"| {LABELS[k]} | {best[k]:,.0f} | {best[k] / best['baseline']:.1f}x | {best[k] / best['kornia']:.1f}x |"
           for k in rows]
    one_core = best["selfsup_plain_loop_1_thread"]
    md += ["", f"Plain loop on {CORE_THREADS} threads: {best['selfsup_plain_loop'] / one_core:.2f}x its own rate on one "
               f"thread; {CORE_THREADS} x the one-thread rate, {CORE_THREADS * one_core:,.0f} views/s "
               f"= {CORE_THREADS * one_core / best['baseline']:.1f}x the baseline, is what perfect scaling would give "
               "in this run."]
    md += ["", f"| augmentation alone, decoded batch of {BATCH}, 1 thread | selfsup img/s | kornia img/s | selfsup / kornia |",
           "| --- | ---: | ---: | ---: |"]
    md += [f"| {k} | {v['selfsup']:,.0f} | {v['kornia']:,.0f} | {v['selfsup'] / v['kornia']:.1f}x |" for k, v in ops.items()]
    md += ["", "(\"whole preset\" is in views/s.)"]
    if result["device_views_per_second"] is not None:
        md += ["", f"Augmentation alone on {result['device']} (batch {args.gpu_batch}): "
                   f"{result['device_views_per_second']:,.0f} views/s."]
    decode_best = {k: max(v) for k, v in result["decode_only_images_per_second"].items()}
    md += ["", "Decode alone (`pipelines.decode.decode_batch_threaded`, batches of 512, one Python thread): "
               + ", ".join(f"{v:,.0f} images/s on {k} thread(s)" for k, v in decode_best.items())
               + f" ({decode_best[CORE_THREADS] / decode_best[1]:.2f}x)."]
    if not args.ray:
        md += ["", "Ray Data row not measured in this run (`--no-ray`)."]
    md += ["", f"glibc malloc keeps freed memory (`pipelines.augment.keep_freed_memory()`, all rows): "
               f"{result['malloc_tuned']}."]
    md += ["", f"`{result['command']}` on {os.cpu_count()} cores, {args.images} images, best of {args.rounds} "
               f"rounds; 1-min load average at the end {result['load_avg_1min_at_end']:.1f} "
               "(other jobs shared the cores)."]
    return md


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.gpu else args.device)
    # For every row alike: set before the DataLoader workers and Ray are started, which inherit it.
    malloc_tuned = A.keep_freed_memory() if args.malloc_tuning else False
    data = load_bytes(args.data, args.images)
    rows, decode_only = measure_rounds(args, data)

    sample = decode(data[:BATCH])
    print("per op, augmentation alone on a decoded batch of", BATCH, flush=True)
    ops = measure_ops(sample, torch.device("cpu"))
    device_rate, ops_device = None, None
    if device.type == "cuda":
        device_rate = measure_device(sample, device, args.gpu_batch)
        print(f"augmentation on {torch.cuda.get_device_name(device)}: {device_rate:,.0f} views/s", flush=True)
        ops_device = measure_ops(sample, device)
    best = {k: max(v) for k, v in rows.items()}
    command = "python benchmarks/pipeline_throughput.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(), "images": args.images, "preset": PRESET, "size": SIZE, "batch": BATCH,
        "malloc_tuned": malloc_tuned, "cpu_count": os.cpu_count(), "load_avg_1min_at_end": os.getloadavg()[0], "rounds": args.rounds,
        "views_per_second": rows, "best_views_per_second": best,
        "ratio_vs_baseline": {k: v / best["baseline"] for k, v in best.items()},
        "ratio_vs_kornia": {k: v / best["kornia"] for k, v in best.items()},
        "core_threads": CORE_THREADS,
        "decode_only_images_per_second": decode_only,
        "ops_images_per_second_cpu": ops,
        "device": str(device), "device_views_per_second": device_rate,
        "ops_images_per_second_device": ops_device,
        "torch": torch.__version__,
    }
    md = markdown(args, result)
    write_results(args.out, "pipeline_throughput", result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
