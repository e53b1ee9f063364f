"""The life of a vhost-user-blk connection and of the daemon: RESET_DEVICE and a fresh
set-up, front ends that disconnect mid-I/O or with junk state (fds, mappings and threads
back to their idle figures in /proc, the next front end served), one front end at a
time, and SIGTERM (idle, connected, with I/O in flight: exit 0, data on disk).
"""

from __future__ import annotations

import select
import socket
import struct
import time

import pytest

from tests.support.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    BlkDriver,
    BlkRequest,
    Guest,
    check_io_works,
    check_new_connection_works,
    connect_guest,
    disk_read,
    pattern,
)
from tests.support.daemon import Daemon, StartDaemon
from tests.support.frontend import (
    KiB,
)
from tests.support.wire import header
from vhost.protocol import (
    Request,
)

SECTOR = SECTOR_SIZE
shared = pytest.mark.shared_daemon  # see conftest: the module's daemon, not a fresh one


# =========================================================================================
# Reset
# =========================================================================================


@shared
def test_reset_device_then_set_up_again(guest: Guest) -> None:
    d = guest.daemon
    check_io_works(guest, d)
    guest.fe.reset_device()
    # the old ring is no longer served
    guest.queue.drain_stale_calls()
    data = pattern(32, 4 * KiB)
    before = disk_read(d, 33 * SECTOR, len(data))
    stale = guest.blk.submit_write(33, data)
    guest.blk.publish_and_kick()
    assert not guest.queue.wait_call(0.3)
    assert not stale.done
    assert disk_read(d, 33 * SECTOR, len(data)) == before
    guest.fe.set_features(guest.fe.features)
    guest.fe.set_mem_table()
    blk = BlkDriver(guest.fe.setup_queue(0, 128))
    data = pattern(27, 4 * KiB)
    assert blk.write(33, data) == VIRTIO_BLK_S_OK
    assert disk_read(d, 33 * SECTOR, len(data)) == data


# =========================================================================================
# Disconnects and resource leaks
# =========================================================================================


def test_disconnect_mid_io_cycles_leak_nothing(start_daemon: StartDaemon) -> None:
    d = start_daemon("--num-queues", "2")
    idle = d.resources()
    assert idle["memfd_maps"] == 0
    cycles, per_cycle, size = 20, 96, 4 * KiB
    completed: dict[int, bytes] = {}  # sector -> data whose completion we saw
    uncertain: dict[int, bytes] = {}  # sector -> data submitted, completion not seen
    for c in range(cycles):
        g = connect_guest(d, queues=2, queue_size=256)
        try:
            during = d.resources()
            assert during["memfd_maps"] >= 1
            assert during["threads"] == idle["threads"] + 2
            # check what earlier cycles wrote
            for sector, data in list(completed.items())[-8:]:
                assert g.blk.read(sector, size) == data
            reqs: list[tuple[BlkRequest, int, bytes]] = []
            for k in range(per_cycle):
                sector = (c * per_cycle + k) * 8
                data = pattern(c * 1000 + k, size)
                blk = g.drivers[k % 2]
                reqs.append((blk.submit_write(sector, data, segs=2), sector, data))
                if k == per_cycle // 2:  # see the first half through on queue 0
                    for b in g.drivers:
                        b.publish_and_kick()
                    g.drivers[0].wait([r for r, _s, _d in reqs[0::2]])
            for b in g.drivers:
                b.publish_and_kick()
            for b in g.drivers:
                b.collect()
        finally:
            g.close()  # no GET_VRING_BASE: just hang up with requests in flight
        for r, sector, data in reqs:
            (completed if r.done else uncertain)[sector] = data
        d.wait_disconnects(c + 1)
        assert d.settled_resources(idle) == idle, f"cycle {c}"
    assert len(completed) >= cycles * 4
    for sector, data in completed.items():
        assert disk_read(d, sector * SECTOR, size) == data
    for sector, data in uncertain.items():
        assert disk_read(d, sector * SECTOR, size) in (data, bytes(size))
    with connect_guest(d) as g:
        for sector, data in list(completed.items())[:50]:
            assert g.blk.read(sector, size) == data


