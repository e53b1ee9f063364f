"""The chain API (vhost/chains.py) and the servers that run a Python device's handler
(vhost/virtqueue.py), in-process on the ring fixture of tests/support/rings.py: guest RAM
and a driver queue, the C walker under a ChainQueue, a Virtqueue on an asyncio loop or in
its own thread.

What is asserted is what reached the guest: used entries and their lengths, bytes in
guest memory, call-eventfd signals; and what must never happen: a bad chain reaching
Python, a view writing guest memory after its chain is gone, a handler bug taking more
than its own queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.frontend import VIRTIO_RING_F_EVENT_IDX
from tests.support.rings import Ring, as_region
from vhost.chains import Chain, ChainError, ChainQueue
from vhost.limits import MAX_READ_BYTES
from vhost.memory import GuestMemory
from vhost.ring_reference import ErrorCode as E
from vhost.virtqueue import VIRTIO_F_VERSION_1, Virtqueue

FEATURES = VIRTIO_F_VERSION_1


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring(num=16)
    yield r
    r.close()


def chain_queue(ring: Ring) -> ChainQueue:
    return ChainQueue(ring.vq, "test/vq0", ring.mem)


def add(
    ring: Ring, readable: bytes = b"", writable: int = 0, *, splits: int = 1, region: int = 0
) -> tuple[int, list[tuple[int, int]]]:
    """A chain of ``readable`` (one buffer) then ``writable`` bytes in ``splits`` buffers;
    returns (head, writable (gpa, len) pieces)."""
    bufs: list[tuple[int, int, bool]] = []
    if readable:
        gpa = ring.buf(len(readable), region)
        ring.ram.write(gpa, readable)
        bufs.append((gpa, len(readable), False))
    pieces = []
    for k in range(splits if writable else 0):
        n = writable // splits + (writable % splits if k == splits - 1 else 0)
        gpa = ring.buf(n, region)
        ring.ram.fill(gpa, n, 0xA5)
        bufs.append((gpa, n, True))
        pieces.append((gpa, n))
    return ring.q.add_chain(bufs), pieces


def guest_bytes(ring: Ring, pieces: list[tuple[int, int]]) -> bytes:
    return b"".join(ring.ram.read(g, n) for g, n in pieces)


# --- pop, read, write, push -------------------------------------------------------------


def test_pop_gives_validated_chains_and_push_publishes_what_was_written(ring: Ring) -> None:
    cq = chain_queue(ring)
    h1, w1 = add(ring, b"request one", 32)
    h2, w2 = add(ring, b"two", 8, splits=2)
    ring.q.publish()
    chains = cq.pop()
    assert [c.head for c in chains] == [h1, h2]
    assert [(c.readable_len, c.writable_len) for c in chains] == [(11, 32), (3, 8)]
    assert chains[0].read() == b"request one" and chains[1].read(2, offset=1) == b"wo"
    assert chains[0].write(b"answer") == 6 and chains[0].written == 6
    assert chains[1].write(b"0123456789") == 8  # what fits, across its two buffers
    cq.push(chains)
    assert ring.q.get_used() == [(h1, 6), (h2, 8)]
    assert guest_bytes(ring, w1)[:7] == b"answer\xa5"
    assert guest_bytes(ring, w2) == b"01234567"
    assert cq.outstanding == 0 and all(c.finished for c in chains)


def test_write_at_offsets_fills_written_to_the_furthest_byte(ring: Ring) -> None:
    cq = chain_queue(ring)
    head, pieces = add(ring, b"", 20, splits=3)
    ring.q.publish()
    (c,) = cq.pop()
    assert c.write(b"XY", offset=10) == 2 and c.written == 12
    assert c.write(b"ab", offset=0) == 2 and c.written == 12  # an earlier write keeps it
    with pytest.raises(ValueError):
        c.write(b"z", offset=21)
    c.written = 20
    cq.push([c])
    assert ring.q.get_used() == [(head, 20)]
    assert guest_bytes(ring, pieces)[:12] == b"ab" + b"\xa5" * 8 + b"XY"


def test_read_without_a_size_is_bounded(ring: Ring) -> None:
    """read() with no size copies up to MAX_READ_BYTES (here: overlapping descriptors,
    as a guest may write them); one byte more must be read with a size."""
    cq = chain_queue(ring)
    half = MAX_READ_BYTES // 2
    buf = ring.buf(half)
    ring.ram.write(buf, bytes(range(256)) * (half // 256))
    at = ring.q.add_chain([(buf, half, False), (buf, half, False)])
    past = ring.q.add_chain([(buf, half, False), (buf, half, False), (buf, 1, False)])
    ring.q.publish()
    a, b = cq.pop()
    assert (a.head, b.head) == (at, past)
    assert a.read() == ring.ram.read(buf, half) * 2
    with pytest.raises(
        ChainError, match=f"more than read\\(\\) copies at once \\({MAX_READ_BYTES}\\)"
    ):
        b.read()
    assert len(b.read(MAX_READ_BYTES + 1)) == MAX_READ_BYTES + 1
    cq.push([a, b])


def test_a_chain_across_regions_is_one_chain(ring: Ring) -> None:
    cq = chain_queue(ring)
    data_gpa = ring.buf(4, region=1)
    ring.ram.write(data_gpa, b"far!")
    out_gpa = ring.buf(6, region=1)
    head = ring.q.add_chain([(data_gpa, 4, False), (ring.buf(2), 2, True), (out_gpa, 6, True)])
    ring.q.publish()
    (c,) = cq.pop()
    assert c.read() == b"far!" and c.writable_len == 8
    c.write(b"12345678")
    cq.push([c])
    assert ring.ram.read(out_gpa, 6) == b"345678"
    assert ring.q.get_used() == [(head, 8)]


def test_bad_chains_never_reach_python(ring: Ring) -> None:
    """A chain whose buffer is outside guest memory is refused in C: returned to the driver
    with nothing written, recorded, and the batch ends there (a queue records one error,
    so it is reported before the next); the chains around it are handed out."""
    cq = chain_queue(ring)
    good1, _ = add(ring, b"a", 1)
    bad = ring.q.add_chain([(ring.ram.size + 0x10_0000, 64, True)])
    good2, _ = add(ring, b"b", 1)
    ring.q.publish()
    first = cq.pop()
    assert [c.head for c in first] == [good1]
    assert ring.q.get_used() == [(bad, 0)]  # already published: the driver has it back
    assert ring.vq.err.code == E.ADDR and ring.vq.err.head == bad
    second = cq.pop()
    assert [c.head for c in second] == [good2]
    cq.push(first + second)
    assert [h for h, _ in ring.q.get_used()] == [good1, good2]


def test_a_bad_head_breaks_the_queue_after_the_chains_before_it(ring: Ring) -> None:
    cq = chain_queue(ring)
    good, _ = add(ring, b"a", 1)
    ring.q.publish()
    ring.q.put_avail(ring.num + 3)  # not a descriptor index
    chains = cq.pop()
    assert [c.head for c in chains] == [good]
    assert ring.vq.broken and ring.vq.err.code == E.HEAD
    assert cq.pop() == []  # nothing more is taken from a broken ring
    cq.push(chains)  # what was taken before can still be completed
    assert ring.q.get_used() == [(good, 0)]


def test_push_signals_once_per_batch(ring: Ring) -> None:
    cq = chain_queue(ring)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ring.vq.call_fd = call
    try:
        for _ in range(5):
            add(ring, b"x", 4)
        ring.q.publish()
        chains = cq.pop()
        assert len(chains) == 5
        cq.push(chains[:3])
        cq.push(chains[3:])
        assert os.eventfd_read(call) == 2
        assert ring.vq.stats.signals == 2
    finally:
        ring.vq.call_fd = -1
        os.close(call)


def test_pop_takes_at_most_max_chains(ring: Ring) -> None:
    cq = chain_queue(ring)
    heads = [add(ring, b"x", 1)[0] for _ in range(5)]
    ring.q.publish()
    first = cq.pop(2)
    assert [c.head for c in first] == heads[:2]
    rest = cq.pop()
    assert [c.head for c in rest] == heads[2:]
    assert cq.outstanding == 5


def test_push_refuses_what_is_not_outstanding(ring: Ring) -> None:
    cq = chain_queue(ring)
    add(ring, b"x", 4)
    add(ring, b"y", 4)
    ring.q.publish()
    a, b = cq.pop()
    with pytest.raises(ChainError, match="twice"):
        cq.push([a, a])
    a.written = 5
    with pytest.raises(ChainError, match="writable bytes"):
        cq.push([a])
    a.written = 0
    cq.push([a])
    with pytest.raises(ChainError):
        cq.push([a])
    with pytest.raises(ChainError):
        a.read()
    other = Ring(num=8)
    try:
        with pytest.raises(ChainError, match="not outstanding"):
            chain_queue(other).push([b])
    finally:
        other.close()
    cq.push([b])
    assert [h for h, _ in ring.q.get_used()] == [a.head, b.head]


# --- discard ----------------------------------------------------------------------------


def test_discard_gives_the_newest_chains_back(ring: Ring) -> None:
    cq = chain_queue(ring)
    heads = [add(ring, bytes([k]), 2)[0] for k in range(3)]
    ring.q.publish()
    chains = cq.pop()
    with pytest.raises(ChainError, match="newest"):
        cq.discard([chains[0]])  # not the newest: the ring cannot move back over the others
    cq.discard(chains[1:])
    assert ring.vq.last_avail_idx == 1
    with pytest.raises(ChainError):
        chains[2].write(b"z")
    again = cq.pop()
    assert [c.head for c in again] == heads[1:]
    assert [c.read() for c in again] == [b"\x01", b"\x02"]
    cq.push([chains[0], *again])
    assert [h for h, _ in ring.q.get_used()] == heads


def test_discard_after_a_later_chain_was_pushed_is_refused(ring: Ring) -> None:
    cq = chain_queue(ring)
    add(ring, b"a", 1)
    add(ring, b"b", 1)
    ring.q.publish()
    a, b = cq.pop()
    cq.push([b])
    with pytest.raises(ChainError, match="newest"):
        cq.discard([a])
    cq.push([a])


def test_discard_skips_a_refused_chain_in_between(ring: Ring) -> None:
    """A chain refused in C took its slot; discarding across it would hand its slot out
    twice, so it is refused."""
    cq = chain_queue(ring)
    add(ring, b"a", 1)
    ring.q.add_chain([(ring.ram.size + 0x10_0000, 8, True)])
    add(ring, b"b", 1)
    ring.q.publish()
    (a,) = cq.pop()
    (b,) = cq.pop()
    with pytest.raises(ChainError):
        cq.discard([a, b])
    cq.discard([b])
    (b2,) = cq.pop()
    assert b2.head == b.head
    cq.push([a, b2])


# --- views ------------------------------------------------------------------------------


def test_views_are_guest_memory(ring: Ring) -> None:
    cq = chain_queue(ring)
    head, pieces = add(ring, b"readable", 12, splits=2)
    ring.q.publish()
    (c,) = cq.pop()
    (r,) = c.readable
    assert bytes(r) == b"readable"
    with pytest.raises(TypeError):
        r[0] = 0  # device-readable means read-only here
    w1, w2 = c.writable
    assert (len(w1), len(w2)) == (6, 6)
    w1[:] = b"abcdef"
    rd, wr = os.pipe()
    try:
        os.write(wr, b"ghijkl")
        assert os.readv(rd, [w2]) == 6  # zero copy: the kernel writes guest memory
    finally:
        os.close(rd)
        os.close(wr)
    c.written = 12
    cq.push([c])
    assert guest_bytes(ring, pieces) == b"abcdefghijkl"
    assert ring.q.get_used() == [(head, 12)]


def test_views_raise_once_the_chain_is_finished(ring: Ring) -> None:
    cq = chain_queue(ring)
    _head, pieces = add(ring, b"r", 8)
    ring.q.publish()
    (c,) = cq.pop()
    (view,) = c.writable
    cq.push([c])
    with pytest.raises(ValueError):
        view[0] = 1
    with pytest.raises(ValueError):
        bytes(view)
    with pytest.raises(ChainError):
        _ = c.writable
    assert guest_bytes(ring, pieces) == b"\xa5" * 8


def test_a_kept_slice_sees_zero_pages_after_its_memory_goes(caplog: Any) -> None:
    """A device that keeps a slice of a view past its chain: the region it points into is
    retired when the memory table changes (zero pages, not unmapped), so the slice reads
    zeros and writes nowhere -- not into the guest, not into a later mapping -- and the
    range is unmapped once the slice is gone."""
    ring = Ring(num=8, regions=1)
    try:
        cq = chain_queue(ring)
        _head, pieces = add(ring, b"", 64)
        ring.q.publish()
        (c,) = cq.pop()
        kept = c.writable[0][8:24]
        kept[:4] = b"live"
        cq.push([c])
        assert bytes(kept[:4]) == b"live"  # still guest memory: the mapping is there
        with caplog.at_level(logging.WARNING, "vhost.memory"):
            ring.mem.clear()
        assert ring.mem.retired == 1
        assert "retired, not unmapped" in caplog.text
        assert bytes(kept) == bytes(16)
        kept[:] = b"Z" * 16
        gpa, _n = pieces[0]
        assert ring.ram.read(gpa + 8, 16) == b"live" + b"\xa5" * 12  # the guest never saw it
        # a new mapping of guest memory cannot land under the kept slice
        fresh = GuestMemory()
        try:
            fresh.add(as_region(ring.ram.layout[0]), ring.ram.fd)
            assert fresh.read(gpa + 8, 4) == b"live"
        finally:
            fresh.close()
        del kept
        assert ring.mem.retired == 0  # the last view went: the range is unmapped
    finally:
        ring.close()


def test_finish_all_gives_back_the_tail_and_completes_the_rest(ring: Ring) -> None:
    cq = chain_queue(ring)
    heads = [add(ring, bytes([k]), 4)[0] for k in range(4)]
    ring.q.publish()
    c0, c1, _c2, _c3 = cq.pop()
    c0.write(b"held")
    c1.write(b"done")
    cq.push([c1])
    assert cq.finish_all() == (2, 1)  # c3, c2 given back; c0 completed with nothing
    assert ring.q.get_used() == [(heads[1], 4), (heads[0], 0)]
    assert ring.vq.last_avail_idx == 2
    assert [c.head for c in cq.pop()] == heads[2:]


# --- the servers: Virtqueue.serve_chains -----------------------------------------------


class Served:
    """A Virtqueue on a Ring's driver queue, ready to be served."""

    def __init__(self, ring: Ring, event_idx: bool = False) -> None:
        self.ring = ring
        self.q = Virtqueue(0, "served/vq0")
        self.q.set_num(ring.num)
        self.q.set_rings(
            ring.uva(ring.q.desc_gpa), ring.uva(ring.q.avail_gpa), ring.uva(ring.q.used_gpa)
        )
        self.q.set_kick(os.dup(ring.q.kick_fd))
        self.q.set_call(os.dup(ring.q.call_fd))
        self.q.enabled = True
        self.features = FEATURES | ((1 << VIRTIO_RING_F_EVENT_IDX) if event_idx else 0)
        self.calls: list[float] = []

    def wait_used(self, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        got: list[tuple[int, int]] = []
        while len(got) < n:
            got += self.ring.q.get_used()
            assert time.monotonic() < deadline, f"{len(got)} of {n} chains came back"
            time.sleep(0.002)
        return got


def echo(queue: ChainQueue) -> None:
    """Writes each chain's readable bytes back, upper-cased."""
    chains = queue.pop()
    for c in chains:
        c.write(c.read().upper())
    queue.push(chains)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(5)
    lp.close()


def on_loop(lp: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    """Run fn on the loop's thread (where a loop server lives) and return its result."""

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), lp).result(5)


