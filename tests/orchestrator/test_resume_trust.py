"""A resume follows nothing another job could have written: a run record edited to send MLflow
traffic elsewhere is refused before any request, so the login never reaches that listener."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.config import Config, load_config
from orchestrator.config import absolute_paths
from orchestrator.run_folders import RUN_RECORD

REPO = Path(__file__).resolve().parents[2]




class Listener:
    """A plain TCP listener on 127.0.0.1 that keeps whatever any client sends it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.mark.slow  # ingests the demo, runs the CLI
def test_a_record_pointing_tracking_uri_elsewhere_gets_no_credentials(demo_data: Path, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.path={demo_data}", "data.source=null", f"run.storage_path={tmp_path / 'runs'}",
                 f"tracking.uri={store}", "optim.epochs=1"]
    cfg = absolute_paths(load_config(None, overrides))
    d = cfg.to_dict()
    d["run"]["name"] = "demo-1"
    listener = Listener()
    try:
        run_dir = tmp_path / "runs" / "demo-1"
        run_dir.mkdir(parents=True)
        # The record as a job with write access to the storage would leave it: same config, the
        # MLflow traffic (and with it the login) sent to its own listener.
        (run_dir / RUN_RECORD).write_text(json.dumps({
            "name": "demo-1", "status": "running", "mlflow_run_id": "0" * 32, "tracking_uri": listener.uri,
            "experiment": cfg.tracking.experiment, "config": Config.from_dict(d).to_dict()}))
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_USERNAME": "selfsup-job",
               "MLFLOW_TRACKING_PASSWORD": "the-secret-password"}
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pretrain", "--resume",
                               *[a for o in overrides for a in ("--set", o)]],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        listener.close()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and f"tracking_uri = '{listener.uri}', but this command tracks to '{store}'" in lines[0]
    assert listener.received == []  # no connection at all, so no Authorization header


def test_the_listener_does_see_the_login_of_a_client_sent_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: what the test above would have caught (MLflow sends the login to any URI)."""
    from orchestrator import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "selfsup-job")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "the-secret-password")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    listener = Listener()
    try:
        try:
            tracking.client(listener.uri).get_experiment_by_name("x")  # "{}": no such experiment
        except Exception:
            pass
    finally:
        listener.close()
    assert any(b"\r\nauthorization: basic " in r.lower() for r in listener.received), listener.received
