"""Run and sweep folders share one naming rule: `<stem>-<n>`, or the name the user gave."""

from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.runs import numbered_dir


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_numbered_dirs_count_up_and_resume_the_newest_recorded(tmp_path: Path, kind: str) -> None:
    def pick(name: str | None = None, resume: bool = False) -> Path:
        return Path(numbered_dir(tmp_path, name=name, stem="demo", record="rec.json", resume=resume, kind=kind))

    assert pick() == tmp_path / "demo-1"
    for n in (1, 2):
        (tmp_path / f"demo-{n}").mkdir()
        (tmp_path / f"demo-{n}" / "rec.json").write_text("{}")
    (tmp_path / "demo-3").mkdir()  # a folder without a record is taken, but not resumable
    assert pick() == tmp_path / "demo-4"
    assert pick(resume=True) == tmp_path / "demo-2"
    assert pick("mine") == tmp_path / "mine"
    assert pick("demo-1", resume=True) == tmp_path / "demo-1"
    with pytest.raises(UserError, match=f"{kind}.name = 'demo-1': .* exists already"):
        pick("demo-1")
    with pytest.raises(UserError, match=f"there is no {kind} 'demo-3'"):
        pick("demo-3", resume=True)


def test_resume_with_nothing_recorded_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--resume: no demo-<n> sweep under .* \(set sweep.name"):
        numbered_dir(tmp_path / "none", name=None, stem="demo", record="r", resume=True, kind="sweep")
