"""Tune's saved experiment state, signed by the driver and verified before `sweep --resume` reads it.

`Tuner.restore` unpickles what Tune saved (`tuner.pkl`, the searcher's and callbacks' `*.pkl`, and
cloudpickled objects inside `experiment_state-*.json`). On a cluster that state sits in the bucket,
which every job may write. So the driver signs it: each time Tune saves (`ray_compat.
sign_after_tune_saves`) it records the sha256 of every such file, and `--resume` checks every such
file in the sweep folder against that record before Tune opens any of them; one that is unsigned
or changed stops the command with one line.

The record stays with the key, in the driver user's home (`~/.selfsup/tune-state/<sweep>.json`,
an HMAC over its contents), not in the bucket, and it remembers the last `HISTORY` saves: Tune
uploads its state folder file by file after each save, so a driver killed mid-upload leaves a
mix of this save's files and the last one's in the bucket. A signature uploaded with the state
would then be out of step with it and a killed sweep could not be resumed; a record written before
the upload that accepts any file content the driver saved recently always matches. (A file the
driver itself saved a few saves ago is no forgery; anything a job wrote is not in the record.)

The key: `~/.selfsup/state-key` (or `$SELFSUP_STATE_KEY_FILE`), 32 random bytes, mode 600, made on
first use and never overwritten (as `orchestrator.mlflow_auth` makes the MLflow credentials). On a
cluster that is the head's home, where the driver runs: worker nodes (and so Tune trials and Train
workers) never see it. It does not travel in `cluster_synced_files`. What it cannot stop: another
job whose driver also runs on the head as the same user can read it (README, "What a job can reach").
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from orchestrator.errors import UserError
from pipelines import storage

KEY_ENV = "SELFSUP_STATE_KEY_FILE"
HISTORY = 8  # saves whose files are accepted (module doc)
# What Tune's restore reads and may unpickle, by name (at the top of the sweep folder, or a trial's).
STATE_PATTERNS = ("*.pkl", "experiment_state*.json", "*-state-*.json")


def key_file() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".selfsup" / "state-key").expanduser()


def state_key() -> bytes:
    """The signing key, made (mode 600, in a mode-700 folder) if it does not exist yet."""
    path = key_file()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made by another driver a moment ago
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text().strip())


def _is_state(rel: str) -> bool:
    parts = rel.split("/")
    if any(p.startswith("checkpoint_") for p in parts[:-1]):
        return False  # model checkpoints: read by selfsup itself with torch.load(weights_only=True)
    return any(fnmatch.fnmatch(parts[-1], pat) for pat in STATE_PATTERNS)


def _state_files(root: str) -> dict[str, str]:
    """{path relative to `root`: location} of every Tune state file under `root` (a folder or URI)."""
    fs, base = storage.resolve(root)
    import pyarrow.fs as pafs

    out: dict[str, str] = {}
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):].lstrip("/")
        if _is_state(rel):
            out[rel] = storage.join(root, rel)
    return out


def _mac(key: bytes, saves: list[dict[str, str]]) -> str:
    return hmac.new(key, json.dumps(saves, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def signature_file(sweep_dir: str) -> Path:
    """Where the driver keeps the record of `sweep_dir`'s signed saves: beside its key."""
    name = hashlib.sha256(storage.absolute(sweep_dir).encode()).hexdigest()[:32]
    return key_file().parent / "tune-state" / f"{name}.json"


def _signed_saves(sweep_dir: str, key: bytes) -> list[dict[str, str]] | None:
    """The record's saves, None without a record. Raises `ValueError` for one the key did not sign."""
    path = signature_file(sweep_dir)
    if not path.exists():
        return None
    body = json.loads(path.read_text())
    saves = [{str(k): str(v) for k, v in dict(save).items()} for save in body["saves"]]
    if not hmac.compare_digest(str(body["hmac"]), _mac(key, saves)):
        raise ValueError("its HMAC does not match")
    return saves


class StateSigner:
    """`sign(staging_dir)`: record the digests of Tune's state in its staging folder (plus
    `tuner.pkl`, which Tune writes straight to the sweep folder once), before Tune uploads them."""

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir
        self.key = state_key()
        self._tuner_digest: str | None = None

    def __call__(self, staging_dir: str) -> None:
        digests = {rel: storage.sha256(loc) for rel, loc in _state_files(staging_dir).items()}
        tuner_pkl = storage.join(self.sweep_dir, "tuner.pkl")
        if self._tuner_digest is None and storage.is_file(tuner_pkl):
            self._tuner_digest = storage.sha256(tuner_pkl)
        if self._tuner_digest is not None:
            digests.setdefault("tuner.pkl", self._tuner_digest)
        try:
            saves = _signed_saves(self.sweep_dir, self.key) or []
        except (OSError, ValueError, KeyError, TypeError):
            saves = []  # unreadable or not ours: this save starts the record again
        saves = [*saves, digests][-HISTORY:]
        path = signature_file(self.sweep_dir)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"sweep_dir": self.sweep_dir, "saves": saves, "hmac": _mac(self.key, saves)}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def verify_state(sweep_dir: str) -> None:
    """Refuse (one line) Tune state in `sweep_dir` that this driver did not save as it is.

    Raises:
        UserError: no record of this sweep's saves, a record this key did not make, or a state file
            whose contents no recent save had.
    """
    where = signature_file(sweep_dir)
    hint = "it was written by something other than this sweep's driver: start a new sweep instead of --resume"
    try:
        saves = _signed_saves(sweep_dir, state_key())
    except ValueError:
        raise UserError(f"{where}: the record of Tune's saved state does not match this head's key "
                        f"({key_file()}); {hint}") from None
    except (OSError, KeyError, TypeError, AttributeError):
        raise UserError(f"{where}: unreadable record of Tune's saved state; {hint}") from None
    if saves is None:
        raise UserError(f"{sweep_dir}: this driver has no record of signing Tune's saved state ({where}); "
                        f"{hint}")
    signed = {(rel, digest) for save in saves for rel, digest in save.items()}
    names = {rel for save in saves for rel in save}
    for rel, loc in sorted(_state_files(sweep_dir).items()):
        if (rel, storage.sha256(loc)) not in signed:
            raise UserError(f"{loc}: Tune's saved state is {'changed' if rel in names else 'unsigned'} since "
                            f"this sweep's driver signed it; {hint}")