@pytest.mark.parametrize("worker", ["loop", "thread"])
def test_server_serves_kicks(ring: Ring, loop: asyncio.AbstractEventLoop, worker: str) -> None:
    s = Served(ring)
    start = lambda: s.q.serve_chains(ring.mem, s.features, echo, worker)  # noqa: E731
    on_loop(loop, start) if worker == "loop" else start()
    try:
        assert s.q.running
        for round_ in range(3):
            heads = [add(ring, f"round {round_} chain {k}".encode(), 32)[0] for k in range(4)]
            ring.q.publish()
            ring.q.kick()
            used = s.wait_used(4)
            assert [h for h, _ in used] == heads
            assert all(n == len(f"round {round_} chain 0") for _, n in used)
        assert s.q.stats()["kicks"] >= 1
    finally:
        on_loop(loop, s.q.stop) if worker == "loop" else s.q.stop()
    assert not s.q.running
    s.q.reset()


@pytest.mark.parametrize("worker", ["loop", "thread"])
def test_a_delay_brings_the_handler_back_without_a_kick(
    ring: Ring, loop: asyncio.AbstractEventLoop, worker: str
) -> None:
    """A handler that can serve one chain per call and asks to be called again in 20 ms:
    every chain is served after one kick, and the calls are spaced by the delay."""
    s = Served(ring)
    times: list[float] = []

    def one_at_a_time(queue: ChainQueue) -> float | None:
        chains = queue.pop()
        if not chains:
            return None
        times.append(time.monotonic())
        chains[0].write(b"ok")
        queue.push(chains[:1])
        if len(chains) > 1:
            queue.discard(chains[1:])
            return 0.02
        return None

    start = lambda: s.q.serve_chains(ring.mem, s.features, one_at_a_time, worker)  # noqa: E731
    for _k in range(4):
        add(ring, b"x", 8)
    ring.q.publish()
    on_loop(loop, start) if worker == "loop" else start()
    try:
        used = s.wait_used(4)
        assert [n for _, n in used] == [2, 2, 2, 2]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) == 3 and min(gaps) >= 0.015, gaps
    finally:
        on_loop(loop, s.q.stop) if worker == "loop" else s.q.stop()
    s.q.reset()


