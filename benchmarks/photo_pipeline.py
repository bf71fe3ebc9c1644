"""Photo pipeline benchmark (issue 23): ingest images/s and training views/s at 224 px on photo-like JPEGs.

Parts (`--part`, one results writer for all of them):

  views   selfsup's `pipelines.decode.decode_and_augment` (each view cut from its whole photo,
          JPEG decoded at the reduced libjpeg scale the crop allows, numba augmentation) with
          `TwoViewAugment("simclr", size=224)` on `--threads` threads, one Python loop;
          against lightly's `SimCLRTransform(input_size=224)` (PIL per image, torchvision
          transforms) in a torch DataLoader with as many workers; and NVIDIA DALI's fused
          `fn.decoders.image_random_crop` on the CPU when DALI is installed (else recorded as such).
          Also the decoder choice: PIL `draft` against `simplejpeg.decode_jpeg(min_height=, min_width=)`
          for the same reduced-scale decodes.

  ingest  `selfsup ingest` of `--ingest-photos` 320-640 px JPEGs against the read + full-decode
          floor on the same cores, and the driver's peak memory at each of `--small` counts of
          small images (`benchmarks/photo_ingest.py`).

Photos: `pipelines.photos` (CIFAR-10 test images upscaled to 320-640 px sides, aspect 3:4 to 16:9,
noise, JPEG q90; the MNIST demo or synthetic shapes without ../shared), made in memory.
Rounds alternate the contenders so that the shared machine's load hits each alike; the ratio is
reported per round and as the median.

    python benchmarks/photo_pipeline.py --part views [--photos 512] [--threads 2] [--rounds 3]

Writes benchmarks/results/photo_pipeline.json and .md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from pipelines.augment import TwoViewAugment  # noqa: E402
from pipelines.decode import decode_and_augment, reduced_scale  # noqa: E402
from pipelines.photos import photo_like, small_images  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SIZE = 224
BATCH = 64


def make_photos(count: int, seed: int = 0) -> tuple[str, list[bytes]]:
    """`count` photo-like JPEGs in memory, and the source they came from."""
    source, _, pairs = small_images("auto", count, seed)
    rng = np.random.default_rng(seed)
    return source, [photo_like(image, rng) for image, _ in pairs]


# ------------------------------------------------------------------------------- views

def selfsup_views(photos: list[bytes], threads: int) -> float:
    aug = TwoViewAugment("simclr", size=SIZE, seed=0)
    decode_and_augment(photos[:BATCH], aug, threads=threads)  # numba load, pools up
    t0, views = time.perf_counter(), 0
    for s in range(0, len(photos) - BATCH + 1, BATCH):
        v1, v2 = decode_and_augment(photos[s:s + BATCH], aug, threads=threads)
        views += len(v1) + len(v2)
    return views / (time.perf_counter() - t0)


class LightlyTwoViews(torch.utils.data.Dataset):
    """lightly's SimCLR transform per image (PIL decode of the whole photo, torchvision ops)."""

    def __init__(self, photos: list[bytes]) -> None:
        from lightly.transforms import SimCLRTransform

        self.photos = photos
        self.transform = SimCLRTransform(input_size=SIZE)

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from PIL import Image

        return self.transform(Image.open(io.BytesIO(self.photos[i])).convert("RGB"))


def lightly_views(photos: list[bytes], threads: int) -> float:
    loader = torch.utils.data.DataLoader(LightlyTwoViews(photos), batch_size=BATCH, num_workers=threads,
                                         drop_last=True)
    t0, views = time.perf_counter(), 0
    for v1, v2 in loader:  # worker start-up included, as in every non-persistent epoch
        views += len(v1) + len(v2)
    return views / (time.perf_counter() - t0)


