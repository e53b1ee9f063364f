"""Dirty-page logging on the switch: frames a port receives are written into its guest's
rx buffers by the engine thread, and those buffers (and the rx used ring) are marked in
that port's log, whatever port sent them; the sender's tx buffers, which the device only
reads, are not."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.support.daemon import Daemon
from tests.support.dirtylog import (
    FrontEndLog,
    PageCopier,
    copy_while,
    pages,
    start_logging,
    stop_all,
    stop_logging,
    used_ring_pages,
)
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


def test_net_rx_across_many_words_leaves_no_stale_page(start_net: StartNet) -> None:
    """Frames that span several small rx buffers, each buffer in a 64-page word of its
    own, so that one engine pass marks more words than a queue's log cache holds. The
    buffers are fresh memory the driver never wrote (see tests/integration/
    test_migration_copy.py), so only the daemon's marks can bring them into the copy."""
    d = start_net("--switch", "sw0", ports=2)
    a, b = ports = [NetPort(s, features=NO_OFFLOADS, ram_size=64 << 20) for s in d.sockets]
    log = FrontEndLog.for_ram(b.ram)
    try:
        assert b.mergeable
        start_logging(b.fe, log)
        copier = PageCopier(log, b.ram)
        rxq = b.rxq[0]

        def traffic() -> None:
            for _ in range(2):  # 12 MiB of spread buffers each
                for _ in range(48):
                    buf = b.ram.alloc(256, 16)
                    b.ram.alloc((256 << 10) - 256, 16)  # the next buffer in a new word
                    rxq.add_chain([(buf, 256, True)])
                b.publish(rxq)
                frames = [tagged_frame(BROADCAST, a.mac, seq, 700) for seq in range(16)]
                a.send(*frames)
                deadline = time.monotonic() + 10
                got = 0
                while got < 48:  # 16 frames of 712 bytes in 3 buffers each
                    got += len(rxq.get_used())
                    assert time.monotonic() < deadline, f"{got} rx buffers used"
                    time.sleep(0.0005)

        copy_while(traffic, copier)
        stop_all(b.fe)
        copier.sync()
        assert copier.synced_from_log > 0
        assert copier.stale_pages() == []
    finally:
        log.close()
        for p in ports:
            p.close()
