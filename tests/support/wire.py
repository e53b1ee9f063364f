"""vhost-user messages as raw bytes, for the tests that feed a reader (or a socket) what
no encoder would make: headers with any flags and size, payloads of any length, memory
regions packed by hand, and fresh eventfds to attach.

:func:`decode_one` and :func:`reject` are the two checks the sans-IO tests of
:mod:`vhost.protocol` share: bytes that must decode to exactly one message, and bytes
that must end the reader with a ProtocolError and close every fd that came with them.

Boundary: bytes and fds only; no socket, no session.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence

import pytest

from vhost.protocol import VERSION, MemoryRegion, Message, MessageReader, ProtocolError

#: ``make_fd()``: a fresh eventfd, closed after the test if still open
MakeFd = Callable[[], int]
_HEADER = struct.Struct("<III")  # request, flags, size


def header(request: int, flags: int, size: int) -> bytes:
    """A message header: request code, flags (version and need-reply), payload size."""
    return _HEADER.pack(request, flags, size)


def raw(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """A whole message: its header with the payload's size, then the payload."""
    return header(request, flags, len(payload)) + payload


def region_bytes(r: MemoryRegion) -> bytes:
    """A memory region as SET_MEM_TABLE and ADD_MEM_REG carry it."""
    return struct.pack("<QQQQ", r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def eventfds() -> Iterator[MakeFd]:
    """``make_fd()`` gives fresh eventfds; whatever is still open on exit is closed."""
    opened: list[int] = []

    def make() -> int:
        opened.append(os.eventfd(0, os.EFD_CLOEXEC))
        return opened[-1]

    try:
        yield make
    finally:
        for fd in opened:
            if is_open(fd):
                os.close(fd)


def decode_one(data: bytes, fds: Sequence[int] = ()) -> Message:
    """``data`` (with ``fds``) must decode to exactly one message; returns it."""
    reader = MessageReader()
    reader.feed(data, fds)
    msg = reader.next_message()
    assert msg is not None
    assert reader.next_message() is None
    return msg


def reject(data: bytes, fds: Sequence[int] = (), match: str = "") -> None:
    """Feeding data+fds must end in a ProtocolError and leave every fd closed."""
    reader = MessageReader()
    with pytest.raises(ProtocolError, match=match):
        reader.feed(data, fds)
        reader.next_message()
    for fd in fds:
        assert not is_open(fd), f"fd {fd} leaked after rejection"
    with pytest.raises(ProtocolError):  # dead for good
        reader.next_message()
