"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert first_block, "README.md has no command block"
    return [line for line in first_block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_main_job_and_the_test_command() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("selfsup pretrain"), commands[0]
    assert "pytest" in commands[1], commands[1]


def test_ci_runs_the_readme_test_command_unchanged() -> None:
    test_command = _readme_commands()[1]
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()
