"""Inputs that would exhaust memory, or that are the user's mistake, end with one line and exit 2:
`evaluate --image-size 50000`, `registry embed --image-size 100000`, a non-integer `input_min_size`
tag; a version's artifacts are sized (and refused over a limit) before any download."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.encoder_input import MAX_INPUT_SIDE, EncoderInput
from orchestrator.errors import UserError


@pytest.mark.parametrize("argv", [
    ["evaluate", "models:/m/1", "nowhere", "--image-size", "50000"],
    ["registry", "embed", "models:/m/1", "nowhere", "out.parquet", "--image-size", "100000"],
    ["registry", "embed", "models:/m/1", "nowhere", "out.parquet", "--image-size", "64x100000"],
])
def test_huge_image_sizes_are_refused_in_one_line(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"each side must be between 1 and {MAX_INPUT_SIDE} pixels" in err[0], err


@pytest.mark.parametrize("value", ["8.5", "eight", "-3", "0", "1e9"])
def test_a_non_integer_input_min_size_tag_is_a_one_line_user_error(value: str) -> None:
    with pytest.raises(UserError, match=rf"^the model version's tag input_min_size = '{value}' is not a positive "
                                        "whole number"):
        EncoderInput.of({"input_min_size": value, "image_size": "32"}, None)
    assert EncoderInput.of({"input_min_size": "8", "image_size": "32"}, None).min_size == 8


@pytest.mark.slow
def test_artifact_sizes_are_checked_before_download(mlflow_server: str, tmp_path: Path) -> None:
    from orchestrator import tracking
    from orchestrator.registry.versions import artifact_sizes

    c = tracking.client(mlflow_server)
    name = f"sizes-{uuid.uuid4().hex[:8]}"
    exp = tracking.ensure_experiment(mlflow_server, name)
    run_id = tracking.start_run(mlflow_server, exp, name, {}, "{}\n")
    (tmp_path / "encoder.json").write_text('{"name": "x"}')
    (tmp_path / "encoder.safetensors").write_bytes(b"\0" * 5000)
    for f in ("encoder.json", "encoder.safetensors"):
        c.log_artifact(run_id, str(tmp_path / f), artifact_path="encoder")
    c.create_registered_model(name)
    v = c.create_model_version(name, f"runs:/{run_id}/encoder", run_id=run_id)
    limits = {"encoder.json": 1 << 20, "encoder.safetensors": 10_000}
    sizes = artifact_sizes(c, v, limits, tracking_uri=mlflow_server)
    assert sizes == {"encoder.json": 13, "encoder.safetensors": 5000}
    with pytest.raises(UserError, match=rf"^models:/{name}/1: artifact encoder.safetensors is 5,000 bytes, over "
                                        "the limit of 4,096; refused before download$"):
        artifact_sizes(c, v, {**limits, "encoder.safetensors": 4096}, tracking_uri=mlflow_server)
    with pytest.raises(UserError, match=r"has no artifact 'weights.bin'"):
        artifact_sizes(c, v, {"weights.bin": 10}, tracking_uri=mlflow_server)
