"""Inputs that would exhaust memory, or that are the user's mistake, end with one line and exit 2:
`evaluate --image-size 50000`, `registry embed --image-size 100000`, a non-integer `input_min_size`
tag. (A version's artifacts are sized before download by the loader: `registry/safe_load.py`.)"""

from __future__ import annotations

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
