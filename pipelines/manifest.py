"""`manifest.json`: what a shard folder holds (docs/design.md, "Data: shards, manifest, and two loaders").

A dataset is a folder (a local path or an object-store URI, `pipelines.storage`) of Parquet
shards (`train-00000-of-00003.parquet`, ...) with the
columns `image` (encoded bytes as they came, or re-encoded once where training's decoder would not
read them as one 8-bit RGB frame: `pipelines.images`), `label` (int, -1 when unlabeled) and `path`
(where the image came from), plus this manifest. Ingest writes the manifest last, so a folder
without one is never a dataset.

Trust: a manifest names its shards; a name that leaves the folder (absolute, `..`) is refused, and
each shard's sha256 (`checksums`) is checked before it is read (`split_files`, the one place shards
are located for reading).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines import storage
from pipelines.errors import DataError

MANIFEST = "manifest.json"
SPLITS = ("train", "test")


@dataclass
class Split:
    """The shard files of one split (names relative to the dataset folder) and their row count."""

    files: list[str]
    rows: int


@dataclass
class Manifest:
    """The contents of `manifest.json`.

    `image_size` is `[height, width]` when every image has the same size, else None.
    `skipped` lists every source image that was not ingested, as `{"path", "reason"}`.
    `converted` lists, as `{"path", "how"}`, images that training's decoder would not read as one
    8-bit RGB frame as they came (animated, 16-bit, palette, CMYK, BMP, ...); they were re-encoded
    (`pipelines.images.normalise`). All other images are stored byte for byte.
    `checksums` holds each shard's sha256, checked whenever a shard is read (`split_files`).
    `max_image_pixels` is the pixel limit ingest applied, `largest_image` the (height, width) of the
    image with the most pixels it kept.
    """

    name: str
    classes: list[str]
    splits: dict[str, Split]
    image_format: str  # "jpeg", "png", "webp", ... or "mixed"
    created_by: str
    source: str
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)
    image_size: list[int] | None = None
    max_image_pixels: int | None = None
    largest_image: list[int] | None = None
    split_from: str = "source"  # "source" (kept) or "seeded" (test_fraction + seed)
    test_fraction: float | None = None
    seed: int | None = None
    created_at: str = ""
    format_version: int = 1

    def rows(self, split: str) -> int:
        return self.splits[split].rows if split in self.splits else 0

    @property
    def labeled(self) -> bool:
        """Whether the images have classes (an ImageFolder of loose images, or Parquet without a
        label column, has none: every label is -1, and label-based metrics cannot be computed)."""
        return bool(self.classes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# The manifests read so far by this command (`read_once`), by absolute folder; None outside one.
_READ: ContextVar[dict[str, Manifest] | None] = ContextVar("selfsup_manifests_read", default=None)


@contextlib.contextmanager
def read_once() -> Iterator[None]:
    """Within this block each dataset's manifest is read, checked and its folder listed once; every
    later `read_manifest` of that folder returns the same checked manifest.

    Every `selfsup` command runs inside one (`orchestrator.cli.main`): a pretraining asks for the
    manifest from about ten places (data checks, loader choice, the kNN protocol tags, the run's
    tags), which read it 28 times before (`benchmarks/data_walk.py`). A cache scoped to the command
    rather than a manifest threaded through those call chains: the readers in `pipelines/` stay
    usable on their own, and nothing outlives the command. Writing a manifest drops its copy.
    """
    token = _READ.set({})
    try:
        yield
    finally:
        _READ.reset(token)


def write_manifest(folder: str | Path, manifest: Manifest) -> str:
    """Write `manifest.json` atomically (a local temporary name then a rename, or one object upload)
    and return its location."""
    read = _READ.get()
    if read is not None:
        read.pop(storage.absolute(folder), None)
    final = storage.join(folder, MANIFEST)
    storage.write_text(final, json.dumps(manifest.to_json(), indent=2) + "\n")
    return final


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check the manifest of a shard folder.

    Raises:
        DataError: the folder has no `manifest.json`, it is not valid, or a shard it lists is missing.
    """
    read = _READ.get()
    if read is None:
        return _read_manifest(str(folder))
    key = storage.absolute(folder)
    if key not in read:
        read[key] = _read_manifest(str(folder))
    return read[key]


