"""Tune's saved experiment state, signed by the driver and verified before `sweep --resume` reads it.

`Tuner.restore` unpickles what Tune saved (`tuner.pkl`, the searcher's and callbacks' `*.pkl`, and
cloudpickled objects inside `experiment_state-*.json`). On a cluster that state sits in the bucket,
which every job may write. So the driver signs it: each time Tune saves (`ray_compat.
sign_after_tune_saves`) it writes `selfsup-tune-state.sig` next to the state, an HMAC-SHA256 over the
sha256 of every such file, with a key only the driver's user holds. `--resume` checks the signature
and every such file in the sweep folder against it before Tune opens any of them; one that is
unsigned or changed stops the command with one line.

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
from typing import Any

from orchestrator.errors import UserError
from pipelines import storage

SIGNATURE = "selfsup-tune-state.sig"
KEY_ENV = "SELFSUP_STATE_KEY_FILE"
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


def _mac(key: bytes, digests: dict[str, str]) -> str:
    return hmac.new(key, json.dumps(digests, sort_keys=True).encode(), hashlib.sha256).hexdigest()


class StateSigner:
    """`sign(staging_dir)`: sign Tune's state in its staging folder (plus `tuner.pkl`, which Tune
    writes straight to the sweep folder once)."""

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
        body = {"files": digests, "hmac": _mac(self.key, digests)}
        Path(staging_dir, SIGNATURE).write_text(json.dumps(body, indent=1) + "\n")


def verify_state(sweep_dir: str) -> None:
    """Refuse (one line) Tune state in `sweep_dir` that this driver's key did not sign as it is.

    Raises:
        UserError: no signature, a signature this key did not make, or a state file that is
            unsigned or differs from what was signed.
    """
    where = storage.join(sweep_dir, SIGNATURE)
    hint = "it was written by something other than this sweep's driver: start a new sweep instead of --resume"
    try:
        body: dict[str, Any] = json.loads(storage.read_text(where))
        digests = {str(k): str(v) for k, v in dict(body["files"]).items()}
        mac = str(body["hmac"])
    except FileNotFoundError:
        raise UserError(f"{sweep_dir}: Tune's saved state has no signature ({SIGNATURE}); {hint}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{where}: unreadable signature of Tune's saved state; {hint}") from None
    if not hmac.compare_digest(mac, _mac(state_key(), digests)):
        raise UserError(f"{where}: the signature of Tune's saved state does not match this head's key "
                        f"({key_file()}); {hint}")
    for rel, loc in sorted(_state_files(sweep_dir).items()):
        if digests.get(rel) != storage.sha256(loc):
            raise UserError(f"{loc}: Tune's saved state is {'changed' if rel in digests else 'unsigned'} since "
                            f"this sweep's driver signed it; {hint}")
