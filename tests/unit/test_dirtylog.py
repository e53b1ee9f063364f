"""The dirty-page log in C (c_ext/ring.c) and its mapping (vhost/dirtylog.py): page math
at the edges, what a published chain marks, the per-queue cache and its flush, atomic
updates from several queues, and that nothing outside the log is ever written.

Each test maps a log from a memfd with guard bytes around it (``offset`` before, a tail
after) and checks the guards stay zero."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.support.rings import INDIRECT, NEXT, WRITE, Ring
from vhost import limits
from vhost._native import ffi, lib
from vhost.dirtylog import BYTES_PER_LOG_BYTE, DirtyLog, DirtyLogError, log_bytes_for

PAGE = lib.VU_LOG_PAGE
TAIL = 64  # guard bytes after the log in its file


class Log:
    """A DirtyLog over a memfd, with the file's bytes readable as the front end sees them."""

    def __init__(self, size: int, offset: int = 0) -> None:
        self.fd = os.memfd_create("test-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, offset + size + TAIL)
        self.size, self.offset = size, offset
        self.log = DirtyLog(self.fd, size, offset)

    def raw(self) -> bytes:
        return os.pread(self.fd, self.offset + self.size + TAIL, 0)

    def pages(self) -> set[int]:
        """Pages whose bit is set; asserts the guards are untouched."""
        raw = self.raw()
        assert raw[: self.offset] == bytes(self.offset), "written before the log"
        assert raw[self.offset + self.size :] == bytes(TAIL), "written after the log"
        bits = raw[self.offset : self.offset + self.size]
        return {i * 8 + b for i, v in enumerate(bits) if v for b in range(8) if v >> b & 1}

    def clear(self) -> None:
        os.pwrite(self.fd, bytes(self.size), self.offset)

    def close(self) -> None:
        self.log.close()
        os.close(self.fd)


@pytest.fixture
def make_log() -> Iterator[Callable[..., Log]]:
    made: list[Log] = []

    def new(size: int = 1 << 16, offset: int = 0) -> Log:  # 2 GiB: both regions
        made.append(Log(size, offset))
        return made[-1]

    yield new
    for m in made:
        m.close()


def attach(ring: Ring, log: Log, *, used: bool = True) -> None:
    ring.vq.log = log.log.handle
    ring.vq.log_used = int(used)
    ring.vq.log_used_gpa = ring.q.used_gpa


def pages_of(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1)) if n else set()


def write(ring: Ring, gpa: int, n: int) -> None:
    lib.vu_log_write(ring.vq, gpa, n)


# --- page math -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "n", "pages"),
    [
        (0, 1, {0}),
        (PAGE - 1, 1, {0}),
        (PAGE - 1, 2, {0, 1}),
        (PAGE, PAGE, {1}),
        (PAGE, PAGE + 1, {1, 2}),
        (63 * PAGE + 5, PAGE, {63, 64}),  # across a 64-page word
        (10 * PAGE, 200 * PAGE, set(range(10, 210))),  # whole words in the middle
        (0, 0, set()),
    ],
    ids=["first-byte", "page-end", "two-pages", "one-page", "page-and-a-byte", "word-edge",
         "many-words", "empty"],
)  # fmt: skip
def test_page_math(
    make: Callable[..., Ring], make_log: Callable[..., Log], gpa: int, n: int, pages: set[int]
) -> None:
    ring, log = make(), make_log()
    attach(ring, log)
    write(ring, gpa, n)
    assert log.pages() == set(), "marks are gathered until a flush"
    lib.vu_log_flush(ring.vq)
    assert log.pages() == pages


@pytest.mark.parametrize("offset", [0, 3, 8, 4093])
@pytest.mark.parametrize("size", [1, 7, 9, 4096])
def test_log_edges_any_alignment(
    make: Callable[..., Ring], make_log: Callable[..., Log], offset: int, size: int
) -> None:
    """Logs of any size at any offset: pages up to the end are marked, one past it is
    counted as beyond and nothing outside the log changes."""
    ring, log = make(), make_log(size, offset)
    attach(ring, log)
    last = size * 8 - 1
    write(ring, 0, 1)
    write(ring, last * PAGE, PAGE)
    write(ring, (last + 1) * PAGE, 1)  # just past the end
    write(ring, (last + 64 * 8) * PAGE, 3 * PAGE)  # far past it
    write(ring, 2**64 - 2, 100)  # wraps the address space: clamped, beyond
    lib.vu_log_flush(ring.vq)
    assert log.pages() == {0, last}
    assert ring.vq.stats.log_beyond >= 3


