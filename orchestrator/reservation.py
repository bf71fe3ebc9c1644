"""Reserving a run's or sweep's name: a lease file written create-if-absent before Ray and MLflow start.

A command that runs (or resumes) `<storage>/<name>` first creates `<storage>/<name>/selfsup-lease.json`
with `storage.write_new_bytes` (local: `O_EXCL`; S3: a conditional put, `If-None-Match: *`). Of two
commands that want one name at the same moment exactly one creates it; the other takes the next
free number (an automatic name) or stops with one line (a name the user gave, or `--resume`).

The lease says who holds it: host, pid, the process's start time, and when it was last renewed. A
holder renews it every `RENEW_S` seconds from a daemon thread and deletes it when the command
ends. A lease whose holder is gone is stale and may be taken over:
- same host: the pid is not running, or runs another process (its start time differs);
- another host: not renewed for `STALE_S` seconds (a killed command cannot delete its lease).

Taking over a stale lease: read it again, and if it is still the stale one, move it aside (local:
a rename to a unique name; S3: a delete) and create a fresh one create-if-absent. Two commands
taking over the same dead command's lease in the same instant are told apart by the create, except
in one window: one that read the stale lease just before the other replaced it can still move the
fresh one aside. That needs a dead holder and two resumes within milliseconds of each other.
Docs: docs/design.md, "Trust".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import UserError
from pipelines import storage

LEASE = "selfsup-lease.json"
RENEW_S = 20.0
STALE_S = 90.0  # a lease from another host not renewed for this long belongs to a dead command


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), None when it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"  # no /proc (not Linux): alive, start time unknown
    return stat.rsplit(")", 1)[1].split()[19]


def holder_alive(lease: dict[str, Any], *, now: float | None = None) -> bool:
    """Whether the command that wrote `lease` may still be running (see the module docstring)."""
    if lease.get("host") == socket.gethostname():
        started = _process_start(int(lease.get("pid", -1)))
        return started is not None and started in ("?", lease.get("process_start"))
    now = time.time() if now is None else now
    return now - float(lease.get("renewed", 0.0)) < STALE_S


@dataclass
class Lease:
    """A held lease on `run_dir`; `release()` (or the `with` block's end) deletes it."""

    run_dir: str
    token: str
    # Local folders this lease's creation made (run_dir first, then its new parents): removed again,
    # when empty, on release, so a command that stopped before writing anything leaves no trace.
    made: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def location(self) -> str:
        return storage.join(self.run_dir, LEASE)

    def _body(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
                "token": self.token, "renewed": time.time()}

    def _renew_forever(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if self._mine():
                    storage.write_text(self.location, json.dumps(self._body()))
            except Exception:  # a missed renewal only shortens the lease; the next one retries
                pass

    def _mine(self) -> bool:
        try:
            return json.loads(storage.read_text(self.location)).get("token") == self.token
        except (OSError, ValueError):
            return False

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_forever, daemon=True, name="selfsup-lease")
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this one's."""
        self._stop.set()
        if self._mine():
            storage.delete_file(self.location)
            for folder in self.made:  # innermost first; one that holds anything (a record) stays
                try:
                    os.rmdir(folder)
                except OSError:
                    break

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def try_acquire(run_dir: str) -> tuple[Lease | None, dict[str, Any] | None]:
    """Create the lease on `run_dir`; (the held lease, None), or (None, the live holder's lease).

    A stale lease (its holder gone) is taken over; see the module docstring.
    """
    lease = Lease(run_dir, uuid.uuid4().hex, made=_missing_folders(run_dir))
    for _ in range(3):
        if storage.write_new_bytes(lease.location, json.dumps(lease._body()).encode()):
            lease.start_renewing()
            return lease, None
        try:
            current = json.loads(storage.read_text(lease.location))
        except FileNotFoundError:
            continue  # released between the two calls: try again
        except (OSError, ValueError):
            current = {}  # unreadable (half-written by a process killed on a local disk): stale
        if current and holder_alive(current):
            return None, current
        _break_stale(lease.location, current)
    return None, {"host": "?", "pid": "?", "renewed": time.time()}


def _missing_folders(run_dir: str) -> list[str]:
    """`run_dir` and those of its parents that do not exist yet (local only; object stores have none)."""
    if storage.is_uri(run_dir):
        return []
    missing, folder = [], os.path.abspath(run_dir)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _break_stale(location: str, seen: dict[str, Any]) -> None:
    """Move aside the stale lease `seen` at `location`, unless it has been replaced since."""
    try:
        if json.loads(storage.read_text(location)) != seen:
            return  # another command took it over a moment ago: the caller tries again
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pass  # still unreadable: stale
    if storage.is_uri(location):
        storage.delete_file(location)
        return
    try:
        os.rename(location, f"{location}.stale-{uuid.uuid4().hex[:8]}")
    except FileNotFoundError:
        return
    for name in os.listdir(os.path.dirname(location)):
        if name.startswith(f"{LEASE}.stale-"):
            try:
                os.remove(os.path.join(os.path.dirname(location), name))
            except FileNotFoundError:
                pass


def in_use_message(kind: str, name: str, holder: dict[str, Any]) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(float(holder.get("renewed", 0.0))))
    return (f"{kind} {name!r} is in use by another command (pid {holder.get('pid')} on {holder.get('host')}, "
            f"lease renewed {since}): wait for it to end, or choose another {kind}.name")


def acquire(run_dir: str, *, kind: str) -> Lease:
    """Hold the lease on `run_dir` or raise `UserError` (one line) naming the live holder."""
    lease, holder = try_acquire(run_dir)
    if lease is None:
        raise UserError(in_use_message(kind, storage.name(run_dir), holder or {}))
    return lease