def _read_manifest(folder: str) -> Manifest:
    path = storage.join(folder, MANIFEST)
    if not storage.is_file(path):
        raise DataError(f"no {MANIFEST} in {folder}; run `selfsup ingest SOURCE {folder}` first")
    try:
        text = storage.read_text(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        raw = json.loads(text)
        splits = {name: Split(files=list(s["files"]), rows=int(s["rows"]))
                  for name, s in raw.pop("splits").items()}
        known = set(Manifest.__dataclass_fields__)
        manifest = Manifest(splits=splits, **{k: v for k, v in raw.items() if k in known})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a valid selfsup manifest ({type(e).__name__}: {e}); "
                        f"run `selfsup ingest SOURCE {folder} --overwrite` again") from None
    present = set(storage.list_names(folder))  # one listing, not a request per shard on object stores
    for split_name, split in manifest.splits.items():
        for i, name in enumerate(split.files):
            _check_shard_name(path, f"splits.{split_name}.files[{i}]", name)
            if name not in present:
                raise DataError(f"{storage.join(folder, name)} is listed in {path} but missing; "
                                f"run `selfsup ingest SOURCE {folder} --overwrite` again")
    return manifest


def _check_shard_name(manifest_path: str, where: str, name: object) -> None:
    """A shard name must be a relative path inside the dataset folder: no absolute path, no `..`."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{manifest_path}: {where} = {name!r}: a shard name must be a non-empty string")
    p = PurePosixPath(name.replace("\\", "/"))
    if not p.parts or name.replace("\\", "/").split("/")[-1] in ("", ".", ".."):  # ".", "a/", "a/.": a folder
        raise DataError(f"{manifest_path}: {where} = {name!r}: a shard name must name a file inside the "
                        "dataset folder (e.g. train-00000-of-00001.parquet)")
    if p.is_absolute() or ".." in p.parts or name.startswith("~") or ":" in p.parts[0]:
        raise DataError(f"{manifest_path}: {where} = {name!r}: shard names must be relative paths inside "
                        "the dataset folder (no absolute path, no '..')")


# (location, size, mtime) of shards whose sha256 matched: each file is hashed once per process, not
# at every read (the memory loader reads a shard's labels and then its row groups; a sweep driver
# reads the same shards for every trial). A file rewritten since has another size or mtime.
_VERIFIED: set[tuple[str, int, object]] = set()


def verify_shard(folder: str, name: str, manifest: Manifest) -> str:
    """The shard's location (a local path or a URI), after checking its sha256 against the
    manifest's `checksums`.

    A shard the manifest has no checksum for (a manifest written before checksums) is not checked.

    Raises:
        DataError: the file's sha256 differs from the manifest's (one line naming the file).
    """
    path = storage.join(folder, name)
    expected = manifest.checksums.get(name)
    if expected is None:
        return path
    try:
        size, mtime = storage.size_and_mtime(path)
        key = (path, size, mtime)
        if key in _VERIFIED:
            return path
        actual = storage.sha256(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if actual != expected:
        raise DataError(f"{path}: sha256 {actual[:16]}... does not match {expected[:16]}... recorded in "
                        f"{storage.join(folder, MANIFEST)}: the shard changed after ingest; run "
                        f"`selfsup ingest SOURCE {folder} --overwrite` again")
    _VERIFIED.add(key)
    return path


def split_files(folder: str | Path, split: str, *, allow_empty: bool = False) -> list[str]:
    """The shard files of one split: absolute local paths, or URIs for a dataset in an object store;
    each checked against its sha256 (`verify_shard`).

    This is the one place shards are located before they are read (the memory and stream loaders,
    kNN, `registry embed`).

    Raises:
        DataError: no manifest, the split is unknown or empty (unless `allow_empty`), or a shard's
            sha256 does not match.
    """
    manifest = read_manifest(folder)
    if split not in manifest.splits:
        raise DataError(f"split {split!r} is not in {storage.join(folder, MANIFEST)}; "
                        f"it has: {', '.join(sorted(manifest.splits))}")
    files = [verify_shard(storage.absolute(folder), f, manifest) for f in manifest.splits[split].files]
    if not files and not allow_empty:
        raise DataError(f"split {split!r} of {folder} is empty (0 rows)")
    return files
