"""Waiting for a server the tests started (an `mlflow server`, the cluster head's MLflow)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable


def wait_http(url: str, timeout_s: float, why: Callable[[str], str],
              exited: Callable[[], bool] = lambda: False) -> None:
    """Poll `url` until it answers 200; raise AssertionError with `why(reason)` after `timeout_s`
    or as soon as `exited()` says the server process is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        if exited():
            raise AssertionError(why("the server exited early"))
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(why(f"{url} did not answer in {timeout_s} s"))
        time.sleep(0.5)