@pytest.mark.parametrize("worker", ["loop", "thread"])
def test_stop_finishes_held_chains(
    ring: Ring, loop: asyncio.AbstractEventLoop, worker: str
) -> None:
    """A device that holds chains (to answer later): the stop gives them back to the ring
    and releases their views, so the next server takes them again."""
    s = Served(ring)
    held: list[Chain] = []

    def hold(queue: ChainQueue) -> None:
        held.extend(queue.pop())

    start = lambda: s.q.serve_chains(ring.mem, s.features, hold, worker)  # noqa: E731
    heads = [add(ring, b"x", 8)[0] for _ in range(3)]
    ring.q.publish()
    on_loop(loop, start) if worker == "loop" else start()
    deadline = time.monotonic() + 5
    while len(held) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    view = held[0].writable[0]
    base = on_loop(loop, s.q.stop) if worker == "loop" else s.q.stop()
    assert base == 0  # all three were given back
    assert all(c.finished for c in held)
    with pytest.raises(ValueError):
        view[0] = 0
    start2 = lambda: s.q.serve_chains(ring.mem, s.features, echo, worker)  # noqa: E731
    on_loop(loop, start2) if worker == "loop" else start2()
    try:
        ring.q.kick()
        assert [h for h, _ in s.wait_used(3)] == heads
    finally:
        on_loop(loop, s.q.stop) if worker == "loop" else s.q.stop()
    s.q.reset()


