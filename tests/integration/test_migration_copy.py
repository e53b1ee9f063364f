"""The dirty log end to end, as a migration uses it: a copier plays QEMU's RAM transfer
(tests/support/dirtylog.py PageCopier: a bulk copy of guest RAM once logging is on, then
repeated passes that take the marked pages out of the log with atomic exchanges and copy
them again, concurrently with the device) while the device works; after GET_VRING_BASE
and a last pass the copy must equal guest RAM page for page. A write the device made
without marking it, or marked before making it, leaves a stale page in the copy.

The buffers the device writes are fresh guest memory the driver never touches, so that
no write of the driver's own (which the copier sees, as QEMU sees the guest CPU's) can
hide a device write that was not logged."""

from __future__ import annotations

import time

from tests.support.blk import BLK_HDR, VIRTIO_BLK_T_IN, connect_guest, pattern
from tests.support.daemon import Daemon
from tests.support.dirtylog import FrontEndLog, PageCopier, copy_while, start_logging, stop_all
from tests.support.frontend import DriverQueue


def wait_used(q: DriverQueue, n: int, timeout: float = 10.0) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    got: list[tuple[int, int]] = []
    while len(got) < n:
        got += q.get_used()
        assert time.monotonic() < deadline, f"{len(got)} of {n} completed"
        time.sleep(0.0005)
    return got


def test_blk_reads_leave_no_stale_page(daemon: Daemon) -> None:
    with connect_guest(daemon, queue_size=128, regions=2) as g:
        assert g.blk.write(0, pattern(1, 1 << 20)) == 0
        log = FrontEndLog.for_ram(g.ram)
        start_logging(g.fe, log)
        copier = PageCopier(log, g.ram)
        q, ram = g.queue, g.ram
        try:

            def reads() -> None:
                for k in range(30):
                    for i in range(24):
                        hdr = ram.alloc(16)
                        ram.write(hdr, BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, (k * 97 + i * 8) % 2040))
                        data = ram.alloc(4096, 4096, region=(k + i) % 2)  # never written by us
                        status = ram.alloc(1, 1, region=(k + i + 1) % 2)
                        q.add_chain([(hdr, 16, False), (data, 4096, True), (status, 1, True)])
                    q.publish()
                    q.kick()
                    wait_used(q, 24)

            copy_while(reads, copier)
            stop_all(g.fe)
            copier.sync()
            assert copier.synced_from_log > 0
            assert copier.stale_pages() == []
        finally:
            copier.close()
            log.close()
