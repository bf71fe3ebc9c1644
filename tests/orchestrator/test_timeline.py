"""`orchestrator.timeline`: process start times and the phase split of `SELFSUP_TIMELINE` marks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.timeline import ENV, PHASES, mark, phases


def test_process_start_time_is_within_a_tick_of_the_spawn() -> None:
    before = time.time()
    out = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5)\n"
                          "from orchestrator.timeline import process_start_time; print(process_start_time())"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    after = time.time()
    start = float(out.stdout)
    # Not the moment it printed (0.5 s later) and not a whole-second boot time (up to 1 s early).
    assert before - 0.05 <= start <= after - 0.45, (before, start, after)


def test_phases_split_one_run_from_its_marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(ENV, str(path))
    mark("ignored: no run")
    t = 1000.0
    events = [("trial_start", {"process_start": t}, t + 2), ("fit_start", {}, t + 5),
              ("worker_start", {"process_start": t + 6}, t + 9), ("epoch_start", {"rank": 0, "epoch": 1}, t + 10),
              ("epoch_start", {"rank": 1, "epoch": 1}, t + 10.5), ("epoch_end", {"rank": 0, "epoch": 1}, t + 11),
              ("epoch_end", {"rank": 0, "epoch": 2}, t + 12), ("worker_start", {"process_start": t + 13}, t + 14),
              ("fit_end", {}, t + 15), ("run_end", {}, t + 15.5)]
    with path.open("a") as f:
        for name, fields, at in reversed(events):  # phases() orders by time, not by line
            f.write(json.dumps({"t": at, "pid": 1, "event": name, "run": "trial-a", **fields}) + "\n")
    got = phases(str(path))["trial-a"]
    # A restarted worker group (the second worker_start) does not move the first one's phases.
    assert got == dict(zip([label for label, _, _ in PHASES], [2.0, 3.0, 1.0, 3.0, 1.0, 2.0, 3.0, 0.5]))
