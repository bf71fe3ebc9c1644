"""MLflow's basic-auth app on the cluster head: the credentials, the job user, and what a refusal says.

The head's `mlflow server` runs `--app-name basic-auth`: a request without valid credentials gets
401. The credentials are made on the head at `ray up`, never in the repository or a cluster file,
in DIR (the head's `~/mlflow`), each file mode 600 and made only where missing, so a second
`ray up` keeps them:

- `credentials.env`: `export MLFLOW_TRACKING_USERNAME=selfsup-job` and its password: what jobs use.
  Ray's `cluster_synced_files` copies it from the head to every worker node, and every node's
  `~/.selfsup-env` sources it, so the driver, the Train controller and workers and the Tune trials
  inherit it from the shell that started them. The job user is not an admin.
- `basic_auth.ini`: MLflow's auth config (`MLFLOW_AUTH_CONFIG_PATH`): `default_permission`, the
  user database, the admin user and its password (the admin is made from it on the server's first
  start). Stays on the head.
- `server.env`: `MLFLOW_AUTH_CONFIG_PATH` and `MLFLOW_FLASK_SERVER_SECRET_KEY` (the auth app's CSRF
  key), sourced only by the shell that starts the server. Stays on the head.

    python -m orchestrator.mlflow_auth init ~/mlflow                       # before the server starts
    python -m orchestrator.mlflow_auth job-user ~/mlflow "$MLFLOW_TRACKING_URI"   # once it runs

Nothing here prints a password.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CREDENTIALS = "credentials.env"
AUTH_INI = "basic_auth.ini"
SERVER_ENV = "server.env"
AUTH_DB = "basic_auth.db"
ADMIN_USER = "admin"
JOB_USER = "selfsup-job"
# Both users may read and edit every experiment and model (each also manages what it creates); only
# the admin manages users and permissions. Anonymous requests get 401 whatever this says.
DEFAULT_PERMISSION = "EDIT"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
HINT = (f"set {USERNAME_ENV} and {PASSWORD_ENV} (on the cluster: source ~/mlflow/credentials.env; "
        "from your machine: `ray exec CLUSTER.yaml 'cat ~/mlflow/credentials.env'`)")


def _write_new(path: Path, text: str) -> bool:
    """Create `path` with mode 600 holding `text`; False (and nothing written) if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def read_env_file(path: Path) -> dict[str, str]:
    """`export NAME=VALUE` / `NAME=VALUE` lines of a shell env file (values written by `init`: unquoted)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.removeprefix("export ").split("=", 1)
        out[name.strip()] = value.strip()
    return out


def init(directory: str | os.PathLike[str]) -> list[str]:
    """Make the credential files in `directory` (mode 700) that are missing; returns their names.

    Passwords are `secrets.token_urlsafe` (letters, digits, `-`, `_`: nothing a shell, an ini file
    or HTTP basic auth reads specially).
    """
    d = Path(directory).expanduser()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    made = []
    if _write_new(d / CREDENTIALS, f"export {USERNAME_ENV}={JOB_USER}\n"
                                   f"export {PASSWORD_ENV}={secrets.token_urlsafe(24)}\n"):
        made.append(CREDENTIALS)
    if _write_new(d / AUTH_INI, "[mlflow]\n"
                                f"default_permission = {DEFAULT_PERMISSION}\n"
                                f"database_uri = sqlite:///{(d / AUTH_DB).resolve()}\n"
                                f"admin_username = {ADMIN_USER}\n"
                                f"admin_password = {secrets.token_urlsafe(24)}\n"):
        made.append(AUTH_INI)
    if _write_new(d / SERVER_ENV, f"export MLFLOW_AUTH_CONFIG_PATH={(d / AUTH_INI).resolve()}\n"
                                  f"export MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n"):
        made.append(SERVER_ENV)
    return made


def job_credentials(directory: str | os.PathLike[str]) -> tuple[str, str]:
    """(username, password) of the job user, from `credentials.env`."""
    env = read_env_file(Path(directory).expanduser() / CREDENTIALS)
    return env[USERNAME_ENV], env[PASSWORD_ENV]


def admin_credentials(directory: str | os.PathLike[str]) -> tuple[str, str]:
    import configparser

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(Path(directory).expanduser() / AUTH_INI)
    return ini["mlflow"]["admin_username"], ini["mlflow"]["admin_password"]


def _wait_health(uri: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
                r.read()
                return
        except (urllib.error.URLError, OSError) as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"mlflow_auth: the MLflow server at {uri} did not answer within "
                                 f"{timeout_s:.0f} s ({e}); see ~/mlflow/server.log") from None
        time.sleep(1)


def ensure_job_user(directory: str | os.PathLike[str], uri: str, *, timeout_s: float = 300) -> str:
    """Wait for the server at `uri`, then create the job user of `credentials.env` with the admin's
    credentials, or set its password to the file's if it exists. Returns what it did."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    _wait_health(uri, timeout_s)
    user, password = job_credentials(directory)
    admin, admin_password = admin_credentials(directory)
    saved = {k: os.environ.get(k) for k in (USERNAME_ENV, PASSWORD_ENV)}
    os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = admin, admin_password  # the auth client reads these
    try:
        auth = get_app_client("basic-auth", tracking_uri=uri)
        try:
            auth.create_user(user, password)
            return "created"
        except MlflowException as e:
            if e.error_code == "RESOURCE_ALREADY_EXISTS":
                auth.update_user_password(user, password)
                return "kept"
            if e.get_http_status_code() in (401, 403, 404):
                raise SystemExit(
                    f"mlflow_auth: the MLflow server at {uri} refused the admin of {directory}/{AUTH_INI} "
                    f"(HTTP {e.get_http_status_code()}): a server started without `--app-name basic-auth`, "
                    "or with another user database. Stop it and run `ray up` again.") from None
            raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- what a refusal says ---------------------------------------------------------------------------

