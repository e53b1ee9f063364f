"""Dirty-page logging reaches a device on the Python chain API: the pages of the chains
vhost-user-rng filled are marked (through vu_vq_push_batch, the one place the C walker
logs), the chains it did not fill are not."""

from __future__ import annotations

from tests.support.daemon import Daemon
from tests.support.dirtylog import FrontEndLog, pages, start_logging, stop_logging, used_ring_pages
from tests.support.rng import connect_rng


def test_filled_chains_are_marked(rng: Daemon) -> None:
    with connect_rng(rng, buf_regions=(0, 1)) as g:
        log = FrontEndLog.for_ram(g.ram)
        try:
            start_logging(g.fe, log)
            log.take()  # the queue's restart wrote avail_event
            heads = g.driver.post([100, 5000, 64 * 1024], segs=3)
            bufs = {h: list(g.driver.outstanding[h]) for h in heads}
            g.driver.kick()
            done = g.driver.wait(heads)
            assert [len(c.data) for c in done] == [100, 5000, 64 * 1024]
            expect = {p for h in heads for _, gpa, n in bufs[h] for p in pages(gpa, n)}
            ring = used_ring_pages(g.driver.queue)
            got = log.take()
            assert got - ring == expect - ring
            assert got & ring, "the used ring is logged too"

            stop_logging(g.fe)
            log.take()  # avail_event, written after the take above, before logging went off
            heads = g.driver.post([4096])
            g.driver.kick()
            g.driver.wait(heads)
            assert log.take() == set()
        finally:
            log.close()
