"""The front end's side of dirty-page logging (what QEMU does for a live migration), for
tests of any device: a memfd log with guard bytes after it, read and cleared as QEMU's
sync does, and the messages that turn logging on and off (SET_LOG_BASE, SET_FEATURES
with VHOST_F_LOG_ALL, SET_VRING_ADDR with the log flag)."""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from cffi import FFI

from tests.support.frontend import F_LOG_ALL, DriverQueue, FrontEnd, GuestRam
from vhost.protocol import GetVringBase, SetLogBase, SetVringAddr, U64Reply, VringStateReply

PAGE = 4096
TAIL = 4096  # guard bytes after the log in its file


class FrontEndLog:
    """The front end's side of the log: a memfd bitmap, read and cleared as QEMU does."""

    def __init__(self, ram_end: int, offset: int = 0) -> None:
        self.size = -(-ram_end // (64 * PAGE)) * 8  # whole u64 words, as QEMU's
        self.offset = offset
        self.fd = os.memfd_create("fe-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, offset + self.size + TAIL)

    @classmethod
    def for_ram(cls, ram: GuestRam, offset: int = 0) -> FrontEndLog:
        return cls(max(r.guest_phys_addr + r.memory_size for r in ram.regions()), offset)

    def take(self) -> set[int]:
        """The pages marked since the last take (and clear them), checking the guards."""
        raw = os.pread(self.fd, self.offset + self.size + TAIL, 0)
        assert raw[: self.offset] == bytes(self.offset), "written before the log"
        assert raw[self.offset + self.size :] == bytes(TAIL), "written after the log"
        os.pwrite(self.fd, bytes(self.size), self.offset)
        bits = raw[self.offset : self.offset + self.size]
        return {i * 8 + b for i, v in enumerate(bits) if v for b in range(8) if v >> b & 1}

    def close(self) -> None:
        os.close(self.fd)


def pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1)) if n else set()


def used_ring_pages(q: DriverQueue) -> set[int]:
    return pages(q.used_gpa, 4 + 8 * q.num + 2)


def set_log_base(fe: FrontEnd, log: FrontEndLog) -> U64Reply:
    """SET_LOG_BASE, and the reply QEMU waits for (whatever REPLY_ACK says)."""
    assert fe.request(SetLogBase(log.size, log.offset, log.fd)) is None
    reply = fe.read_reply(what="SET_LOG_BASE reply")
    assert isinstance(reply, U64Reply) and reply.request == SetLogBase.request
    return reply


def set_vring_log(fe: FrontEnd, index: int, q: DriverQueue, on: bool) -> None:
    fe.request_ack(
        SetVringAddr(
            index=index,
            flags=1 if on else 0,
            desc_user_addr=fe.ram.uva_of(q.desc_gpa),
            used_user_addr=fe.ram.uva_of(q.used_gpa),
            avail_user_addr=fe.ram.uva_of(q.avail_gpa),
            log_guest_addr=q.used_gpa if on else 0,
        )
    )


def start_logging(fe: FrontEnd, log: FrontEndLog, *, acked: bool = True) -> None:
    """QEMU's order (vhost_migration_log): the log, then LOG_ALL, then each ring's flag.
    ``acked``: check that the reply says 0 (ours does; libvhost-user, as in
    qemu-storage-daemon, echoes the log's size: QEMU reads only that a reply came)."""
    reply = set_log_base(fe, log)
    assert reply.value == 0 or not acked, f"SET_LOG_BASE failed ({reply.value})"
    fe.set_features(fe.features | F_LOG_ALL)
    for index, q in fe.queues.items():
        set_vring_log(fe, index, q, True)


def stop_logging(fe: FrontEnd) -> None:
    fe.set_features(fe.features & ~F_LOG_ALL)
    for index, q in fe.queues.items():
        set_vring_log(fe, index, q, False)


_XCHG_SOURCE = """
#include <stdint.h>
uint64_t take_word(uint64_t *p) { return __atomic_exchange_n(p, 0, __ATOMIC_SEQ_CST); }
"""
_xchg: Any = None


