"""`manifest.json`: what a shard folder holds (DESIGN.md, "Data: shards and manifest").

A dataset on disk is a folder of Parquet shards (`train-00000-of-00003.parquet`, ...) with the
columns `image` (encoded bytes as they came), `label` (int, -1 when unlabeled) and `path` (where the
image came from), plus this manifest. Ingest writes the manifest last, so a folder without one is
never a dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write `manifest.json` atomically (temporary name, then rename) and return its path."""
    folder = Path(folder)
    final = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, final)
    return final


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check the manifest of a shard folder.

    Raises:
        DataError: the folder has no `manifest.json`, it is not valid, or a shard it lists is missing.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {folder}; run `selfsup ingest SOURCE {folder}` first")
    try:
        raw = json.loads(path.read_text())
        splits = {name: Split(files=list(s["files"]), rows=int(s["rows"]))
                  for name, s in raw.pop("splits").items()}
        known = set(Manifest.__dataclass_fields__)
        manifest = Manifest(splits=splits, **{k: v for k, v in raw.items() if k in known})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a valid selfsup manifest ({type(e).__name__}: {e}); "
                        f"run `selfsup ingest SOURCE {folder} --overwrite` again") from None
    for split in manifest.splits.values():
        for name in split.files:
            if not (folder / name).is_file():
                raise DataError(f"{folder / name} is listed in {path} but missing; "
                                f"run `selfsup ingest SOURCE {folder} --overwrite` again")
    return manifest


def split_files(folder: str | Path, split: str) -> list[Path]:
    """The shard files of one split, as absolute paths.

    Raises:
        DataError: no manifest, or the split is unknown or empty.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if split not in manifest.splits:
        raise DataError(f"split {split!r} is not in {folder / MANIFEST}; "
                        f"it has: {', '.join(sorted(manifest.splits))}")
    files = [folder.resolve() / f for f in manifest.splits[split].files]
    if not files:
        raise DataError(f"split {split!r} of {folder} is empty (0 rows)")
    return files
