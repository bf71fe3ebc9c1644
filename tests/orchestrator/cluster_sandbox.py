"""Process and file housekeeping for the `ray up` test (tests/orchestrator/test_cluster.py).

`ray down` and the cluster's start commands run a plain `ray stop`, which kills every Ray process
on the machine: other tests' clusters too. Inside the test's sandbox `ray stop` is a shell function
that runs this file instead (`python cluster_sandbox.py stop MARKER...`): it stops only the
processes of the SSH sessions that started this cluster, found by a unique path (the cluster's
Ray temp dir, its home) in one of their command lines. Linux only (reads /proc).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def _read(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    return _read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def _stat_fields(pid: int) -> list[str]:
    # /proc/PID/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces and parens.
    raw = _read(pid, "stat").decode(errors="replace")
    return raw[raw.rfind(")") + 2:].split() if raw else []


def session_id(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[3]) if len(f) > 3 else None


def parent_id(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[1]) if len(f) > 1 else None


def alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return bool(f) and f[0] not in ("Z", "X")  # a zombie is dead, only not yet reaped


def matching(markers: Iterable[str]) -> list[int]:
    """Live processes whose command line contains one of `markers`, except this process."""
    marks = [m for m in markers if m]
    me = os.getpid()
    return [p for p in _pids() if p != me and alive(p) and any(m in cmdline(p) for m in marks)]


def children(pid: int) -> list[int]:
    return [p for p in _pids() if parent_id(p) == pid and alive(p)]


def terminate(pids: Iterable[int], grace_s: float = 10.0, sig: int = signal.SIGTERM) -> list[int]:
    """Send `sig` (SIGTERM) to `pids`, SIGKILL what is left after `grace_s`; returns the pids that
    were signalled."""
    pids = [p for p in set(pids) if p != os.getpid() and alive(p)]
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return pids


def stop_sessions(markers: Iterable[str], keep: Iterable[int] = (), grace_s: float = 10.0) -> list[int]:
    """Stop every process in the sessions of the processes that match `markers`.

    Ray's daemons rename themselves (`ray::IDLE`, `ray::DashboardAgent`), so not every process of
    the cluster names its temp dir; all of them share the session (setsid) of the SSH command that
    ran `ray start`, and gcs_server/raylet in that session do name it. The caller's own session and
    the sessions of the `keep` pids (the test runner) are never included.
    """
    spared = {session_id(os.getpid()), None, 0, 1} | {session_id(p) for p in keep}
    sessions = {session_id(p) for p in matching(markers)} - spared
    members = [p for p in _pids() if session_id(p) in sessions]
    return terminate(members, grace_s)


def session_members(markers: Iterable[str]) -> list[int]:
    """Live processes in the sessions of the processes that match `markers`."""
    sessions = {session_id(p) for p in matching(markers)} - {None, 0, 1}
    return [p for p in _pids() if session_id(p) in sessions and alive(p)]


_LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_addresses(pids: Iterable[int]) -> dict[int, list[str]]:
    """TCP listening sockets of `pids`: {pid: ["127.0.0.1:PORT" or "ADDRESS:PORT (not loopback)"]}."""
    listeners: dict[str, tuple[str, int]] = {}  # socket inode -> (hex address, port)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":  # LISTEN
                addr, port = cols[1].split(":")
                listeners[cols[9]] = (addr, int(port, 16))
    out: dict[int, list[str]] = {}
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in listeners:
                addr, port = listeners[inode]
                where = "127.0.0.1" if addr in _LOOPBACK else f"{addr} (not loopback)"
                out.setdefault(pid, []).append(f"{where}:{port}")
    return out


def main(argv: list[str]) -> int:
    keep: list[int] = []
    if argv[1:3] and argv[1] == "--keep":
        keep, argv = [int(argv[2])], argv[:1] + argv[3:]
    if len(argv) < 2 or argv[0] != "stop":
        print("usage: cluster_sandbox.py stop [--keep PID] MARKER [MARKER...]", file=sys.stderr)
        return 2
    stopped = stop_sessions(argv[1:], keep=keep, grace_s=5.0)
    print(f"cluster_sandbox: stopped {len(stopped)} processes of this test cluster (not a global `ray stop`)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