def _take_word_lib() -> Any:
    """``take_word(p)``: QEMU's atomic exchange of one log word (cffi, built once)."""
    global _xchg
    if _xchg is None:
        ffi = FFI()
        ffi.cdef("uint64_t take_word(uint64_t *p);")
        ffi.set_source("_vhost_test_take_word", _XCHG_SOURCE)
        path = ffi.compile(tmpdir=tempfile.mkdtemp(prefix="vhost-xchg-"))
        spec = importlib.util.spec_from_file_location("_vhost_test_take_word", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _xchg = mod
    return _xchg


class PageCopier:
    """QEMU's RAM migration in miniature, to check the dirty log end to end: once logging
    is on, every page of guest RAM is copied (the bulk pass); then, as often as
    :meth:`sync` is called while the device runs, the marked pages are taken out of the
    log (an atomic exchange per 64-page word, as QEMU does) and copied again, with the
    pages the driver itself wrote (the guest CPU's dirty pages: every GuestRam.write and
    pack is recorded). After the device stopped (GET_VRING_BASE) and a last sync, the copy
    is what a destination would run on: :meth:`stale_pages` must be empty."""

    def __init__(self, log: FrontEndLog, ram: GuestRam) -> None:
        assert log.offset == 0 and log.size % 8 == 0, "QEMU's logs are whole u64 words"
        self.log, self.ram = log, ram
        self.mod = _take_word_lib()
        self._map = mmap.mmap(log.fd, log.size)
        self._words = self.mod.ffi.cast("uint64_t *", self.mod.ffi.from_buffer(self._map))
        self.pages = {p for r in ram.regions() for p in pages(r.guest_phys_addr, r.memory_size)}
        self.copy: dict[int, bytes] = {}
        self.cpu_dirty: set[int] = set()
        self.synced_from_log = 0
        self._hook()
        for p in sorted(self.pages):
            self._copy(p)

    def _hook(self) -> None:
        ram, dirty = self.ram, self.cpu_dirty
        write, pack = ram.write, ram.pack

        def hooked_write(gpa: int, data: bytes | bytearray | memoryview) -> None:
            write(gpa, data)
            dirty.update(pages(gpa, len(data)))

        def hooked_pack(fmt: str | struct.Struct, gpa: int, *values: Any) -> None:
            pack(fmt, gpa, *values)
            size = fmt.size if isinstance(fmt, struct.Struct) else struct.calcsize(fmt)
            dirty.update(pages(gpa, size))

        ram.write = hooked_write  # type: ignore[method-assign]
        ram.pack = hooked_pack  # type: ignore[method-assign]

    def _copy(self, page: int) -> None:
        if page in self.pages:
            self.copy[page] = self.ram.read(page * PAGE, PAGE)

    def sync(self) -> None:
        cpu = set(self.cpu_dirty)
        self.cpu_dirty.difference_update(cpu)
        for w in range(self.log.size // 8):
            bits = int(self.mod.lib.take_word(self._words + w))
            while bits:
                low = bits & -bits
                self._copy(w * 64 + low.bit_length() - 1)
                self.synced_from_log += 1
                bits ^= low
        for p in cpu:
            self._copy(p)

    def stale_pages(self) -> list[int]:
        """Pages whose copy differs from guest RAM now (the destination would be wrong)."""
        return [p for p in sorted(self.pages) if self.copy[p] != self.ram.read(p * PAGE, PAGE)]

    def close(self) -> None:
        del self._words
        self._map.close()


def copy_while(work: Callable[[], None], copier: PageCopier) -> None:
    """Run ``work`` in a thread while the copier syncs again and again."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # surfaced below
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    passes = 0
    while t.is_alive() or passes < 3:
        copier.sync()
        passes += 1
    t.join()
    if failed:
        raise failed[0]


def stop_all(fe: FrontEnd) -> None:
    for index in fe.queues:
        assert isinstance(fe.request(GetVringBase(index)), VringStateReply)
