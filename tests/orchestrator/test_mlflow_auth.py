"""MLflow's basic-auth app as the cluster head runs it (orchestrator/mlflow_auth.py), on 127.0.0.1.

A real `mlflow server --app-name basic-auth` started from the files `mlflow_auth.init` makes, with
the flags of the cluster configs' start command: anonymous requests get 401, the job user made by
`mlflow_auth job-user` gets in, and a wrong or missing password ends `selfsup` with one line and
exit code 2. The server is stopped by its process group; everything it writes is in tmp folders.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import mlflow_auth
from orchestrator.errors import UserError
from tests.http_wait import wait_http

SELFSUP = str(Path(sys.executable).parent / "selfsup")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CRED_ENV = (mlflow_auth.USERNAME_ENV, mlflow_auth.PASSWORD_ENV)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_makes_private_files_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "mlflow"
    assert mlflow_auth.main(["init", str(d)]) == 0
    names = {mlflow_auth.CREDENTIALS, mlflow_auth.AUTH_INI, mlflow_auth.SERVER_ENV}
    assert {p.name for p in d.iterdir()} == names
    assert _mode(d) == 0o700 and all(_mode(d / n) == 0o600 for n in names)
    user, password = mlflow_auth.job_credentials(d)
    admin, admin_password = mlflow_auth.admin_credentials(d)
    assert user == mlflow_auth.JOB_USER and admin == mlflow_auth.ADMIN_USER
    assert len(password) >= 24 and len(admin_password) >= 24 and password != admin_password
    ini = (d / mlflow_auth.AUTH_INI).read_text()
    assert f"database_uri = sqlite:///{d.resolve()}/basic_auth.db" in ini and "default_permission = EDIT" in ini
    server_env = mlflow_auth.read_env_file(d / mlflow_auth.SERVER_ENV)
    assert server_env["MLFLOW_AUTH_CONFIG_PATH"] == str((d / mlflow_auth.AUTH_INI).resolve())
    assert len(server_env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    # A second `ray up`: nothing changes, and nothing secret is printed either time.
    before = {n: (d / n).read_bytes() for n in names}
    assert mlflow_auth.main(["init", str(d)]) == 0
    assert {n: (d / n).read_bytes() for n in names} == before
    out = capsys.readouterr().out
    assert password not in out and admin_password not in out and "kept the existing credentials" in out


def test_one_line_for_a_refusal_anywhere() -> None:
    """A 401/403 that surfaces past `connect` / `ensure_experiment` still ends as one clear line."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, UNAUTHENTICATED

    from orchestrator.cli import is_user_error, one_line

    e401 = MlflowException("API request ... failed with error code 401 != 200", error_code=UNAUTHENTICATED)
    e403 = MlflowException("Permission denied", error_code=PERMISSION_DENIED)
    assert is_user_error(e401) and is_user_error(e403)
    assert one_line(e401).startswith("the MLflow server refused the credentials")
    assert "HTTP 403" in one_line(e403) and mlflow_auth.PASSWORD_ENV in one_line(e403)
    assert mlflow_auth.refusal_status(MlflowException("nope", error_code=RESOURCE_DOES_NOT_EXIST)) is None
    assert mlflow_auth.refusal_status(ValueError("401")) is None


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`mlflow server --app-name basic-auth` as the cluster head starts it; yields (URI, credentials dir)."""
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:  # mlflow[auth]: the basic-auth app needs it
        if IN_CI:
            pytest.fail("Flask-WTF missing: pyproject's mlflow[auth] should have installed it")
        pytest.skip("Flask-WTF not installed (pip install -e . installs mlflow[auth])")
    root = tmp_path_factory.mktemp("mlflow-auth")
    creds = root / "mlflow"
    mlflow_auth.init(creds)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in CRED_ENV + ("MLFLOW_TRACKING_URI",)}
    env.update(mlflow_auth.read_env_file(creds / mlflow_auth.SERVER_ENV))
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
           "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=root, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 180, exited=lambda: proc.poll() is not None,
                  why=lambda reason: f"mlflow server: {reason}:\n{log_path.read_text()[-3000:]}")
        yield uri, creds
    finally:
        if proc.poll() is None:  # the server and its workers: its own process group (start_new_session)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        try:  # the uvicorn worker and job runners may outlive the parent by a moment
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        password = mlflow_auth.job_credentials(creds)[1]
        assert password not in log_path.read_text(errors="replace"), "the job password is in the server log"


def _selfsup(args: list[str], cwd: Path, **creds: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in CRED_ENV + ("MLFLOW_TRACKING_URI",)}
    env.update(creds)
    return subprocess.run([SELFSUP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # starts an MLflow server (issue 25: the fast tier starts no servers)
def test_basic_auth_server_refuses_anonymous_and_wrong_credentials(
        auth_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, creds = auth_server
    with urllib.request.urlopen(f"{uri}/health", timeout=10) as r:  # /health answers anyone
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert anonymous.value.code == 401

    # The job user, as `ray up` makes it; a second `ray up` keeps it.
    assert mlflow_auth.main(["job-user", str(creds), uri, "--timeout", "60"]) == 0
    assert mlflow_auth.ensure_job_user(creds, uri, timeout_s=60) == "kept"
    user, password = mlflow_auth.job_credentials(creds)
    assert mlflow_auth.USERNAME_ENV not in os.environ  # ensure_job_user put the caller's environment back

    ok = _selfsup(["registry", "list", "--tracking-uri", uri], tmp_path,
                  MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    assert ok.returncode == 0, ok.stderr

    wrong = _selfsup(["registry", "list", "--tracking-uri", uri], tmp_path,
                     MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD="not-the-password")
    assert wrong.returncode == 2, wrong.stderr
    assert wrong.stderr.count("\n") == 1, wrong.stderr
    assert wrong.stderr.startswith(f"selfsup registry: error: MLflow at {uri} refused the credentials "
                                   f"(user {user}, HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                                   "MLFLOW_TRACKING_PASSWORD"), wrong.stderr
    assert "not-the-password" not in wrong.stderr and password not in wrong.stderr

    none = _selfsup(["registry", "list", "--tracking-uri", uri], tmp_path)
    assert none.returncode == 2 and none.stderr.count("\n") == 1, none.stderr
    assert "refused the credentials (no credentials (MLFLOW_TRACKING_USERNAME unset), HTTP 401)" in none.stderr

    # pretrain / sweep / evaluate meet the server first in ensure_experiment: the same line there.
    from orchestrator import tracking

    monkeypatch.setenv(mlflow_auth.USERNAME_ENV, user)
    monkeypatch.setenv(mlflow_auth.PASSWORD_ENV, "not-the-password")
    with pytest.raises(UserError, match=f"MLflow at {uri} refused the credentials"):
        tracking.ensure_experiment(uri, "auth-test")
    monkeypatch.setenv(mlflow_auth.PASSWORD_ENV, password)
    assert tracking.ensure_experiment(uri, "auth-test")
