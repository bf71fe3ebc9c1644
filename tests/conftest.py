"""Shared fixtures: a real `mlflow server` on 127.0.0.1, a local Ray, and where the data lives.

Every process a fixture starts is stopped in its teardown, and everything it writes stays under
pytest's temporary folders.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_wait import wait_http

# MLflow leaves scratch files under the system temp dir (downloaded model artifacts when a model
# is loaded, db_init_lock files), and so does Ray (_ray_lockfiles). Every process the tests start
# inherits TMPDIR, so all of that lands in one folder, removed when the session ends. Kept short:
# Ray's unix-socket paths must stay under 107 bytes.
_SESSION_TMP = tempfile.mkdtemp(prefix="sst", dir="/tmp")  # short: Ray's socket paths live below it
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = None
# The private Ray that `selfsup` starts keeps its session here too: a process that outlives
# `ray.shutdown()` by a moment (or a driver a test kills) can still write there after the run
# removed its folder, and the whole session folder goes at the end.
os.environ["SELFSUP_RAY_TEMP_ROOT"] = _SESSION_TMP
# The key that signs a sweep's saved Tune state (orchestrator/sweep/state_signing.py) is made on
# first use; in tests, in the session folder rather than the user's home.
os.environ["SELFSUP_STATE_KEY_FILE"] = os.path.join(_SESSION_TMP, "selfsup-state-key")

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 shards. Always present in CI; a test that needs them fails there if not."""
    if not (CIFAR10 / "train-00000-of-00005.parquet").exists():
        if IN_CI:
            pytest.fail(f"CIFAR-10 shards expected at {CIFAR10} in CI")
        pytest.skip(f"CIFAR-10 shards not found at {CIFAR10}")
    return CIFAR10


@pytest.fixture(autouse=True)
def _mlflow_uris_stay_put() -> Iterator[None]:
    """`mlflow.set_tracking_uri` / `set_registry_uri` export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI:
    a test that calls them must not hand its temporary store to the processes later tests start."""
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in demo digits, ingested once per test module that asks (each gets its own copy)."""
    from pipelines.ingest import ingest

    out = tmp_path_factory.mktemp("demo") / "demo"
    ingest("demo", out, progress=False)
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with SQLite and served artifacts; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 120, exited=lambda: proc.poll() is not None,
                  why=lambda reason: f"mlflow server: {reason}:\n{(root / 'server.log').read_text()[-3000:]}")
        yield uri
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and everything it spawned."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=20)


@pytest.fixture()
def ray_local(tmp_path: Path) -> Iterator[None]:
    """A fresh local Ray (4 logical CPUs on 2 cores, see docs/design.md), shut down after (`ray.shutdown()`, never a global `ray stop`)."""
    import ray

    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's unix socket paths must stay under 107 bytes, and pytest's tmp paths can be longer.
    ray_tmp = tempfile.mkdtemp(prefix="r")  # in the session folder (TMPDIR): short, removed at the end
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=ray_tmp)
    try:
        yield
    finally:
        # ray.shutdown() stops the local cluster this fixture started; no global `ray stop`, which
        # would also kill clusters that other processes on this machine own.
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture()
def ray_temp_root() -> str:
    """Where the Ray sessions of a `selfsup` command under test go (its `SELFSUP_RAY_TEMP_ROOT`):
    the session folder, whose paths are short enough for Ray's unix sockets, removed at the end
    also when the command was killed and could not remove its own."""
    return _SESSION_TMP


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """A real moto_server on 127.0.0.1 with one bucket; AWS_ENDPOINT_URL points pyarrow at it."""
    from tests.moto_server import moto_bucket

    with moto_bucket() as bucket:
        yield bucket
