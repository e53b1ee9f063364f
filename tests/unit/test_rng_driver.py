"""The virtio-rng driver of the test front end (tests/support/rng.py), in-process: its
chains go through the core's C ring walker on the ring fixture of tests/support/rings.py,
and the test plays the device (pop, write the writable iovecs, push the length, flush).

What is checked is the driver's own bookkeeping: the chains it offers are device-writable
only, poisoned, split and indirect as asked; what it reads back is what the device wrote,
cut at the used length and at the chain's end; a device that reports more than it wrote
shows as a poisoned tail; used heads it never offered are kept apart; a head is not
reused while its completion waits; and read() waits on the call eventfd. (The rng device
itself is tested through this driver against the real daemon, not here.)
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.frontend import VRING_AVAIL_F_NO_INTERRUPT
from tests.support.rings import Ring
from tests.support.rng import POISON, RngCompletion, RngDriver
from vhost._native import lib

#: bytes that never end in the poison: a short write shows exactly
NOT_POISON = 0x5A
#: what the device writes into the iovecs of a chain: its whole length by default
Fill = Callable[[int], bytes]


@pytest.fixture
def ring(make: Callable[..., Ring]) -> Ring:
    return make(num=16)


@pytest.fixture
def rng(ring: Ring) -> RngDriver:
    return RngDriver(ring.q, buf_regions=(0, 1))


def serve(
    ring: Ring, fill: Fill = os.urandom, used_len: Callable[[int], int] | None = None
) -> dict[int, bytes]:
    """Play the device for every available chain: write ``fill(chain bytes)`` into its
    writable iovecs, push ``used_len(bytes written)`` (default: the bytes written),
    flush. Returns head -> bytes written. Fails on a chain with readable buffers."""
    written: dict[int, bytes] = {}
    while lib.vu_vq_avail_count(ring.vq):
        readable, writable = ring.pop_ok()
        assert readable == [], "a virtio-rng chain has device-readable buffers"
        size = sum(n for _, n in writable)
        data = fill(size)[:size]
        pos = 0
        for gpa, n in writable:
            ring.ram.write(gpa, data[pos : pos + n])  # empty past a short write
            pos += n
        head = int(ring.chain.head)
        ring.push(head, len(data) if used_len is None else used_len(len(data)))
        written[head] = data
    ring.flush()
    return written


def test_chains_are_poisoned_and_device_writable_only(ring: Ring, rng: RngDriver) -> None:
    heads = rng.post([16, 100, 1])
    rng.kick()
    assert ring.q.kicks == 1
    seen = []
    while lib.vu_vq_avail_count(ring.vq):
        readable, writable = ring.pop_ok()
        assert readable == []
        seen.append((int(ring.chain.head), sum(n for _, n in writable)))
        assert all(ring.ram.read(g, n) == bytes([POISON]) * n for g, n in writable)
    assert seen == list(zip(heads, [16, 100, 1], strict=True))


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("segs", [1, 3])
def test_what_comes_back_is_what_the_device_wrote(
    ring: Ring, rng: RngDriver, segs: int, indirect: bool
) -> None:
    heads = rng.post([64, 2, 4096], segs=segs, indirect=indirect)
    rng.kick()
    written = serve(ring)
    assert int(ring.chain.n_in) == min(segs, 4096)  # the last chain, as the walker saw it
    done = rng.collect()
    assert done == [RngCompletion(h, written[h], len(written[h])) for h in heads]
    assert rng.collect() == []  # taken
    assert rng.outstanding == {} and rng.unexpected_used == []
    assert all(p.outstanding == 0 for p in rng.pools)  # every buffer freed


def test_a_short_write_reported_as_such_is_cut_at_the_used_length(
    ring: Ring, rng: RngDriver
) -> None:
    (head,) = rng.post([64], segs=2)
    rng.kick()
    serve(ring, fill=lambda n: bytes([NOT_POISON]) * 40)
    (c,) = rng.wait([head])
    assert c == RngCompletion(head, bytes([NOT_POISON]) * 40, 40)
    assert rng.poisoned_tail(c) == 0


def test_a_device_that_reports_more_than_it_wrote_leaves_a_poisoned_tail(
    ring: Ring, rng: RngDriver
) -> None:
    (head,) = rng.post([64], segs=3)
    rng.kick()
    serve(ring, fill=lambda n: bytes([NOT_POISON]) * 8, used_len=lambda n: 64)
    (c,) = rng.wait([head])
    assert c.used_len == 64 and c.data == bytes([NOT_POISON]) * 8 + bytes([POISON]) * 56
    assert rng.poisoned_tail(c) == 56


def test_a_used_length_past_the_chain_is_cut_at_its_end(ring: Ring, rng: RngDriver) -> None:
    (head,) = rng.post([16])
    rng.kick()
    written = serve(ring, used_len=lambda n: 1000)
    (c,) = rng.wait([head])
    assert c == RngCompletion(head, written[head], 1000)


def test_a_head_never_offered_is_kept_apart(ring: Ring, rng: RngDriver) -> None:
    (head,) = rng.post([16])
    rng.kick()
    written = serve(ring)
    stranger = next(h for h in range(ring.num) if h != head)
    ring.push(stranger, 3)
    ring.flush()
    assert rng.collect() == [RngCompletion(head, written[head], 16)]
    assert rng.unexpected_used == [(stranger, 3)]


def test_wait_takes_only_its_heads_and_a_waiting_head_is_not_reused(
    ring: Ring, rng: RngDriver
) -> None:
    first, second = rng.post([16, 32])
    rng.kick()
    written = serve(ring)
    assert rng.wait([first]) == [RngCompletion(first, written[first], 16)]
    assert list(rng.done) == [second]  # came back, not taken yet
    assert ring.q.next_head() == second  # its descriptor is free again...
    with pytest.raises(RuntimeError, match="reused before its completion was taken"):
        rng.post([8])  # ...but taking it now would make two chains one
    assert rng.wait([second]) == [RngCompletion(second, written[second], 32)]
    assert rng.post([8]) == [second]


def test_wait_times_out_when_nothing_comes_back(rng: RngDriver) -> None:
    heads = rng.post([16])
    rng.kick()
    with pytest.raises(TimeoutError, match="1 of 1 virtio-rng chains not returned"):
        rng.wait(heads, timeout=0.1)


Device = Callable[[bool], list[bytes]]


@pytest.fixture
def device(ring: Ring) -> Iterator[Device]:
    """``device(signal)`` starts a device thread: on each kick it serves the ring and,
    if ``signal``, writes the call eventfd (the Ring's C queue has no call fd of its
    own); returns the list of what it wrote, filled as it goes."""
    wrote: list[bytes] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(signal: bool) -> list[bytes]:
        def run() -> None:
            while not stop.is_set():
                if select.select([ring.q.kick_fd], [], [], 0.02)[0]:
                    os.eventfd_read(ring.q.kick_fd)
                    wrote.extend(serve(ring).values())
                    if signal:
                        os.eventfd_write(ring.q.call_fd, 1)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
        return wrote

    yield start
    stop.set()
    for t in threads:
        t.join(5)


def test_read_posts_kicks_and_waits_for_the_call(rng: RngDriver, device: Device) -> None:
    wrote = device(True)
    t0 = time.monotonic()
    got = [rng.read(n, segs=2, timeout=10.0) for n in (32, 1, 512)]
    assert time.monotonic() - t0 < 5.0  # woken by the calls, not by the deadline
    assert got == wrote
    assert [len(g) for g in got] == [32, 1, 512]


def test_wait_sleeps_on_the_call_eventfd(ring: Ring, rng: RngDriver) -> None:
    """A device that returns the chain without signalling, once wait() has asked for a
    call: wait() does not poll the used ring, it sleeps until its deadline (and then
    finds the chain)."""
    ring.q.disable_cb()  # NO_INTERRUPT: cleared by wait() when it starts to sleep
    heads = rng.post([16])
    rng.kick()
    wrote: list[bytes] = []

    def late_device() -> None:
        deadline = time.monotonic() + 5.0
        while ring.ram.read_u16(ring.q.avail_gpa) & VRING_AVAIL_F_NO_INTERRUPT:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
        time.sleep(0.1)  # wait() looks at the used ring once more, then sleeps
        wrote.extend(serve(ring).values())

    t = threading.Thread(target=late_device, daemon=True)
    t.start()
    t0 = time.monotonic()
    (c,) = rng.wait(heads, timeout=0.5)
    elapsed = time.monotonic() - t0
    t.join(5)
    assert [c.data] == wrote
    assert elapsed >= 0.45, f"wait() returned after {elapsed:.3f}s: it polled"
