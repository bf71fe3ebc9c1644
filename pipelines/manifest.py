"""`manifest.json`: what a shard folder holds (DESIGN.md, "Data: shards and manifest").

A dataset is a folder (a local path or an object-store URI, `pipelines.storage`) of Parquet shards (`train-00000-of-00003.parquet`, ...) with the
columns `image` (encoded bytes as they came), `label` (int, -1 when unlabeled) and `path` (where the
image came from), plus this manifest. Ingest writes the manifest last, so a folder without one is
never a dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    `converted` lists images whose format torchvision cannot decode (e.g. BMP, TIFF); they were
    re-encoded losslessly to PNG. All other images are stored byte for byte.
    """

    name: str
    classes: list[str]
    splits: dict[str, Split]
    image_format: str  # "jpeg", "png", "webp", ... or "mixed"
    created_by: str
    source: str
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    image_size: list[int] | None = None
    split_from: str = "source"  # "source" (kept) or "seeded" (test_fraction + seed)
    test_fraction: float | None = None
    seed: int | None = None
    created_at: str = ""
    format_version: int = 1

    def rows(self, split: str) -> int:
        return self.splits[split].rows if split in self.splits else 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_manifest(folder: str | Path, manifest: Manifest) -> str:
    """Write `manifest.json` atomically (a local temporary name then a rename, or one object upload)
    and return its location."""
    final = storage.join(folder, MANIFEST)
    storage.write_text(final, json.dumps(manifest.to_json(), indent=2) + "\n")
    return final


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check the manifest of a shard folder.

    Raises:
        DataError: the folder has no `manifest.json`, it is not valid, or a shard it lists is missing.
    """
    folder = str(folder)
    path = storage.join(folder, MANIFEST)
    if not storage.is_file(path):
        raise DataError(f"no {MANIFEST} in {folder}; run `selfsup ingest SOURCE {folder}` first")
    try:
        raw = json.loads(storage.read_text(path))
        splits = {name: Split(files=list(s["files"]), rows=int(s["rows"]))
                  for name, s in raw.pop("splits").items()}
        known = set(Manifest.__dataclass_fields__)
        manifest = Manifest(splits=splits, **{k: v for k, v in raw.items() if k in known})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a valid selfsup manifest ({type(e).__name__}: {e}); "
                        f"run `selfsup ingest SOURCE {folder} --overwrite` again") from None
    present = set(storage.list_names(folder))  # one listing, not a request per shard on object stores
    for split in manifest.splits.values():
        for name in split.files:
            if name not in present:
                raise DataError(f"{storage.join(folder, name)} is listed in {path} but missing; "
                                f"run `selfsup ingest SOURCE {folder} --overwrite` again")
    return manifest


def split_files(folder: str | Path, split: str) -> list[str]:
    """The shard files of one split: absolute local paths, or URIs for a dataset in an object store.

    Raises:
        DataError: no manifest, or the split is unknown or empty.
    """
    manifest = read_manifest(folder)
    if split not in manifest.splits:
        raise DataError(f"split {split!r} is not in {storage.join(folder, MANIFEST)}; "
                        f"it has: {', '.join(sorted(manifest.splits))}")
    root = storage.absolute(folder)
    files = [storage.join(root, f) for f in manifest.splits[split].files]
    if not files:
        raise DataError(f"split {split!r} of {folder} is empty (0 rows)")
    return files
