"""The S3-compatible server the tests use: a real `moto_server` process on 127.0.0.1 (what Ray's
own storage tests use), started by process id and stopped by it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.http_wait import wait_http

MOTO = Path(sys.executable).parent / "moto_server"
# What pyarrow and boto3 read to reach it (the credentials moto accepts).
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def require_moto() -> None:
    """Skip without `moto_server` (fail in CI, whose install always has it)."""
    if not MOTO.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("moto_server missing: pip install -e '.[test]' installs moto[server]")
        pytest.skip("moto_server not installed")


def start_moto(port: int, *, env: dict[str, str] | None = None, log: IO[bytes] | None = None) -> subprocess.Popen:
    """Start `moto_server` on 127.0.0.1:`port` in a session of its own and wait until it answers."""
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                            start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/", 60, lambda why: f"moto_server did not start: {why}",
              exited=lambda: proc.poll() is not None)
    return proc


def create_bucket(endpoint: str, bucket: str) -> str:
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}"


@contextlib.contextmanager
def moto_bucket(bucket: str = "selfsup-unit") -> Iterator[str]:
    """A moto_server on a free port with one bucket, and this process's AWS_* variables pointing
    at it (put back after); yields `s3://BUCKET`. The server is stopped by its process id."""
    require_moto()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    proc = start_moto(port)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield create_bucket(endpoint, bucket)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
