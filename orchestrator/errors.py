"""Errors a user can fix. The CLI prints their message as one line and exits 2."""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """The message names the file, field or value, and what is allowed."""


def disk_full(error: BaseException) -> bool:
    """Whether `error` or one it wraps is a full disk (ENOSPC): its cause or context, and Ray
    Train's worker and controller failures. pyarrow's filesystem errors carry no errno, only the
    OS's words in their message, so those are matched too."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None),
                 *(getattr(e, "worker_failures", None) or {}).values()]
    return False