def test_nothing_without_a_log(make: Callable[..., Ring]) -> None:
    ring = make()
    assert ring.vq.log == ffi.NULL
    write(ring, 0, PAGE)
    lib.vu_log_flush(ring.vq)
    assert ring.vq.stats.log_words == 0


def test_bits_already_set_by_others_stay(
    make: Callable[..., Ring], make_log: Callable[..., Log]
) -> None:
    ring, log = make(), make_log(16)
    os.pwrite(log.fd, b"\x81", 0)  # pages 0 and 7, set by someone else
    attach(ring, log)
    write(ring, 3 * PAGE, 1)
    lib.vu_log_flush(ring.vq)
    assert log.pages() == {0, 3, 7}


# --- the cache --------------------------------------------------------------------------


def test_cache_merges_and_overflows(
    make: Callable[..., Ring], make_log: Callable[..., Log]
) -> None:
    """Marks in one 64-page word share an entry; more distinct words than the cache holds
    are flushed early and none is lost."""
    ring, log = make(), make_log()
    attach(ring, log)
    for p in range(0, 64, 2):
        write(ring, p * PAGE, 1)
    assert ring.vq.stats.log_words == 0
    lib.vu_log_flush(ring.vq)
    assert ring.vq.stats.log_words == 1  # one word, one atomic
    words = lib.VU_LOG_CACHE * 3 + 1
    for w in range(words):
        write(ring, w * 64 * PAGE + 5 * PAGE, 1)
    assert ring.vq.stats.log_words > 1, "a full cache flushes on its own"
    lib.vu_log_flush(ring.vq)
    assert log.pages() == set(range(0, 64, 2)) | {w * 64 + 5 for w in range(words)}


