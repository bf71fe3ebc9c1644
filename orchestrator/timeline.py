"""Phase timestamps for start-up profiling: `SELFSUP_TIMELINE=FILE` appends one JSON line per mark.

Off (a no-op) unless the variable is set. Every process of a run appends to the same file (the
driver, Tune's trial process, the Train controller and workers inherit the variable through Ray's
worker environment), so `benchmarks/sweep_overhead.py` can split a trial's start-up into phases.
Lines are short single `write` calls on a file opened with O_APPEND, so processes don't interleave.
"""

from __future__ import annotations

import json
import os
import time

ENV = "SELFSUP_TIMELINE"


def mark(event: str, **fields: object) -> None:
    """Append `{"t": unix time, "pid": ..., "event": event, **fields}` to $SELFSUP_TIMELINE (if set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": round(time.time(), 4), "pid": os.getpid(), "event": event, **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def process_start_time() -> float:
    """Unix time this process started (from /proc; time.time() where /proc is missing)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()
