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
    """Unix time this process started (from /proc; time.time() where /proc is missing).

    Boot time from /proc/uptime (10 ms), not /proc/stat's `btime` (whole seconds: up to 1 s off).
    """
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            boot = time.time() - float(f.read().split()[0])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


PHASES = (
    ("trial process start -> trial function", "trial_start.process_start", "trial_start"),
    ("trial function -> trainer.fit()", "trial_start", "fit_start"),
    ("trainer.fit() -> worker process started", "fit_start", "worker_start.process_start"),
    ("worker process -> train function", "worker_start.process_start", "worker_start"),
    ("train function -> first epoch", "worker_start", "first_epoch_start"),
    ("epochs (training + kNN)", "first_epoch_start", "last_epoch_end"),
    ("last epoch -> trainer.fit() returns", "last_epoch_end", "fit_end"),
    ("fit() returned -> run closed", "fit_end", "run_end"),
)


def phases(path: str) -> dict[str, dict[str, float]]:
    """Per run (by name): the seconds of each of `PHASES` that its marks cover.

    The first worker start and first epoch of a run count (a restarted worker group adds later
    ones); epochs are rank 0's.
    """
    import math

    points: dict[str, dict[str, float]] = {}
    with open(path) as f:
        events = sorted((json.loads(line) for line in f if line.strip()), key=lambda e: e["t"])
    for e in events:
        run = e.get("run")
        if not run:
            continue
        p = points.setdefault(run, {})
        name = e["event"]
        if name == "epoch_start" and e.get("rank", 0) == 0:
            p.setdefault("first_epoch_start", e["t"])
        elif name == "epoch_end" and e.get("rank", 0) == 0:
            p["last_epoch_end"] = e["t"]
        elif name in ("trial_start", "worker_start") and name not in p:
            p[name] = e["t"]
            p[f"{name}.process_start"] = float(e.get("process_start", math.nan))
        elif name in ("fit_start", "fit_end", "run_end"):
            p.setdefault(name, e["t"])
    return {run: {label: p[b] - p[a] for label, a, b in PHASES if a in p and b in p} for run, p in points.items()}
