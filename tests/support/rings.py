"""The in-process ring fixture: a virtqueue with the driver on one side and the core's C
walker on the other, no socket and no daemon.

:class:`Ring` is one queue: :class:`~tests.support.frontend.GuestRam` mapped into a
:class:`vhost.memory.GuestMemory`, a :class:`~tests.support.frontend.DriverQueue` in
region 0 as the driver (or raw descriptors written by the test), and a C ``vu_vq`` set
up on it as the device, driven with ``vu_vq_*`` calls. :func:`adjacent_regions` gives
tiny regions that meet in guest-physical space (a buffer across them becomes several
iovecs). :func:`ring_factory` hands out rings and closes them all afterwards, for the
``make`` fixture of tests/unit/conftest.py.

Boundary: this module sets rings up and reads what the walker produced (iovecs mapped
back to guest addresses, the error it recorded); the unit tests decide what is right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tests.support.frontend import (
    DESC_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    DriverQueue,
    GiB,
    GuestRam,
    MiB,
    RamRegion,
)
from vhost._native import ffi, lib
from vhost.errors import CORE_ERRORS
from vhost.memory import GuestMemory, Region
from vhost.ring_reference import ErrorCode as E

NEXT = VRING_DESC_F_NEXT
WRITE = VRING_DESC_F_WRITE
INDIRECT = VRING_DESC_F_INDIRECT


def as_region(r: RamRegion) -> Region:
    return Region(
        guest_phys_addr=r.gpa, memory_size=r.size, userspace_addr=r.uva, mmap_offset=r.mmap_offset
    )


class Ring:
    """One queue: GuestRam (2 MiB, ``regions`` regions with gaps, plus ``extra`` regions of
    the same memfd) mapped into a GuestMemory, a DriverQueue in region 0, a C vu_vq on it."""

    def __init__(
        self,
        num: int = 8,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        base: int = 0,
        regions: int = 2,
        extra: Sequence[Region] = (),
    ) -> None:
        self.ram = GuestRam(size=2 * MiB, regions=regions)
        self.mem = GuestMemory()
        for r in self.ram.layout:
            self.mem.add(as_region(r), self.ram.fd)
        for x in extra:
            self.mem.add(x, self.ram.fd)
        self.q = DriverQueue(self.ram, num, event_idx, start_idx=base)
        self.num = num
        self.vq = ffi.new("struct vu_vq *")
        self.vq.kick_fd = self.vq.call_fd = self.vq.err_fd = self.vq.stop_fd = -1
        self.chain = ffi.new("struct vu_chain *")
        rc = self.setup(base=base, event_idx=event_idx, indirect=indirect)
        assert rc == 0, CORE_ERRORS.text(rc)
        # our address of each region's first byte, to map iovecs back to guest addresses
        self._hosts = [
            (
                self.mem.translate_gpa(r.guest_phys_addr, r.memory_size),
                r.guest_phys_addr,
                r.memory_size,
            )
            for r in self.mem.regions
        ]

    def uva(self, gpa: int) -> int:
        return self.ram.uva_of(gpa)

    def setup(
        self,
        *,
        num: int | None = None,
        desc: int | None = None,
        avail: int | None = None,
        used: int | None = None,
        base: int = 0,
        event_idx: bool = False,
        indirect: bool = True,
    ) -> int:
        """vu_vq_setup; ring addresses are uvas and default to the DriverQueue's rings."""
        return int(
            lib.vu_vq_setup(
                self.vq,
                self.mem.handle,
                self.num if num is None else num,
                self.uva(self.q.desc_gpa) if desc is None else desc,
                self.uva(self.q.avail_gpa) if avail is None else avail,
                self.uva(self.q.used_gpa) if used is None else used,
                base,
                int(event_idx),
                int(indirect),
            )
        )

    def setup_ring(self, part: str, uva: int) -> int:
        """vu_vq_setup with one ring ("desc", "avail" or "used") moved to ``uva``."""
        return self.setup(
            desc=uva if part == "desc" else None,
            avail=uva if part == "avail" else None,
            used=uva if part == "used" else None,
        )

    def close(self) -> None:
        self.mem.close()
        self.q.close()
        self.ram.close()

    # --- driver side --------------------------------------------------------------------
    def buf(self, n: int, region: int = 0) -> int:
        return self.ram.alloc(n, 16, region)

    def table(self, entries: Sequence[tuple[int, int, int, int]], region: int = 0) -> int:
        """An indirect table of (addr, len, flags, next) entries; returns its gpa."""
        gpa = self.ram.alloc(DESC_SIZE * max(len(entries), 1), 16, region)
        for k, e in enumerate(entries):
            self.ram.pack("<QIHH", gpa + DESC_SIZE * k, *e)
        return gpa

    def descs(self, entries: dict[int, tuple[int, int, int, int]]) -> None:
        for i, (addr, length, flags, nxt) in entries.items():
            self.q.write_desc(i, addr, length, flags, nxt)

    def offer(self, head: int) -> None:
        self.q.put_avail(head)

    # --- device side --------------------------------------------------------------------
    def pop(self) -> int:
        return int(lib.vu_vq_pop(self.vq, self.chain))

    def gpa_of(self, host: int) -> int:
        for base, gpa, size in self._hosts:
            if base <= host < base + size:
                return gpa + host - base
        raise AssertionError(f"iovec base {host:#x} is not in any mapped region")

    def iovs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(readable, writable) iovecs of the last popped chain, as (gpa, len)."""
        c = self.chain
        pieces = [
            (self.gpa_of(int(ffi.cast("uintptr_t", c.iov[i].iov_base))), int(c.iov[i].iov_len))
            for i in range(c.n_out + c.n_in)
        ]
        return pieces[: c.n_out], pieces[c.n_out :]

    def pop_ok(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        rc = self.pop()
        assert rc == 0, f"pop failed: {CORE_ERRORS.text(rc)} (detail {self.vq.err.detail:#x})"
        return self.iovs()

    def refused(self, code: E, *, head: int | None = None, detail: int | None = None) -> None:
        """Pop, expecting ``code``; checks what vq.err recorded."""
        count = self.vq.err.count
        last = self.vq.last_avail_idx
        rc = self.pop()
        assert rc == code, (
            f"pop returned {rc} ({CORE_ERRORS.text(rc) if rc else 'ok'}), expected {code.name} "
            f"(detail {self.vq.err.detail:#x})"
        )
        assert self.vq.err.code == code
        assert self.vq.err.count == count + 1
        assert self.vq.last_avail_idx == (last + 1) & 0xFFFF  # the slot is consumed anyway
        if head is not None:
            assert self.vq.err.head == head == self.chain.head
        if detail is not None:
            assert self.vq.err.detail == detail, f"{self.vq.err.detail:#x} != {detail:#x}"

    def push(self, head: int, length: int) -> None:
        lib.vu_vq_push(self.vq, head, length)

    def flush(self) -> None:
        lib.vu_vq_flush_used(self.vq)


@contextlib.contextmanager
def ring_factory() -> Iterator[Callable[..., Ring]]:
    """``new(*args, **kw)`` makes a :class:`Ring`; every ring made is closed on exit."""
    made: list[Ring] = []

    def new(*args: Any, **kw: Any) -> Ring:
        made.append(Ring(*args, **kw))
        return made[-1]

    try:
        yield new
    finally:
        for r in made:
            r.close()


# --- regions that meet in guest-physical space --------------------------------------------

PIECE = 0x100
ADJ_GPA = 1 * GiB
ADJ_COUNT = 31  # with the RAM region: 32, the table's limit


def adjacent_regions() -> list[Region]:
    """31 tiny regions, each starting where the previous ends (in gpa), separate mmaps."""
    return [
        Region(
            guest_phys_addr=ADJ_GPA + k * PIECE,
            memory_size=PIECE,
            userspace_addr=GuestRam.UVA_BASE + 0x1000_0000 + k * PIECE,
            mmap_offset=1 * MiB + k * PIECE,
        )
        for k in range(ADJ_COUNT)
    ]