def dali_views(photos: list[bytes], threads: int) -> float:
    """DALI's fused decode + random crop on the CPU, then resize, flip, colour: SimCLR-like."""
    from nvidia.dali import fn, pipeline_def, types  # ImportError when DALI is not installed

    @pipeline_def(batch_size=BATCH, num_threads=threads, device_id=None)
    def pipe():  # type: ignore[no-untyped-def]
        jpegs = fn.external_source(source=lambda info: np.frombuffer(photos[info.idx_in_epoch % len(photos)], np.uint8),
                                   batch=False, dtype=types.UINT8)
        views = []
        for _ in range(2):
            img = fn.decoders.image_random_crop(jpegs, device="cpu", random_area=[0.08, 1.0])
            img = fn.resize(img, resize_x=SIZE, resize_y=SIZE)
            img = fn.color_twist(img, brightness=fn.random.uniform(range=[0.2, 1.8]),
                                 contrast=fn.random.uniform(range=[0.2, 1.8]))
            views.append(fn.crop_mirror_normalize(img, mirror=fn.random.coin_flip(), dtype=types.FLOAT))
        return tuple(views)

    p = pipe()
    p.build()
    t0, views = time.perf_counter(), 0
    for _ in range(len(photos) // BATCH):
        v1, v2 = p.run()
        views += len(v1) + len(v2)
    return views / (time.perf_counter() - t0)


def decoder_choice(photos: list[bytes], repeat: int = 1) -> dict[str, float]:
    """Reduced-scale decodes/s of the same photos at the scale a 224 view of ~0.5 of the area allows:
    PIL `draft` against simplejpeg's `min_height/min_width`, one thread."""
    from PIL import Image

    out: dict[str, float] = {}
    jobs = []
    for data in photos:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        side = int(min(h, w) * 0.7)
        jobs.append((data, h, w, reduced_scale([(0, 0, side, side)], [SIZE])))
    t0 = time.perf_counter()
    for _ in range(repeat):
        for data, h, w, scale in jobs:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (-(-w // scale), -(-h // scale)))
                np.asarray(im.convert("RGB"))
    out["pil_draft"] = repeat * len(jobs) / (time.perf_counter() - t0)
    try:
        import simplejpeg
    except ImportError:
        return out
    t0 = time.perf_counter()
    for _ in range(repeat):
        for data, h, w, scale in jobs:
            simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // scale), min_width=-(-w // scale))
    out["simplejpeg"] = repeat * len(jobs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for data, _, _, _ in jobs:
        with Image.open(io.BytesIO(data)) as im:
            np.asarray(im.convert("RGB"))
    out["pil_full_decode"] = len(jobs) / (time.perf_counter() - t0)
    return out


def views_part(args: argparse.Namespace) -> tuple[dict, list[str]]:
    source, photos = make_photos(args.photos)
    contenders: dict[str, Callable[[list[bytes], int], float]] = {
        "selfsup": selfsup_views, "lightly": lightly_views, "dali_cpu": dali_views}
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    missing: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            if name in missing:
                continue
            try:
                rates[name].append(fn(photos, args.threads))
            except ImportError as e:
                missing[name] = f"not installed ({e})"
            except RuntimeError as e:  # DALI installed without its CPU decoder library (nvimgcodec)
                if name != "dali_cpu":
                    raise
                missing[name] = f"did not run ({str(e).strip().splitlines()[-1][:200]})"
    ratios = [a / b for a, b in zip(rates["selfsup"], rates["lightly"])]
    decoders = decoder_choice(photos)
    result = {"photos": len(photos), "source": source, "mean_kb": sum(map(len, photos)) / len(photos) / 1024,
              "size": SIZE, "threads": args.threads, "batch": BATCH, "views_per_s": rates,
              "ratio_selfsup_over_lightly": ratios, "median_ratio": statistics.median(ratios),
              "unavailable": missing, "decoder_images_per_s": decoders}
    md = [f"## Training views at {SIZE} px ({len(photos)} photo-like JPEGs from {source}, "
          f"{result['mean_kb']:.0f} KB mean, {args.threads} threads / workers, batch {BATCH})", "",
          "| pipeline | views/s per round | median |", "|---|---|---|"]
    label = {"selfsup": "selfsup `decode_and_augment` (whole-photo crops, reduced-scale decode, numba)",
             "lightly": "lightly `SimCLRTransform(input_size=224)` in a DataLoader",
             "dali_cpu": "DALI `fn.decoders.image_random_crop` (CPU)"}
    for name, values in rates.items():
        if values:
            md.append(f"| {label[name]} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.median(values):.0f} |")
        else:
            md.append(f"| {label[name]} | {missing.get(name, 'not run')} | |")
    md += ["", f"selfsup / lightly per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
               f"median **{result['median_ratio']:.2f}x** (target >= 2x).", "",
           "Reduced-scale JPEG decode, 1 thread (images/s): " +
           ", ".join(f"{k} {v:.0f}" for k, v in decoders.items())]
    return result, md


def ingest_part(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """`selfsup ingest` images/s against the read + decode floor, and the driver's peak memory at
    two dataset sizes (`benchmarks/photo_ingest.py`, which also runs on its own)."""
    from photo_ingest import markdown, run_ingest_benchmark  # this folder (the script's) is on sys.path

    result = run_ingest_benchmark(RESULTS, photos=args.ingest_photos, small=tuple(args.small))
    return result, markdown(result).splitlines()


PARTS: dict[str, Callable[[argparse.Namespace], tuple[dict, list[str]]]] = {"views": views_part,
                                                                             "ingest": ingest_part}


def _write_parts(results: dict[str, dict], md: list[str], command: str) -> None:
    """Every part's JSON and markdown in one pair of files."""
    write_results(RESULTS, "photo_pipeline", {"command": command, **results}, "\n".join([f"`{command}`", "", *md]) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--photos", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ingest-photos", type=int, default=20_000, help="ingest part: photos to ingest")
    p.add_argument("--small", type=int, nargs="*", default=[20_000, 100_000],
                   help="ingest part: counts of small images whose ingest's driver memory is measured")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    md: list[str] = []
    for name in (PARTS if args.part == "all" else [args.part]):
        results[name], lines = PARTS[name](args)
        md += [*lines, ""]
        print("\n".join(lines), flush=True)
    _write_parts(results, md, "python benchmarks/photo_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
