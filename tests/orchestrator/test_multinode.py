"""Runs, sweeps and data on S3 on a 2-node Ray cluster whose worker node cannot see the head's disk.

The cases live in `multinode_cases.py` and run in a second pytest process inside a network
namespace of its own (`unshare --net`, root only): there Ray's address detection finds only
127.0.0.1 and nothing any of its servers, `moto_server` or `mlflow server` open is reachable from
outside. See that file for the cluster; its output (per-case durations) is printed here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("multinode_cases.py")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (unshare --net, unshare --mount, mount -t tmpfs)"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    if not (Path(sys.executable).parent / "moto_server").exists():
        return "needs moto_server in the venv (pip install -e '.[test]' installs moto[server])"
    return None


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_two_node_cluster_on_s3(tmp_path: Path) -> None:
    why = _missing()
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    env = {**os.environ, "SELFSUP_IN_NETNS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "cases.log"
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-m", "pytest", str(CASES), "-x", "-v",
                               "-p", "no:cacheprovider", "-o", "addopts=-ra --durations=0", "-s"],
                              cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=2300)
    out = log.read_text(errors="replace")
    print(f"\n2-node cases ({time.monotonic() - t0:.0f} s):\n{out[-6000:]}")
    assert proc.returncode == 0, out[-12000:]
    assert " 6 passed" in out, out[-3000:]
