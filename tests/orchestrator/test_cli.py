"""The CLI's one exception handler: which failures are the user's (exit 2) and how they read.

The registry tests drive the same handler end to end (an OS error, an MLflow error, SELFSUP_DEBUG).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.errors import UserError


def _real_errors() -> dict[str, BaseException]:
    """Exceptions as the libraries raise them, not hand-built look-alikes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from mlflow.exceptions import MlflowException

    out: dict[str, BaseException] = {"user": UserError("data.path = 'x': no such folder"),
                                     "mlflow": MlflowException("Registered Model with name=x not found")}
    for name, call in (("missing file", lambda: open("/nonexistent/selfsup/x")),
                       ("json", lambda: json.loads("{nope")),
                       ("utf-8", lambda: b"\xff".decode("utf-8")),
                       ("yaml", lambda: yaml.safe_load("a: [1")),
                       ("parquet", lambda: pq.read_table(pa.BufferReader(b"not parquet at all"))),
                       ("bug", lambda: [][1])):
        try:
            call()
        except Exception as e:
            out[name] = e
    return out


def test_user_caused_errors_exit_2_and_bugs_exit_1() -> None:
    errors = _real_errors()
    assert {name: cli.is_user_error(e) for name, e in errors.items()} == {
        "user": True, "mlflow": True, "missing file": True, "json": True, "utf-8": True, "yaml": True,
        "parquet": True, "bug": False}
    assert cli.one_line(errors["missing file"]) == "FileNotFoundError: /nonexistent/selfsup/x: No such file or directory"
    assert cli.one_line(errors["user"]) == "data.path = 'x': no such folder"  # selfsup's own: no type prefix
    assert cli.one_line(errors["mlflow"]) == "MlflowException: Registered Model with name=x not found"
    assert "\n" not in cli.one_line(errors["yaml"])


def test_console_script_os_error_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    """`selfsup ingest` into a path under a file: the OS refuses; one line, exit 2; with
    SELFSUP_DEBUG=1 the traceback."""
    import torch
    from torchvision.io import encode_jpeg

    (tmp_path / "afile").write_text("")
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(
        encode_jpeg(torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8)).numpy().tobytes())
    out = tmp_path / "afile" / "out"
    argv = [sys.executable, "-m", "orchestrator.cli", "ingest", str(tmp_path / "src"), str(out)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("selfsup ingest: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert f"{out}: Not a directory" in p.stderr, p.stderr
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "SELFSUP_DEBUG": "1"})
    assert p.returncode == 2 and p.stderr.startswith("Traceback (most recent call last)"), p.stderr
    assert "Not a directory" in p.stderr.rstrip().splitlines()[-1], p.stderr


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--bogus"], "selfsup: error: unrecognized arguments: --bogus (see selfsup --help)"),
    (["registry", "lst"], "selfsup registry: error: argument registry_command: invalid choice: 'lst'"),
    (["ingest"], "selfsup ingest: error: the following arguments are required: source, out"),
])
def test_usage_errors_are_one_line_and_exit_2(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err
