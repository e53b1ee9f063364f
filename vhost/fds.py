"""Closing file descriptors on cleanup paths, where an fd already gone is no reason to
fail harder (shared by the protocol reader, the session and the queues)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


def close_all(fds: Iterable[int | None]) -> None:
    """Close every fd given (None entries are skipped); errors are ignored."""
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
