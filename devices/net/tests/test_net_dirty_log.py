"""Dirty-page logging on the switch: frames a port receives are written into its guest's
rx buffers by the engine thread, and those buffers (and the rx used ring) are marked in
that port's log, whatever port sent them; the sender's tx buffers, which the device only
reads, are not."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.daemon import Daemon
from tests.support.dirtylog import FrontEndLog, pages, start_logging, stop_logging, used_ring_pages
from tests.support.net import BROADCAST, NO_OFFLOADS, NetPort, tagged_frame

StartNet = Callable[..., Daemon]


def test_rx_buffers_are_marked_in_the_receivers_log(start_net: StartNet) -> None:
    d = start_net("--switch", "sw0", ports=2)
    a, b = ports = [NetPort(s, features=NO_OFFLOADS) for s in d.sockets]
    log = FrontEndLog.for_ram(b.ram)
    a_log = FrontEndLog.for_ram(a.ram)
    try:
        start_logging(b.fe, log)
        start_logging(a.fe, a_log)
        heads = b.post_rx(16, 2048)
        bufs = {h: list(b._rx_bufs[0][h]) for h in heads}
        log.take()  # the restarted queues' avail_event writes
        a_log.take()
        frames = [tagged_frame(BROADCAST, a.mac, seq, 600) for seq in range(16)]
        a.send(*frames)
        got = b.receive(16)
        assert [f.frame for f in got] == frames
        used = {h for f in got for h, _ in f.chains}
        assert used == set(heads)
        expect = {p for h in used for gpa, n in bufs[h] for p in pages(gpa, n)}
        rings = used_ring_pages(b.rxq[0]) | used_ring_pages(b.txq[0])
        marked = log.take()
        assert marked - rings == expect - rings
        assert marked & used_ring_pages(b.rxq[0])
        # the sender's tx buffers were only read: its log has its used rings, no data
        assert a_log.take() <= used_ring_pages(a.rxq[0]) | used_ring_pages(a.txq[0])

        stop_logging(b.fe)
        log.take()  # what the engine wrote (avail_event) before logging went off
        b.post_rx(4, 2048)
        a.send(*frames[:4])
        b.receive(4)
        assert log.take() == set()
    finally:
        log.close()
        a_log.close()
        for p in ports:
            p.close()