@pytest.mark.parametrize("worker", ["loop", "thread"])
def test_a_failing_handler_costs_its_queue_only(
    loop: asyncio.AbstractEventLoop, worker: str, caplog: Any
) -> None:
    good, bad = Ring(num=8), Ring(num=8)
    sg, sb = Served(good), Served(bad)
    sb.q.label = "served/bad"

    def broken(queue: ChainQueue) -> None:
        queue.pop()
        raise RuntimeError("a bug in the device")

    def start() -> None:
        sg.q.serve_chains(good.mem, sg.features, echo, worker)
        sb.q.serve_chains(bad.mem, sb.features, broken, worker)

    try:
        with caplog.at_level(logging.ERROR, "vhost.virtqueue"):
            on_loop(loop, start) if worker == "loop" else start()
            add(bad, b"boom", 4)
            bad.q.publish()
            bad.q.kick()
            deadline = time.monotonic() + 5
            while sb.q.running:
                assert time.monotonic() < deadline, "the failing queue kept running"
                time.sleep(0.002)
        assert "served/bad: the device's queue handler failed" in caplog.text
        assert sg.q.running
        (h, _pieces) = add(good, b"still here", 16)
        good.q.publish()
        good.q.kick()
        assert sg.wait_used(1) == [(h, 10)]
    finally:
        for s in (sg, sb):
            on_loop(loop, s.q.stop) if worker == "loop" else s.q.stop()
            s.q.reset()
        good.close()
        bad.close()


def test_a_loop_queue_needs_a_running_loop(ring: Ring) -> None:
    from vhost.virtqueue import VirtqueueError

    s = Served(ring)
    with pytest.raises(VirtqueueError, match="running loop"):
        s.q.serve_chains(ring.mem, s.features, echo, "loop")
    assert not s.q.active
    s.q.reset()


def test_event_idx_suppresses_signals_the_driver_did_not_ask_for(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """With event idx the driver asks for one call when its used_event is crossed: a batch
    of chains served in several pushes signals once it passes that index."""
    ring = Ring(num=16, event_idx=True)
    s = Served(ring, event_idx=True)
    on_loop(loop, lambda: s.q.serve_chains(ring.mem, s.features, echo, "loop"))
    try:
        for _ in range(6):
            add(ring, b"e", 2)
        ring.q.set_used_event(5)  # call me once the 6th is used
        ring.q.publish()
        ring.q.kick()
        s.wait_used(6)
        assert ring.q.wait_call(2.0)
        assert not ring.q.wait_call(0.05)
        assert s.q.stats()["signals"] == 1
    finally:
        on_loop(loop, s.q.stop)
        s.q.reset()
        ring.close()
