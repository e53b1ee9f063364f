"""The dirty-page log of a live migration (vhost-user.rst, "Migration"): a bitmap the
front end shares with SET_LOG_BASE (protocol feature LOG_SHMFD), one bit per 4 KiB page
of guest-physical memory.

This module maps it and checks it; the C ring walker writes it (c_ext/ring.c: every
write a device makes into guest memory is marked there, gathered per queue and ORed in
atomically once per burst). It knows nothing of the protocol: callers pass numbers and
fds. Queues that write the log must be stopped before it is replaced or closed (the
session does).
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import TYPE_CHECKING

from vhost import limits
from vhost._native import ffi, lib

if TYPE_CHECKING:
    from vhost._native import CData, vu_log

#: guest-physical bytes one byte of the log covers
BYTES_PER_LOG_BYTE: int = 8 * lib.VU_LOG_PAGE
MAX_LOG_BYTES: int = limits.MAX_LOG_BYTES


class DirtyLogError(Exception):
    """The front end's log cannot be used (the text says why)."""


def log_bytes_for(end: int) -> int:
    """Bytes of log needed to cover guest-physical [0, end)."""
    return -(-end // BYTES_PER_LOG_BYTE)


class DirtyLog:
    """``size`` bytes at ``offset`` of ``fd``, mapped shared. The fd stays the caller's."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if not 0 < size <= MAX_LOG_BYTES:
            raise DirtyLogError(f"log size {size} is not in 1..{MAX_LOG_BYTES}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise DirtyLogError(f"log fd: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise DirtyLogError("log fd is not a file (memfd or shared memory)")
        if offset > st.st_size or size > st.st_size - offset:
            raise DirtyLogError(
                f"log of {size} bytes at offset {offset:#x} runs past the end of its "
                f"file ({st.st_size} bytes)"
            )
        # Mapped from 0 so that the offset needs no alignment (as guest memory is).
        try:
            self._map = mmap.mmap(fd, offset + size, mmap.MAP_SHARED)
        except OSError as e:
            raise DirtyLogError(f"cannot map the log: {e.strerror}") from None
        self._view: CData | None = ffi.from_buffer(self._map)
        self.size = size
        self.offset = offset
        self.handle: vu_log = ffi.new("struct vu_log *")
        self.handle.base = ffi.cast("uint8_t *", self._view) + offset
        self.handle.size = size
        self.handle.call_fd = -1

    @property
    def covers(self) -> int:
        """Guest-physical bytes the log covers, from 0."""
        return self.size * BYTES_PER_LOG_BYTE

    def set_call_fd(self, fd: int | None) -> None:
        """SET_LOG_FD's eventfd (still the caller's to close), written after updates."""
        self.handle.call_fd = -1 if fd is None else fd

    def close(self) -> None:
        if self._view is not None:
            ffi.release(self._view)
            self._view = None
            self._map.close()
