"""A checkpoint written to a full disk: `selfsup pretrain` ends with one line (exit 2) naming the run
folder, the checkpoints already stored stay loadable, no part-written checkpoint is left, and
`--resume` continues from the last stored one once there is space again.

The disk is a real tmpfs (`tests/tmpfs.py`, root only) sized to hold the run's record and one
checkpoint of the demo's ConvNet (5.9 MB: model, optimizer and the kNN bank) but not two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.ray_compat import CHECKPOINT_SNAPSHOT
from orchestrator.run_folders import RUN_RECORD, read_state
from pipelines import storage
from tests.tmpfs import mounted_tmpfs, resize_tmpfs

REPO = Path(__file__).resolve().parents[2]


def _pretrain(tmp_path: Path, overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "pretrain", *extra,
                           *[a for o in overrides for a in ("--set", o)]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two pretrain commands (about a minute each on 2 cores)
def test_a_full_disk_at_a_checkpoint_loses_nothing_stored_and_resume_continues(demo_data: Path,
                                                                              tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "disk", "9m") as disk:
        run_dir = disk / "runs" / "full"
        overrides = [f"data.path={demo_data}", "data.source=null", f"run.storage_path={disk / 'runs'}",
                     "run.name=full", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "optim.epochs=3",
                     "run.max_failures=1"]  # a restart is tried (and fails the same way), as by default
        failed = _pretrain(tmp_path, overrides)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert len(lines) == 1 and str(run_dir) in lines[0] and "no space left on device" in lines[0], lines

        # What was stored is whole: the record, and the first epoch's checkpoint, which loads.
        record = json.loads((run_dir / RUN_RECORD).read_text())
        assert record["status"] == "running" and record["name"] == "full"
        snapshot = json.loads((run_dir / CHECKPOINT_SNAPSHOT).read_text())
        registered = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
        assert len(registered) == 1 and snapshot["checkpoint_results"][0]["metrics"]["epoch"] == 1
        state = read_state(str(run_dir / registered[0] / "state.pt"))
        assert state["epoch"] == 1 and state["model"]
        # Nothing part-written is left: no other checkpoint folder, no temporary file.
        assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_")) == \
            sorted([*registered, CHECKPOINT_SNAPSHOT])
        assert not [p for p in disk.rglob("*") if storage.is_temp_name(p.name)]

        resize_tmpfs(disk, "64m")  # space freed
        resumed = _pretrain(tmp_path, overrides, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "epoch 2/3" in resumed.stdout and "epoch 1/3" not in resumed.stdout  # continued, not restarted
        assert json.loads((run_dir / RUN_RECORD).read_text())["status"] == "finished"