def test_disconnect_while_queue_stopped_and_with_junk_state(daemon: Daemon) -> None:
    """Hang-ups in odd states: memory but no queue, a stopped queue, a queue with no
    call fd, memory added by ADD_MEM_REG and half removed."""
    idle = daemon.resources()
    with connect_guest(daemon, queues=0):
        pass
    with connect_guest(daemon) as g:
        check_io_works(g, daemon)
        g.fe.stop_queue(0)
    with connect_guest(daemon, add_mem_reg=True) as g:
        check_io_works(g, daemon)
        g.fe.remove_mem_region(1)
    daemon.wait_disconnects(3)
    assert daemon.settled_resources(idle) == idle


@shared
def test_second_front_end_waits_for_the_first(daemon: Daemon) -> None:
    """One front end at a time: a second connection is served once the first leaves."""
    g1 = connect_guest(daemon)
    try:
        check_io_works(g1, daemon)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.socket_path))
        s.sendall(header(Request.GET_FEATURES, 1, 0))
        assert not select.select([s], [], [], 0.3)[0]  # not served yet
        check_io_works(g1, daemon, sector=3000)
    finally:
        g1.close()
    assert select.select([s], [], [], 5)[0]
    reply = s.recv(64)
    s.close()
    assert len(reply) == 20 and struct.unpack_from("<I", reply)[0] == Request.GET_FEATURES
    check_new_connection_works(daemon)


# =========================================================================================
# SIGTERM
# =========================================================================================


def test_sigterm_while_idle(daemon: Daemon) -> None:
    assert daemon.socket_path.exists()
    assert daemon.terminate() == 0
    assert not daemon.socket_path.exists()
    assert "stopped" in daemon.log_text()


def test_sigterm_while_connected_keeps_data(daemon: Daemon) -> None:
    with connect_guest(daemon) as g:
        data = pattern(24, 256 * KiB)
        assert g.blk.write(512, data, segs=8) == VIRTIO_BLK_S_OK
        assert daemon.terminate() == 0
        assert g.fe.is_closed_by_peer(1.0)
    assert not daemon.socket_path.exists()
    assert disk_read(daemon, 512 * SECTOR, len(data)) == data


def test_sigterm_with_io_in_flight(daemon: Daemon) -> None:
    with connect_guest(daemon, queue_size=256) as g:
        blk = g.blk
        before = pattern(25, 64 * KiB)
        assert blk.write(0, before) == VIRTIO_BLK_S_OK
        reqs = [
            (
                blk.submit_write(1024 + k * 512, pattern(300 + k, 256 * KiB), indirect=True),
                1024 + k * 512,
                pattern(300 + k, 256 * KiB),
            )
            for k in range(120)
        ]
        blk.publish_and_kick()
        time.sleep(0.005)
        assert daemon.terminate() == 0
        blk.collect()
        done = [(s, data) for r, s, data in reqs if r.done]
        for r, _s, _d in reqs:
            assert not r.done or (r.completion is not None and r.completion.ok)
    assert not daemon.socket_path.exists()
    assert disk_read(daemon, 0, len(before)) == before
    for s, data in done:
        assert disk_read(daemon, s * SECTOR, len(data)) == data
    for r, s, data in reqs:
        if not r.done:
            assert disk_read(daemon, s * SECTOR, len(data)) in (data, bytes(len(data)))


def test_flush_before_exit_for_requests_in_queue(daemon: Daemon) -> None:
    """A clean stop after GET_VRING_BASE: everything before it is on disk."""
    with connect_guest(daemon) as g:
        for k in range(20):
            assert g.blk.write(k * 8, pattern(400 + k, 4 * KiB)) == VIRTIO_BLK_S_OK
        assert g.fe.stop_queue(0) == 20
    assert daemon.terminate() == 0
    for k in range(20):
        assert disk_read(daemon, k * 8 * SECTOR, 4 * KiB) == pattern(400 + k, 4 * KiB)
