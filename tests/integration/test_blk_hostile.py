"""Hostile chains against vhost-user-blk over a real socket: every way a guest can
break a descriptor chain (outside memory, loops, bad indirect tables, wrong directions,
indexes out of range) is refused with its own log line, used with length 0 (or not at
all), and costs nobody else; bad chains do not flood the log; garbage in the avail ring
breaks only that queue, signals its err fd, and the queue can be set up again.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.support.blk import (
    SECTOR_SIZE,
    STATUS_UNTOUCHED,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_OUT,
    BlkDriver,
    BlkRequest,
    Guest,
    check_io_works,
    check_new_connection_works,
    connect_guest,
    disk_read,
    disk_write,
    pattern,
    raw_buffer,
    raw_chain,
    raw_header,
    raw_table,
)
from tests.support.daemon import Daemon, StartDaemon
from tests.support.frontend import (
    ALL_FEATURES,
    DESC_SIZE,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    DriverQueue,
    KiB,
    MiB,
)

SECTOR = SECTOR_SIZE
shared = pytest.mark.shared_daemon  # see conftest: the module's daemon, not a fresh one
HOLE_GPA = 512 * MiB  # between the two regions of connect_guest's RAM: not guest memory
# Short names: the hostile chains below are written one descriptor list per line.
_hdr, _buf, _table, _direct = raw_header, raw_buffer, raw_table, raw_chain


# =========================================================================================
# Hostile chains
# =========================================================================================


# GuestRam(64 MiB, 2 regions): region 0 is [0, 32 MiB), region 1 starts at 1 GiB.
REGION0_END = 32 * MiB


@dataclass
class BadChain:
    head: int  # what goes into the avail ring
    descs: list[int]  # main-table descriptors to release afterwards
    status_gpa: int | None  # a status byte the device must leave alone
    used: bool = True  # whether the device returns the head (with length 0)


N, W, I = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT  # noqa: E741 (flags)


def bad_outside_memory(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (HOLE_GPA, 512, W | N, 2), (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_straddles_region_end(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (REGION0_END - 256, 512, W | N, 2), (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_huge_length(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(
        q, [(_hdr(ram), 16, N, 1), (_buf(ram, 512), 0xFFFF_FFFF, W | N, 2), (st, 1, W, None)]
    )
    return BadChain(d[0], d, st)


def bad_address_wraps(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (2**64 - 256, 512, W | N, 2), (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_loop(q: DriverQueue) -> BadChain:
    ram = q.ram
    d = _direct(
        q,
        [
            (_hdr(ram, VIRTIO_BLK_T_OUT), 16, N, 1),
            (_buf(ram, 512), 512, N, 2),
            (_buf(ram, 512), 512, N, 1),
        ],
    )
    return BadChain(d[0], d, None)


def bad_self_loop_writable(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (st, 1, W | N, 1)])
    return BadChain(d[0], d, st)


def bad_indirect_longer_than_queue(q: DriverQueue) -> BadChain:
    ram = q.ram
    n = q.num + 1
    st = _buf(ram, 1)
    entries = (
        [(_hdr(ram), 16, N, 1)]
        + [(_buf(ram, 512), 512, W | N, k + 2) for k in range(n - 2)]
        + [(st, 1, W, 0)]
    )
    d = _direct(q, [(_table(ram, entries), DESC_SIZE * n, I, None)])
    return BadChain(d[0], d, st)


def bad_nested_indirect(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    inner = _table(ram, [(st, 1, W, 0)])
    outer = _table(ram, [(_hdr(ram), 16, N, 1), (inner, DESC_SIZE, I, 0)])
    d = _direct(q, [(outer, 2 * DESC_SIZE, I, None)])
    return BadChain(d[0], d, st)


def bad_indirect_outside_memory(q: DriverQueue) -> BadChain:
    d = _direct(q, [(HOLE_GPA, 3 * DESC_SIZE, I, None)])
    return BadChain(d[0], d, None)


def bad_indirect_with_next(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    table = _table(ram, [(_hdr(ram), 16, N, 1), (st, 1, W, 0)])
    d = _direct(q, [(table, 2 * DESC_SIZE, I | N, 1), (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_indirect_length(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    table = _table(ram, [(_hdr(ram), 16, N, 1), (st, 1, W, 0)])
    d = _direct(q, [(table, DESC_SIZE + 8, I, None)])
    return BadChain(d[0], d, st)


def bad_indirect_empty(q: DriverQueue) -> BadChain:
    d = _direct(q, [(_buf(q.ram, 64), 0, I, None)])
    return BadChain(d[0], d, None)


def bad_indirect_loop(q: DriverQueue) -> BadChain:
    ram = q.ram
    table = _table(ram, [(_hdr(ram), 16, N, 1), (_buf(ram, 16), 16, N, 0)])
    d = _direct(q, [(table, 2 * DESC_SIZE, I, None)])
    return BadChain(d[0], d, None)


def bad_indirect_next_out_of_table(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    table = _table(ram, [(_hdr(ram), 16, N, 1), (st, 1, W | N, 2)])
    d = _direct(q, [(table, 2 * DESC_SIZE, I, None)])
    return BadChain(d[0], d, st)


def bad_status_readable(q: DriverQueue) -> BadChain:
    """A complete write request whose 'status' buffer is device-readable: the walker
    accepts it, but there is nowhere to answer, so the device must not do the write."""
    ram = q.ram
    st = _buf(ram, 1)
    data = ram.alloc(512)
    ram.write(data, b"\x66" * 512)
    d = _direct(
        q, [(_hdr(ram, VIRTIO_BLK_T_OUT, 5), 16, N, 1), (data, 512, N, 2), (st, 1, 0, None)]
    )
    return BadChain(d[0], d, st)


def bad_readable_after_writable(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(
        q,
        [
            (_hdr(ram), 16, N, 1),
            (_buf(ram, 512), 512, W | N, 2),
            (_buf(ram, 16), 16, N, 3),
            (st, 1, W, None),
        ],
    )
    return BadChain(d[0], d, st)


def bad_next_out_of_range(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (st, 1, W | N, q.num + 5)])
    return BadChain(d[0], d, st)


def bad_head_out_of_range(q: DriverQueue) -> BadChain:
    return BadChain(q.num + 3, [], None, used=False)


HOSTILE: dict[str, tuple[Callable[[DriverQueue], BadChain], str]] = {
    "outside-memory": (bad_outside_memory, "buffer outside guest memory"),
    "straddles-region-end": (bad_straddles_region_end, "buffer outside guest memory"),
    "huge-length": (bad_huge_length, "buffer outside guest memory"),
    "address-wraps": (bad_address_wraps, "buffer outside guest memory"),
    "loop": (bad_loop, "descriptor loop"),
    "self-loop": (bad_self_loop_writable, "descriptor loop"),
    "indirect-longer-than-queue": (
        bad_indirect_longer_than_queue,
        "chain longer than the queue size",
    ),
    "nested-indirect": (bad_nested_indirect, "nested indirect descriptor"),
    "indirect-outside-memory": (bad_indirect_outside_memory, "indirect table outside guest memory"),
    "indirect-with-next": (bad_indirect_with_next, "indirect descriptor with NEXT set"),
    "indirect-length": (bad_indirect_length, "indirect table length not a positive multiple"),
    "indirect-empty": (bad_indirect_empty, "indirect table length not a positive multiple"),
    "indirect-loop": (bad_indirect_loop, "descriptor loop"),
    "indirect-next-out-of-table": (
        bad_indirect_next_out_of_table,
        "next index outside its descriptor table",
    ),
    "status-readable": (bad_status_readable, "no device-writable status byte"),
    "readable-after-writable": (
        bad_readable_after_writable,
        "device-readable descriptor after a device-writable one",
    ),
    "next-out-of-range": (bad_next_out_of_range, "next index outside its descriptor table"),
}


def submit_bad_chain(g: Guest, make: Callable[[DriverQueue], BadChain]) -> BadChain:
    """Publish a hostile chain alone, kick, and wait until the device has dealt with it."""
    blk, q = g.blk, g.queue
    bad = make(q)
    used_before = q.used_idx()
    q.put_avail(bad.head)
    q.kick()
    if bad.used:
        deadline = time.monotonic() + 5
        while not blk.unexpected_used:
            blk.collect()
            if blk.unexpected_used:
                break
            q.enable_cb()
            blk.collect()
            assert time.monotonic() < deadline, "the bad chain was never returned"
            q.wait_call(0.05)
        assert blk.unexpected_used == [(bad.head, 0)]
        blk.unexpected_used.clear()
        q.release_descs(bad.descs)
    else:
        time.sleep(0.05)
        assert q.used_idx() == used_before
    return bad


@shared
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_chain(daemon: Daemon, case: str) -> None:
    make, logged = HOSTILE[case]
    data0 = pattern(19, SECTOR)
    disk_write(daemon, 5 * SECTOR, data0)
    with connect_guest(daemon) as g:
        check_io_works(g, daemon, sector=50)
        bad = submit_bad_chain(g, make)
        if bad.status_gpa is not None:
            assert g.ram.read(bad.status_gpa, 1)[0] == STATUS_UNTOUCHED
        daemon.wait_log(logged)
        # the same queue goes on
        check_io_works(g, daemon, sector=60)
    assert disk_read(daemon, 5 * SECTOR, SECTOR) == data0  # status-readable write not done
    check_new_connection_works(daemon)


@shared
def test_hostile_chains_mixed_into_a_batch(daemon: Daemon) -> None:
    """Bad chains among good ones in one pass: each good one completes, each bad one is
    returned with length 0, and the batch goes on."""
    with connect_guest(daemon, queue_size=256) as g:
        blk, q = g.blk, g.queue
        goods: list[tuple[BlkRequest, int, bytes]] = []
        bads: list[BadChain] = []
        makers = [m for m, _t in HOSTILE.values()]
        for k, make in enumerate(makers):
            data = pattern(200 + k, 1024)
            goods.append((blk.submit_write(2000 + 2 * k, data), 2000 + 2 * k, data))
            bad = make(q)
            q._put_ring_entry(bad.head)  # unpublished; all go out at once below
            bads.append(bad)
        blk.publish_and_kick()
        cs = blk.wait([t for t, _s, _d in goods])
        assert all(c.ok for c in cs)
        for _t, s, data in goods:
            assert disk_read(daemon, s * SECTOR, len(data)) == data
        returned = sorted(blk.unexpected_used)
        assert returned == sorted((b.head, 0) for b in bads if b.used)
        check_io_works(g, daemon)
    check_new_connection_works(daemon)


@shared
def test_indirect_without_feature_is_rejected(daemon: Daemon) -> None:
    features = ALL_FEATURES & ~(1 << VIRTIO_RING_F_INDIRECT_DESC)
    with connect_guest(daemon, features=features) as g:
        assert not g.fe.features & (1 << VIRTIO_RING_F_INDIRECT_DESC)
        before = disk_read(daemon, 3 * SECTOR, 512)
        req = g.blk.submit_write(3, pattern(21, 512), indirect=True)
        c = g.blk.kick_and_wait([req])[0]
        assert (c.status, c.used_len) == (None, 0)
        assert disk_read(daemon, 3 * SECTOR, 512) == before
        daemon.wait_log("INDIRECT_DESC not negotiated")
        check_io_works(g, daemon)


def test_bad_chains_do_not_flood_the_log(daemon: Daemon) -> None:
    with connect_guest(daemon, queue_size=256) as g:
        for _ in range(3):
            bads = [bad_loop(g.queue) for _ in range(60)]
            for b in bads:
                g.queue.put_avail(b.head)
            g.queue.kick()
            g.queue.wait_used_idx(g.queue.avail_idx)
            g.blk.collect()
            assert len(g.blk.unexpected_used) == 60
            g.blk.unexpected_used.clear()
            for b in bads:
                g.queue.release_descs(b.descs)
        check_io_works(g, daemon)
        assert 1 <= daemon.log_count("descriptor loop") <= 10, daemon.log_text()


# =========================================================================================
# Broken queues
# =========================================================================================


def _break_queue0(d: Daemon, g: Guest, how: str = "avail-idx-jump") -> None:
    """Make queue 0's avail ring garbage -- claim more available buffers than it holds,
    or offer a head outside the table -- and wait for the daemon to give up on it."""
    q0 = g.drivers[0].queue
    if how == "avail-idx-jump":
        q0.set_avail_idx(q0.avail_idx + q0.num + 1)
        q0.kick()
        d.wait_log("avail index moved further than the queue size")
    else:
        submit_bad_chain(g, bad_head_out_of_range)
        d.wait_log("head index outside the descriptor table")
    d.wait_log("ring broken")


@pytest.mark.parametrize("how", ["avail-idx-jump", "head-out-of-range"])
def test_garbage_avail_ring_breaks_only_that_queue(start_daemon: StartDaemon, how: str) -> None:
    d = start_daemon("--num-queues", "2")
    data = pattern(23, 8 * KiB)
    with connect_guest(d, queues=2) as g:
        q0, b0, b1 = g.drivers[0].queue, g.drivers[0], g.drivers[1]
        check_io_works(g, d)
        _break_queue0(d, g, how)
        # queue 0 is stopped: a sane index and a good request get no answer
        q0.drain_call()
        if how == "avail-idx-jump":
            q0.set_avail_idx(q0.avail_idx - q0.num - 1)
        r = b0.submit_write(11, pattern(22, 512))
        b0.publish_and_kick()
        assert not q0.wait_call(0.3)
        assert not r.done
        assert disk_read(d, 11 * SECTOR, 512) == bytes(512)
        # queue 1 keeps working
        assert b1.write(400, data) == VIRTIO_BLK_S_OK
        assert disk_read(d, 400 * SECTOR, len(data)) == data
        assert b1.read(400, len(data)) == data
        assert d.log_count("ring broken") == 1
    with connect_guest(d, queues=2) as g:
        check_io_works(g, d)
        assert g.drivers[1].read(400, len(data)) == data


def test_err_fd_signalled_when_ring_breaks(daemon: Daemon) -> None:
    with connect_guest(daemon) as g:
        err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            g.fe.set_vring_err(0, err)
            check_io_works(g, daemon)
            with pytest.raises(BlockingIOError):
                os.eventfd_read(err)  # not for good requests (or bad chains)
            _break_queue0(daemon, g)
            assert select.select([err], [], [], 2)[0], "err eventfd not signalled"
            assert os.eventfd_read(err) >= 1
        finally:
            os.close(err)


def test_broken_queue_restarts_after_get_vring_base(start_daemon: StartDaemon) -> None:
    d = start_daemon("--num-queues", "2")
    with connect_guest(d, queues=2) as g:
        check_io_works(g, d)
        _break_queue0(d, g)
        g.fe.stop_queue(0)
        blk = BlkDriver(g.fe.setup_queue(0, 128))
        data = pattern(24, 4 * KiB)
        assert blk.write(12, data) == VIRTIO_BLK_S_OK
        assert disk_read(d, 12 * SECTOR, len(data)) == data
        assert d.log_count("ring broken") == 1


def test_broken_queue_restarts_when_set_up_again(start_daemon: StartDaemon) -> None:
    """The log promises 'queue stopped until the front end sets it up again': a plain
    set-up (NUM, BASE 0, ADDR, KICK, CALL, ENABLE) with no GET_VRING_BASE must revive it
    (the new SET_VRING_BASE must win over the index the dead worker stopped at)."""
    d = start_daemon("--num-queues", "2")
    with connect_guest(d, queues=2) as g:
        check_io_works(g, d)
        _break_queue0(d, g)
        blk = BlkDriver(g.fe.setup_queue(0, 128))
        data = pattern(24, 4 * KiB)
        assert blk.write(12, data, timeout=1.0) == VIRTIO_BLK_S_OK
        assert disk_read(d, 12 * SECTOR, len(data)) == data
        assert d.log_count("ring broken") == 1
