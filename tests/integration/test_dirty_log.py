"""Dirty-page logging over a real socket, as QEMU drives it for a live migration:
SET_LOG_BASE with a memfd log, SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR with the
log flag. With logging on, the pages marked are exactly those of the buffers the front
end handed out for the device to write (blk data and status, the used ring), never a
page the device only read; with it off nothing is marked; turning it on and off in the
middle of a stream loses no request. Junk SET_LOG_BASE gets a clear error and writes
nothing. GET_VRING_BASE replies after every request taken is published.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.support.blk import (
    VIRTIO_BLK_S_OK,
    BlkRequest,
    Guest,
    check_io_works,
    connect_guest,
    disk_read,
    pattern,
)
from tests.support.daemon import Daemon
from tests.support.dirtylog import (
    PAGE,
    TAIL,
    FrontEndLog,
    pages,
    set_log_base,
    set_vring_log,
    start_logging,
    stop_logging,
    used_ring_pages,
)
from tests.support.frontend import F_LOG_ALL, PF_LOG_SHMFD, AckError, FrontEnd, GuestRam, KiB
from vhost.protocol import (
    GetVringBase,
    SetLogBase,
    SetLogFd,
    SetProtocolFeatures,
    U64Reply,
    VringStateReply,
)


def writable_pages(req: BlkRequest) -> set[int]:
    """What the front end handed out for the device to write: data segments, status."""
    out = pages(req.status_gpa, 1)
    for gpa, n in req.in_segs:
        out |= pages(gpa, n)
    return out


@pytest.fixture
def g(daemon: Daemon) -> Iterator[Guest]:
    with connect_guest(daemon, buf_regions=(0, 1)) as guest:
        yield guest


@pytest.fixture
def log(g: Guest) -> Iterator[FrontEndLog]:
    lg = FrontEndLog.for_ram(g.ram, offset=8)
    yield lg
    lg.close()


def test_offered(g: Guest) -> None:
    assert g.fe.offered_features & F_LOG_ALL
    assert g.fe.offered_protocol_features & PF_LOG_SHMFD
    assert g.fe.protocol_features & PF_LOG_SHMFD


def test_marks_exactly_what_the_device_wrote(g: Guest, daemon: Daemon, log: FrontEndLog) -> None:
    blk = g.blk
    check_io_works(g, daemon)  # before logging: nothing is marked
    start_logging(g.fe, log)
    # the restarted queue asks for a kick: only its avail_event (in the used ring) changed
    assert log.take() <= used_ring_pages(g.queue)

    # reads: the device writes data and status
    for sector, data in ((0, pattern(1, 16 * KiB)), (200, pattern(2, 4 * KiB + 512))):
        with open(daemon.image_path, "r+b") as f:
            os.pwrite(f.fileno(), data, sector * 512)
        reqs = [blk.submit_read(sector, len(data), segs=3) for _ in range(4)]
        done = blk.kick_and_wait(reqs)
        assert all(c.ok and c.data == data for c in done)
        expect = set().union(*map(writable_pages, reqs)) | used_ring_pages(g.queue)
        got = log.take()
        assert got - used_ring_pages(g.queue) == expect - used_ring_pages(g.queue)
        assert got & used_ring_pages(g.queue), "the used ring is logged"

    # writes: the device reads the data and writes only the status
    data = pattern(3, 32 * KiB)
    reqs = [blk.submit_write(64 * i, data, segs=4) for i in range(4)]
    assert all(c.ok for c in blk.kick_and_wait(reqs))
    got = log.take() - used_ring_pages(g.queue)
    assert got == set().union(*map(writable_pages, reqs)) - used_ring_pages(g.queue)
    for r in reqs:
        assert disk_read(daemon, r.sector * 512, len(data)) == data

    stop_logging(g.fe)
    log.take()  # avail_event, written after the take above, before logging went off
    check_io_works(g, daemon)
    assert log.take() == set(), "nothing is marked once LOG_ALL is off"


def test_toggle_in_the_middle_of_a_stream(g: Guest, daemon: Daemon, log: FrontEndLog) -> None:
    """Requests in flight while LOG_ALL goes on and off all complete, and each one that
    completed while logging was on is marked."""
    blk = g.blk
    assert set_log_base(g.fe, log).value == 0
    data = pattern(4, 4 * KiB)
    with open(daemon.image_path, "r+b") as f:
        os.pwrite(f.fileno(), data, 0)
    for round_ in range(6):
        reqs = [blk.submit_read(0, len(data)) for _ in range(16)]
        blk.publish_and_kick()
        if round_ % 2 == 0:
            g.fe.set_features(g.fe.features | F_LOG_ALL)
            set_vring_log(g.fe, 0, g.queue, True)
        else:
            stop_logging(g.fe)
        done = blk.kick_and_wait(reqs)
        assert all(c.ok and c.data == data for c in done)
        got = log.take()
        if round_ % 2 == 0:
            # taken after the switch (the rest completed before it with logging off) ...
            assert got <= set().union(*map(writable_pages, reqs)) | used_ring_pages(g.queue)
            # ... and anything completed from now on is marked
            more = [blk.submit_read(0, len(data)) for _ in range(4)]
            assert all(c.ok for c in blk.kick_and_wait(more))
            assert set().union(*map(writable_pages, more)) <= log.take()
    check_io_works(g, daemon)


def test_a_new_log_replaces_the_old(g: Guest, daemon: Daemon, log: FrontEndLog) -> None:
    start_logging(g.fe, log)
    check_io_works(g, daemon)
    assert log.take()
    new = FrontEndLog.for_ram(g.ram)
    try:
        assert set_log_base(g.fe, new).value == 0
        check_io_works(g, daemon)
        assert new.take()
        assert log.take() == set(), "the old log is no longer written"
    finally:
        new.close()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no-fd", "no fd attached"),
        ("offset-past-file", "runs past the end"),
        ("too-small", "covers guest memory up to"),
        ("empty", "not in 1.."),
        ("not-a-file", "not a file"),
    ],
)
def test_junk_log_base_is_refused(g: Guest, daemon: Daemon, case: str, match: str) -> None:
    good = FrontEndLog.for_ram(g.ram)
    try:
        fd, size, offset = good.fd, good.size, 0
        r = w = -1
        if case == "no-fd":
            fd = None  # type: ignore[assignment]
        elif case == "offset-past-file":
            offset = good.size + TAIL + PAGE
        elif case == "too-small":
            size = good.size // 2
        elif case == "empty":
            size = 0
        elif case == "not-a-file":
            r, w = os.pipe()
            fd = r
        reply = g.fe.request(SetLogBase(size, offset, fd))
        assert reply is None
        reply = g.fe.read_reply(what="SET_LOG_BASE reply")
        assert isinstance(reply, U64Reply) and reply.value != 0
        if r >= 0:
            os.close(r)
            os.close(w)
        daemon.wait_log(match)
        # LOG_ALL without a usable log: the queue writes nothing (a write not logged
        # is a page a migration loses) until LOG_ALL goes off; the connection goes on
        g.fe.set_features(g.fe.features | F_LOG_ALL)
        set_vring_log(g.fe, 0, g.queue, True)
        req = g.blk.submit_write(30, pattern(6, 4096))
        g.blk.publish_and_kick()
        time.sleep(0.3)
        assert g.queue.used_idx() == 0 and not req.done
        assert good.take() == set()
        stop_logging(g.fe)
        assert g.blk.kick_and_wait([req])[0].ok
        check_io_works(g, daemon)
    finally:
        good.close()


def test_log_all_before_log_base_waits_for_the_log(
    g: Guest, daemon: Daemon, log: FrontEndLog
) -> None:
    """QEMU's order when it reconnects during a migration (vhost_dev_start: SET_FEATURES
    with LOG_ALL first, SET_LOG_BASE last): requests wait for the log, then run logged."""
    check_io_works(g, daemon)
    g.fe.set_features(g.fe.features | F_LOG_ALL)
    set_vring_log(g.fe, 0, g.queue, True)
    daemon.wait_log("queues wait for the log")
    reqs = [g.blk.submit_read(8 * i, 4096) for i in range(4)]
    g.blk.publish_and_kick()
    time.sleep(0.3)
    used = g.queue.used_idx()
    assert not any(r.done for r in reqs)
    assert set_log_base(g.fe, log).value == 0
    assert all(c.ok for c in g.blk.kick_and_wait(reqs))
    assert g.queue.used_idx() == (used + 4) & 0xFFFF
    marked = log.take()
    assert set().union(*map(writable_pages, reqs)) <= marked


def test_log_base_needs_log_shmfd(daemon: Daemon) -> None:
    ram = GuestRam(16 << 20, 1)
    fe = FrontEnd(daemon.socket_path, ram)
    log = FrontEndLog(16 << 20)
    try:
        fe.connect()
        fe.negotiate()
        fe.protocol_features &= ~PF_LOG_SHMFD
        fe.request(SetProtocolFeatures(fe.protocol_features))
        fe.set_mem_table()
        fe.request(SetLogBase(log.size, 0, log.fd))
        reply = fe.read_reply(what="SET_LOG_BASE reply")
        assert isinstance(reply, U64Reply) and reply.value != 0
        daemon.wait_log("LOG_SHMFD was not negotiated")
    finally:
        fe.close()
        ram.close()
        log.close()


def test_get_vring_base_waits_for_every_request(g: Guest, daemon: Daemon) -> None:
    """A full ring of writes in flight: the reply to GET_VRING_BASE comes after every
    request it took is published, and the index it returns is where they end."""
    blk = g.blk
    data = pattern(5, 64 * KiB)
    n = 32
    reqs = [blk.submit_write(128 * i, data) for i in range(n)]
    blk.publish_and_kick()
    deadline = time.monotonic() + 5
    while g.queue.used_idx() == 0:  # the worker is in the middle of them
        assert time.monotonic() < deadline, "no request completed"
        time.sleep(0.001)
    r = g.fe.request(GetVringBase(0))
    assert isinstance(r, VringStateReply)
    used = g.queue.used_idx()
    assert r.num == used, "every request taken was published before the reply"
    assert 0 < used <= n
    done = blk.collect()
    assert done == used
    assert all(req.completion is not None and req.completion.status == VIRTIO_BLK_S_OK
               for req in reqs[:used])  # fmt: skip
    for req in reqs[:used]:
        assert disk_read(daemon, req.sector * 512, len(data)) == data


def test_log_fd_is_signalled_after_updates(g: Guest, daemon: Daemon, log: FrontEndLog) -> None:
    """SET_LOG_FD's eventfd is written after a burst set bits (none while logging is
    off); a log fd that is not an eventfd or a pipe is refused."""
    with open(daemon.image_path, "rb") as f:  # a regular file
        bad = os.dup(f.fileno())
    with pytest.raises(AckError):
        g.fe.request_ack(SetLogFd(bad))
    daemon.wait_log("notifier fd is not an eventfd")
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        g.fe.request_ack(SetLogFd(os.dup(efd)))
        check_io_works(g, daemon)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        start_logging(g.fe, log)
        check_io_works(g, daemon)
        assert os.eventfd_read(efd) > 0
        assert log.take()
    finally:
        os.close(efd)
