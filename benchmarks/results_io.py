"""Where every benchmark writes its results: `<name>.json` (the figures, for tools) and `<name>.md`
(the table, for people), side by side in one folder (default `benchmarks/results/`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_results(folder: str | Path, name: str, result: Any, markdown: str) -> None:
    """Write `folder/name.json` (indented, `str()` for what JSON lacks) and `folder/name.md`, each
    whole: through a temporary file and a rename, so an interrupted run leaves the old pair."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2, default=str) + "\n"), (".md", markdown)):
        tmp = folder / f".{name}{suffix}.{os.getpid()}.tmp"  # open(): the umask's mode, as before (not 0600)
        try:
            tmp.write_text(text)
            os.replace(tmp, folder / f"{name}{suffix}")
        finally:
            tmp.unlink(missing_ok=True)