def test_concurrent_queues_lose_no_bit(make_log: Callable[..., Log]) -> None:
    """Two queues (two threads, GIL released in C) set interleaved bits in the same words
    while a third thread clears the log's first byte: every bit of the others lands."""
    log = make_log(64)
    rings = [Ring(), Ring()]
    try:
        for r in rings:
            attach(r, log, used=False)
        rounds = 300

        def mark(r: Ring, parity: int) -> None:
            for _ in range(rounds):
                for p in range(8 + parity, 64 * 8, 2):
                    lib.vu_log_write(r.vq, p * PAGE, 1)
                lib.vu_log_flush(r.vq)

        threads = [threading.Thread(target=mark, args=(r, i)) for i, r in enumerate(rings)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.pages() == set(range(8, 64 * 8))
        assert sum(r.vq.stats.log_words for r in rings) == 2 * rounds * 8
    finally:
        for r in rings:
            r.close()


# --- what publishing a chain marks ------------------------------------------------------


def used_pages(ring: Ring, slot: int) -> set[int]:
    used = ring.q.used_gpa
    return pages_of(used + 4 + 8 * slot, 8) | pages_of(used + 2, 2)


def test_push_marks_writable_buffers_and_the_used_ring(
    make: Callable[..., Ring], make_log: Callable[..., Log]
) -> None:
    ring, log = make(num=8), make_log()
    attach(ring, log)
    out = ring.ram.alloc(3 * PAGE, PAGE)
    a = ring.ram.alloc(2 * PAGE, PAGE) + 100  # straddles a page
    b = ring.ram.alloc(PAGE, PAGE, region=1)
    head = ring.q.add_chain([(out, 3 * PAGE, False), (a, PAGE, True), (b, 10, True)])
    ring.q.publish()
    ring.pop_ok()
    ring.push(head, 20)  # wrote 20 bytes: whole writable buffers are marked anyway
    ring.flush()
    assert log.pages() == pages_of(a, PAGE) | pages_of(b, 10) | used_pages(ring, 0)
    assert not pages_of(out, 3 * PAGE) & log.pages()


def test_push_of_nothing_written_marks_only_the_used_ring(
    make: Callable[..., Ring], make_log: Callable[..., Log]
) -> None:
    ring, log = make(), make_log()
    attach(ring, log)
    w = ring.ram.alloc(PAGE, PAGE)
    head = ring.q.add_chain([(w, PAGE, True)])
    ring.q.publish()
    ring.pop_ok()
    ring.push(head, 0)
    ring.flush()
    assert log.pages() == used_pages(ring, 0)


def test_used_ring_not_logged_without_the_flag(
    make: Callable[..., Ring], make_log: Callable[..., Log]
) -> None:
    ring, log = make(), make_log()
    attach(ring, log, used=False)
    w = ring.ram.alloc(PAGE, PAGE)
    head = ring.q.add_chain([(w, 1, True)])
    ring.q.publish()
    ring.pop_ok()
    ring.push(head, 1)
    ring.flush()
    assert log.pages() == pages_of(w, 1)


def test_indirect_chain_marks_its_buffers_not_its_table(
    make: Callable[..., Ring], make_log: Callable[..., Log]
) -> None:
    ring, log = make(), make_log()
    attach(ring, log, used=False)
    r_buf = ring.ram.alloc(PAGE, PAGE)
    w1 = ring.ram.alloc(PAGE, PAGE)
    w2 = ring.ram.alloc(PAGE, PAGE, region=1)
    table = ring.table([(r_buf, 16, NEXT, 1), (w1, 100, NEXT | WRITE, 2), (w2, PAGE, WRITE, 0)])
    ring.descs({0: (table, 48, INDIRECT, 0)})
    ring.offer(0)
    ring.q.publish()
    ring.pop_ok()
    ring.push(0, 1)
    ring.flush()
    assert log.pages() == pages_of(w1, 100) | pages_of(w2, PAGE)


def test_rewritten_descriptors_only_change_log_bits(
    make: Callable[..., Ring], make_log: Callable[..., Log]
) -> None:
    """The driver rewrites the chain between pop and push into a loop, an indirect
    table outside memory and a buffer far beyond the log: pushing marks only what is
    inside the log and never walks without bound."""
    ring, log = make(num=8), make_log(64)
    attach(ring, log, used=False)
    w = ring.ram.alloc(PAGE, PAGE)
    ring.descs({0: (w, 10, WRITE | NEXT, 1), 1: (w, 10, WRITE, 0)})
    ring.offer(0)
    ring.q.publish()
    ring.pop_ok()
    ring.descs({0: (w, 10, WRITE | NEXT, 1), 1: (1 << 50, 10, WRITE | NEXT, 0)})  # a loop
    ring.push(0, 20)
    ring.descs({2: (1 << 40, 32, INDIRECT, 0)})
    ring.push(2, 20)
    ring.flush()
    assert log.pages() == pages_of(w, 10)
    assert ring.vq.stats.log_beyond > 0


def test_avail_event_is_logged(make: Callable[..., Ring], make_log: Callable[..., Log]) -> None:
    ring, log = make(num=8, event_idx=True), make_log()
    attach(ring, log)
    assert lib.vu_vq_enable_notification(ring.vq) == 0
    assert log.pages() == pages_of(ring.q.used_gpa + 4 + 8 * 8, 2)


# --- mapping the front end's log ---------------------------------------------------------


def test_covers_and_sizes() -> None:
    assert BYTES_PER_LOG_BYTE == 8 * 4096
    assert log_bytes_for(0) == 0
    assert log_bytes_for(1) == 1
    assert log_bytes_for(BYTES_PER_LOG_BYTE) == 1
    assert log_bytes_for(BYTES_PER_LOG_BYTE + 1) == 2
    assert log_bytes_for(512 << 20) == 16 << 10  # 512 MiB of RAM: 16 KiB of log


@pytest.mark.parametrize(
    ("size", "offset", "file_size", "match"),
    [
        (0, 0, 4096, "not in 1.."),
        (limits.MAX_LOG_BYTES + 1, 0, 4096, "not in 1.."),
        (4096, 0, 4095, "runs past the end"),
        (1, 4096, 4096, "runs past the end"),
        (4096, 2**63, 4096, "runs past the end"),
    ],
    ids=["empty", "too-big", "file-short", "offset-at-end", "offset-huge"],
)
def test_bad_logs_are_refused(size: int, offset: int, file_size: int, match: str) -> None:
    fd = os.memfd_create("bad-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, file_size)
        with pytest.raises(DirtyLogError, match=match):
            DirtyLog(fd, size, offset)
    finally:
        os.close(fd)


def test_log_must_be_a_file() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(DirtyLogError, match="not a file"):
            DirtyLog(r, 4096, 0)
    finally:
        os.close(r)
        os.close(w)


def test_largest_log_is_accepted() -> None:
    """MAX_LOG_BYTES itself maps (lazily: nothing is touched)."""
    fd = os.memfd_create("big-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, limits.MAX_LOG_BYTES)
        log = DirtyLog(fd, limits.MAX_LOG_BYTES, 0)
        assert log.covers == limits.MAX_LOG_BYTES * BYTES_PER_LOG_BYTE
        log.close()
    finally:
        os.close(fd)
