"""SET_VRING_CALL signals the new call fd once (as libvhost-user does), so that a
completion published just before the back end died is never left waiting for an
interrupt the dead process did not send; an idle queue set up afresh takes the one
extra interrupt harmlessly."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.blk import (
    VIRTIO_BLK_S_OK,
    BlkDriver,
    check_io_works,
    connect_guest,
    disk_read,
    pattern,
)
from tests.support.daemon import Daemon, spawn_blk
from tests.support.frontend import FrontEnd, KiB
from vhost.protocol import SetVringCall


def test_completion_published_before_a_crash_is_signalled_after_the_restart(
    tmp_path: Path,
) -> None:
    d = spawn_blk(tmp_path, "crash")
    d2: Daemon | None = None
    with connect_guest(d) as g:
        q = g.queue
        # The crafted state: the dead daemon's signal went nowhere the driver listens
        # (a call fd of its own), so the driver sees the used entry only if it looks.
        lost = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        g.fe.request_ack(SetVringCall(0, lost))
        os.close(lost)
        q.drain_call()
        data = pattern(1, 4 * KiB)
        req = g.blk.submit_write(8, data)
        g.blk.publish_and_kick()
        q.wait_used_idx(1)  # published ...
        assert not q.drain_call(), "... and not signalled to the driver"
        d.kill9()

        d2 = d.respawn(tmp_path / "restarted.log")
        fe = FrontEnd(d2.socket_path, g.ram).connect()
        g.fe = fe  # closed with the guest
        try:
            fe.negotiate()
            fe.set_mem_table()
            fe.announce_queue(0, q, q.used_idx())  # QEMU sends the used index after a crash
            assert q.wait_call(5.0), "the driver waited forever for its completion"
            g.blk.collect()
            assert req.completion is not None and req.completion.status == VIRTIO_BLK_S_OK
            assert disk_read(d2, 8 * 512, len(data)) == data
            g.drivers = [BlkDriver(q)]
            check_io_works(g, d2)
        finally:
            fe.close()
            d2.stop()


def test_an_idle_queue_set_up_afresh_takes_one_extra_interrupt(daemon: Daemon) -> None:
    with connect_guest(daemon) as g:
        q = g.queue
        assert q.wait_call(5.0), "SET_VRING_CALL signals the new fd once"
        assert not q.drain_call(), "once, not more"
        assert q.get_used() == []  # nothing was completed: a spurious interrupt
        check_io_works(g, daemon)
