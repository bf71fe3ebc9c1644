"""The data walk of one `selfsup pretrain`: which files of the dataset it opens, and how often.

Runs the demo (`selfsup pretrain`, its default config) under `strace -f` in a scratch folder and
counts the `open`/`openat` calls on paths inside the dataset folder, by every process of the run
(driver, Ray workers, Ray Data tasks). A file opened again after the first time is a "return":
the manifest read once per command and passed down should be opened about once.

    python benchmarks/data_walk.py            # needs strace (apt-get install strace)

Writes benchmarks/results/data_walk.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402


def walk(work: Path) -> dict[str, int]:
    """Opens per file of the dataset folder during one `selfsup pretrain` run in `work`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    selfsup = [sys.executable, "-m", "orchestrator.cli"]
    subprocess.run([*selfsup, "ingest", "demo", "data/demo"], cwd=work, env=env, check=True, capture_output=True)
    trace = work / "trace.txt"
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,open", "-o", str(trace), *selfsup, "pretrain"],
                   cwd=work, env=env, check=True, capture_output=True)
    data = str(work / "data" / "demo")
    opens: collections.Counter[str] = collections.Counter()
    for line in trace.read_text(errors="replace").splitlines():
        m = re.search(r'open(?:at)?\((?:AT_FDCWD|\d+), "([^"]+)"', line)
        if m and (m[1].startswith(data) or m[1].startswith("data/demo")) and "= -1" not in line:
            opens[os.path.basename(m[1].rstrip("/")) or m[1]] += 1
    return dict(opens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="now", help="a name for this measurement in the results")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        raise SystemExit("data_walk.py needs strace (apt-get install strace)")
    with tempfile.TemporaryDirectory(prefix="selfsup-walk-") as tmp:
        opens = walk(Path(tmp))
    result = {"label": args.label, "files": len(opens), "opens": sum(opens.values()),
              "returns": sum(opens.values()) - len(opens), "per_file": opens}
    rows = "\n".join(f"| {name} | {n} |" for name, n in sorted(opens.items(), key=lambda kv: -kv[1]))
    write_results(RESULTS, "data_walk", result,
                  f"# Data walk of one `selfsup pretrain` ({args.label})\n\n{len(opens)} files, {result['opens']} opens, "
                  f"{result['returns']} returns\n\n| file | opens |\n| --- | --- |\n{rows}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
