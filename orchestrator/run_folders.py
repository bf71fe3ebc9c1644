"""What a run or sweep leaves in its folder: the folder's name (numbered `<stem>-<n>`, or named, and
reserved for the command: `reserve_dir`), its JSON record written whole (`write_json`), the
config comparison `--resume` makes (`config_differences`) and its checkpoints (`read_state`).
The lease that reserves a name lives in `orchestrator.reservation`.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Config
from orchestrator.errors import UserError
from orchestrator.reservation import LEASE, Lease, in_use_message, try_acquire
from orchestrator.training import load_state
from pipelines import storage

RUN_RECORD = "selfsup-run.json"  # a pretraining run's record, in its run folder


def numbered_dir(root: str | Path, *, name: str | None, stem: str, record: str, resume: bool, kind: str) -> str:
    """ROOT/NAME for a run or a sweep (`kind`), ROOT a local folder or a URI: NAME is `name`, else the
    next free `<stem>-<n>`; with `resume`, the named or newest folder that holds its `record` file.
    Raises `UserError`."""
    root = str(root)
    if name is not None:
        d = storage.join(root, name)
        if resume and not storage.is_file(storage.join(d, record)):
            raise UserError(f"--resume: there is no {kind} {name!r} under {root} to continue "
                            f"(leave out --resume to start it)")
        if not resume and storage.exists(d):
            raise UserError(f"{kind}.name = {name!r}: {d} exists already; continue it with --resume, "
                            f"or choose another {kind}.name")
        return d
    pattern = re.compile(rf"^{re.escape(stem)}-(\d+)$")
    taken = storage.list_names(root)
    numbers = sorted(int(m.group(1)) for p in taken
                     if (m := pattern.match(p)) and storage.is_file(storage.join(root, p, record)))
    if resume:
        if not numbers:
            raise UserError(f"--resume: no {stem}-<n> {kind} under {root} to continue "
                            f"(set {kind}.name to pick one)")
        return storage.join(root, f"{stem}-{numbers[-1]}")
    n = (numbers[-1] + 1) if numbers else 1
    while f"{stem}-{n}" in taken:
        n += 1
    return storage.join(root, f"{stem}-{n}")


def reserve_dir(root: str | Path, *, name: str | None, stem: str, record: str, resume: bool,
                kind: str) -> tuple[str, Lease]:
    """`numbered_dir`, and the name reserved for this command (`orchestrator.reservation`): a lease
    created if absent before Ray and MLflow start, so two commands never share a folder. An automatic
    name another command holds is skipped; a name the user gave, or `--resume` of a run that another
    command still runs, is a `UserError` (one line). Returns (the folder, the held lease)."""
    for _ in range(1000):
        # A new named run: its lease decides (a folder holding only a lease is a command starting).
        d = (storage.join(str(root), name) if name is not None and not resume else
             numbered_dir(root, name=name, stem=stem, record=record, resume=resume, kind=kind))
        lease, holder = try_acquire(d)
        if lease is None:
            if name is not None or resume:
                raise UserError(in_use_message(kind, storage.name(d), holder or {}))
            continue  # taken by a command that started at the same moment: the next number
        if not resume and [n for n in storage.list_names(d) if not n.startswith(LEASE)]:
            lease.release()  # filled (and released) by another command since the listing
            if name is not None:
                raise UserError(f"{kind}.name = {name!r}: {d} exists already; continue it with --resume, "
                                f"or choose another {kind}.name")
            continue
        return d, lease
    raise UserError(f"{root}: no free {stem}-<n> {kind} name after 1000 tries")


def read_json(location: str) -> dict[str, Any] | None:
    """A JSON record (local or in an object store), or None when it is not there."""
    return json.loads(storage.read_text(location)) if storage.is_file(location) else None


def write_json(location: str, record: dict[str, Any]) -> None:
    """Write a record whole (`storage.write_text` is atomic: a reader never sees half of one)."""
    storage.write_text(location, json.dumps(record, indent=2, default=str) + "\n")


def config_differences(a: Config, b: Config) -> list[str]:
    fa, fb = a.flat(), b.flat()
    return [f"{k} ({fa[k]!r} -> {fb[k]!r})" for k in fa if k != "run.name" and fa[k] != fb[k]]


def read_state(location: str) -> dict[str, Any]:
    """A checkpoint file (local or in an object store), loaded without unpickling code."""
    return load_state(io.BytesIO(storage.read_bytes(location)))


@dataclass
class RunPaths:
    """Where a run lives: Ray Train's run folder (checkpoints) and its record."""

    name: str
    storage_path: str
    run_dir: str  # a local folder or a URI
    lease: Lease | None = None  # the name's reservation, held while this command runs

    @property
    def record(self) -> str:
        return storage.join(self.run_dir, RUN_RECORD)
