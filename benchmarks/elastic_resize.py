"""What a resize of an elastic run costs: from a lost node to the first step on the workers left,
and from a node's join to the first step on two workers, in one run.

The run is the CI case `test_elastic_run_shrinks_on_a_lost_node_and_grows_back`
(`tests/orchestrator/multinode_cases.py`): a 2-node Ray cluster on one host (a stable node and a
worker node, one Train worker each, `scaling.num_workers: [1, 2]`, S3 through `moto_server`), the
worker node killed by pid after the first checkpoint, a fresh one started once the run goes on with
one worker, the run grown back to two. This script runs that case in its own network namespace
(root only, as the test does) with `SELFSUP_TIMELINE` (every process's phase marks, among them each
worker group's first optimiser step, `group_first_step`) and `SELFSUP_ELASTIC_EVENTS` (the kill
and the join times) pointed at a temporary folder, then reads:

- shrink: kill -> first step of the one-worker group (noticing the dead node, the restart decision,
  the new group's start and its model/data set-up);
- grow: the new node's join -> first step of the two-worker group (the resize check, stopping the
  one-worker group, starting two workers);
- the run's own account (`resizes` tag: end of the last epoch before a restart -> start of the first
  epoch after it, i.e. also the epoch in flight that was thrown away);
- the baseline, in the same run: the mean two-worker epoch (`epoch_seconds`), so each figure is
  also given in epochs.

The cluster's GCS declares a node dead after ~3 s here (`RAY_health_check_period_ms=1000` x 3
misses, as the test sets); Ray's default is 5 x 3 s, which a real cluster adds to the shrink.

    sudo .venv/bin/python benchmarks/elastic_resize.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
CASE = "test_elastic_run_shrinks_on_a_lost_node_and_grows_back"


def run_case(work: Path) -> tuple[dict, list[dict], float]:
    """Run the CI case once; returns (its events, the timeline marks, wall seconds)."""
    timeline, events = work / "timeline.jsonl", work / "events.json"
    env = {**os.environ, "SELFSUP_IN_NETNS": "1", "PYTHONPATH": str(REPO), "SELFSUP_TIMELINE": str(timeline),
           "SELFSUP_ELASTIC_EVENTS": str(events)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-m", "pytest",
                           str(REPO / "tests" / "orchestrator" / "multinode_cases.py"), "-x", "-q", "-s",
                           "-p", "no:cacheprovider", "-o", "addopts=", "-k", CASE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0 or not events.exists():
        sys.exit(f"the case failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    marks = [json.loads(line) for line in timeline.read_text().splitlines() if line.strip()]
    return json.loads(events.read_text()), marks, wall


def first_step_after(marks: list[dict], t: float, world: int) -> float | None:
    steps = [m["t"] for m in marks if m["event"] == "group_first_step" and m.get("world") == world and m["t"] > t]
    return min(steps) - t if steps else None


def epoch_seconds(events: dict, world: int) -> float:
    """The mean duration of the run's epochs on `world` workers (the case wrote them from MLflow)."""
    on = [s for s, w in zip(events["epoch_seconds"], events["world_size"]) if w == world]
    return sum(on) / len(on)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (unshare --net, unshare --mount), as tests/orchestrator/test_multinode.py")
    with tempfile.TemporaryDirectory(prefix="elastic-bench-") as d:
        events, marks, wall = run_case(Path(d))
        shrink = first_step_after(marks, events["kill"], 1)
        grow = first_step_after(marks, events["join"], 2)
        result = {
            "command": "sudo .venv/bin/python benchmarks/elastic_resize.py",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
            "case_wall_seconds": round(wall, 1),
            "world_size_per_epoch": events["world_size"],
            "kill_to_first_step_on_1_worker_s": round(shrink, 1) if shrink is not None else None,
            "join_to_first_step_on_2_workers_s": round(grow, 1) if grow is not None else None,
            "run_summary": events["resizes"],
            "baseline_epoch_on_2_workers_s": round(epoch_seconds(events, 2), 2),
        }
    base = result["baseline_epoch_on_2_workers_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [("kill -> first step on the 1 worker left", shrink), ("node joins -> first step on 2 workers", grow)]
    lines = ["# Elastic resize: time lost per resize (one run)", "",
             f"`{result['command']}` on {result['machine']}; world size per epoch {events['world_size']}.", "",
             "| resize | seconds | in 2-worker epochs |", "| --- | ---: | ---: |"]
    for label, v in rows:
        lines.append(f"| {label} | {v:.1f} | {v / base:.1f} |" if v is not None else f"| {label} | n/a | n/a |")
    lines += [f"| baseline: one epoch on 2 workers | {base:.2f} | 1.0 |", "",
              f"The run's own summary (`resizes` tag): {events['resizes']}", ""]
    write_results(args.out, "elastic_resize", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