def refusal_status(e: BaseException) -> int | None:
    """401 or 403 when `e` is MLflow's answer to missing, wrong or insufficient credentials."""
    mlflow_exc = sys.modules.get("mlflow.exceptions")
    if mlflow_exc is None or not isinstance(e, mlflow_exc.MlflowException):
        return None
    code = e.get_http_status_code()
    if code in (401, 403):
        return int(code)
    return {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(str(e.error_code))


def refusal_message(status: int, uri: str | None) -> str:
    """One line for a 401/403 from the MLflow server at `uri` (None: not known here)."""
    where = f"MLflow at {uri}" if uri else "the MLflow server"
    user = os.environ.get(USERNAME_ENV)
    if status == 403:
        return (f"{where} refused user {user or '(none)'} this operation (HTTP 403): use the job's "
                f"credentials or ask the server's admin; {HINT}")
    given = f"user {user}" if user else f"no credentials ({USERNAME_ENV} unset)"
    return f"{where} refused the credentials ({given}, HTTP 401): {HINT}"


@contextmanager
def credentials_checked(uri: str) -> Iterator[None]:
    """Turn MLflow's 401/403 inside the block into a `UserError` that names `uri` and what to set."""
    from orchestrator.errors import UserError

    try:
        yield
    except Exception as e:
        status = refusal_status(e)
        if status is None:
            raise
        raise UserError(refusal_message(status, uri)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.mlflow_auth", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="make the missing credential files (mode 600) in DIR")
    i.add_argument("dir")
    j = sub.add_parser("job-user", help="create the job user on the running server (or reset its password)")
    j.add_argument("dir")
    j.add_argument("uri")
    j.add_argument("--timeout", type=float, default=300, help="seconds to wait for the server (default 300)")
    args = p.parse_args(argv)
    if args.command == "init":
        made = init(args.dir)
        print(f"mlflow_auth: {', '.join(made) if made else 'kept the existing credentials'} in {args.dir}")
    else:
        what = ensure_job_user(args.dir, args.uri, timeout_s=args.timeout)
        print(f"mlflow_auth: job user {job_credentials(args.dir)[0]} {what} at {args.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
