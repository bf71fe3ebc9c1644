"""What an idle Ray process costs: CPU and wake-ups of processes that do no work, from /proc.

Why it matters here: `benchmarks/overhead.py` finds Ray's own processes taking ~0.17 of this
machine's 2 cores while a Train worker trains, most of it ~0.01-0.02 core per Ray worker process
(Train's controller, synchronization actor, placement-group cleaner, dataset manager, idle pool
workers ...), each of which does next to nothing. This measures one such process in isolation:

- baseline: a plain `python` process that sleeps (no Ray), started by this script;
- an idle Ray actor (`num_cpus=0`, no method running) on the same private local Ray that
  `selfsup pretrain` starts (`orchestrator.cluster.init_ray`);
- the whole idle local Ray: this driver and every process it started (GCS, raylet, agents, log
  monitor, pool workers, the actor), with nothing running.

Per process: cores used over the window and the wake-ups per second of its busiest thread (voluntary
+ involuntary context switches from /proc/PID/task/TID/status).

    .venv/bin/python benchmarks/ray_idle_cost.py             # 20 s window
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402
from overhead import cpu_snapshot, descendants_of  # noqa: E402  (this script's folder, benchmarks/, is on sys.path)

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, tuple[str, float, int]]:
    """{tid: (thread name, CPU seconds, context switches)} of a process; {} if it is gone."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                switches = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / TICK,
                         switches)
    return out


def measure(pids: dict[str, int], tree_root: int, window: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cores and the busiest thread's wake-ups/s of each named pid, and the cores of root's tree."""
    tree = descendants_of({pid: ppid for pid, (ppid, _, _) in cpu_snapshot()["procs"].items()}, tree_root)
    a = {p: threads(p) for p in tree | set(pids.values())}
    t0 = time.perf_counter()
    time.sleep(window)
    seconds = time.perf_counter() - t0
    b = {p: threads(p) for p in a}

    def cores(pid: int) -> float:
        return sum(b[pid][t][1] - a[pid][t][1] for t in b[pid] if t in a[pid]) / seconds

    per: dict[str, Any] = {}
    for label, pid in pids.items():
        wake = {t: (b[pid][t][2] - a[pid][t][2]) / seconds for t in b[pid] if t in a[pid]}  # by thread id:
        busiest = max(wake, key=wake.get) if wake else None  # type: ignore[arg-type]  # names repeat
        per[label] = {"pid": pid, "cores": cores(pid),
                      "busiest_thread": (b[pid][busiest][0] + (" (main)" if busiest == pid else "")) if busiest else None,
                      "busiest_thread_wakeups_per_s": wake[busiest] if busiest else 0.0, "threads": len(b[pid])}
    whole = {"processes": len([p for p in tree if b.get(p)]), "cores": sum(cores(p) for p in tree if b.get(p))}
    return per, whole


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=float, default=20.0, help="seconds measured")
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait after start-up before measuring")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    import ray

    from orchestrator.config import load_config
    from orchestrator.cluster import init_ray

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e6)"])
    temp_dir = None
    try:
        _, temp_dir = init_ray(load_config(None, [], check=False))

        @ray.remote(num_cpus=0)
        class Idle:
            def pid(self) -> int:
                return os.getpid()

        actor = Idle.remote()
        actor_pid = ray.get(actor.pid.remote())
        time.sleep(args.settle)  # start-up work (the pool's workers importing, GCS registration) settles
        per, whole = measure({"baseline: plain python, sleeping": sleeper.pid, "idle Ray actor": actor_pid},
                             os.getpid(), args.window)
    finally:
        sleeper.kill()
        sleeper.wait()
        if ray.is_initialized():
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)

    base, idle = per["baseline: plain python, sleeping"], per["idle Ray actor"]
    result = {"benchmark": "ray_idle_cost", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_avg_1min_at_end": os.getloadavg()[0], "ray": ray.__version__, "window_seconds": args.window,
              "processes": per, "idle_local_ray": whole,
              "idle_actor_wakeup_interval_ms": 1000.0 / max(idle["busiest_thread_wakeups_per_s"], 1e-9)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/ray_idle_cost.py " + " ".join(sys.argv[1:])
    md = [
        "# What an idle Ray process costs",
        "",
        f"`{cmd.strip()}` on {result['machine']}, Ray {ray.__version__} (1-min load average at the end "
        f"{result['load_avg_1min_at_end']:.1f}); {args.window:.0f} s window after {args.settle:.0f} s of settling; "
        "from /proc.",
        "",
        "| process (doing nothing) | cores used | busiest thread | its wake-ups/s |",
        "| --- | ---: | --- | ---: |",
    ]
    for label, r in per.items():
        md.append(f"| {label} | {r['cores']:.4f} | `{r['busiest_thread']}` | {r['busiest_thread_wakeups_per_s']:.0f} |")
    md += [
        f"| the whole idle local Ray ({whole['processes']} processes: this driver and all it started) | "
        f"{whole['cores']:.4f} | | |",
        "",
        f"The idle actor's `{idle['busiest_thread']}` thread wakes every {result['idle_actor_wakeup_interval_ms']:.1f} ms; "
        f"the sleeping baseline's busiest thread woke {base['busiest_thread_wakeups_per_s']:.1f} times a second. "
        "Ray's core worker runs a periodic signal check (`CoreWorker.CheckSignal`, a name in `ray/_raylet.so`) "
        "on every worker process's main thread, and it takes the GIL each time.",
    ]
    write_results(out, "ray_idle_cost", result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
