"""The virtio-rng driver of the test front end (virtio 1.x, 5.4): device id 4, one
virtqueue (requestq, index 0), no config space. The driver offers device-writable
buffers; the device fills them with random bytes and returns each chain with the used
length set to the bytes it wrote.

* :class:`RngDriver` -- on a :class:`~tests.support.frontend.DriverQueue`:
  :meth:`~RngDriver.post` offers chains of poisoned buffers (so a device that reports
  more than it wrote shows: the tail still holds the poison), :meth:`~RngDriver.kick`
  publishes and notifies, :meth:`~RngDriver.collect` (no waiting) and
  :meth:`~RngDriver.wait` (on the call eventfd, like the blk driver) read each used
  chain back from guest memory as an :class:`RngCompletion`, and
  :meth:`~RngDriver.read` does all of it for one chain.
* :class:`Rng` / :func:`connect_rng` -- one connection to a running ``vhost-user-rng``
  (a :class:`~tests.support.daemon.Daemon`): negotiated, memory described, requestq set
  up, a driver on it.

Boundary: no assertions about the device here (only about this driver's own
bookkeeping); the tests make those.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Self

from tests.support.daemon import Daemon
from tests.support.frontend import ALL_FEATURES, BufferPool, DriverQueue, FrontEnd, GuestRam, MiB

VIRTIO_ID_RNG = 4
REQUESTQ = 0
POISON = 0xA5


class RngCompletion(NamedTuple):
    """One chain the device returned: its head, what its buffers hold up to the used
    length (cut at the chain's size, read back from guest memory), and the used length
    as the device reported it."""

    head: int
    data: bytes
    used_len: int


def _split(n: int, segs: int) -> list[int]:
    """``n`` bytes in ``segs`` buffers (at least one byte each, so no empty descriptor)."""
    segs = max(1, min(segs, n))
    base, extra = divmod(n, segs)
    return [base + (1 if k < extra else 0) for k in range(segs)]


class RngDriver:
    """virtio-rng on a :class:`DriverQueue`: chains of device-writable buffers from
    per-region :class:`BufferPool` s (round-robin over ``buf_regions``), filled with
    ``poison`` before they are offered and freed when they come back."""

    def __init__(
        self, queue: DriverQueue, *, buf_regions: Sequence[int] = (0,), poison: int = POISON
    ) -> None:
        self.queue = queue
        self.ram = queue.ram
        self.pools = [BufferPool(self.ram, r) for r in buf_regions]
        self.poison = poison
        self._rr = 0
        #: head -> the chain's buffers (pool, gpa, size), in order
        self.outstanding: dict[int, list[tuple[BufferPool, int, int]]] = {}
        #: completions collected and not yet taken by wait()
        self.done: dict[int, RngCompletion] = {}
        #: used entries whose head was not an outstanding chain (a buggy device)
        self.unexpected_used: list[tuple[int, int]] = []

    # --- offering buffers ----------------------------------------------------------------
    def _pool(self) -> BufferPool:
        p = self.pools[self._rr % len(self.pools)]
        self._rr += 1
        return p

    def add_chain(self, size: int, *, segs: int = 1, indirect: bool = False) -> int:
        """Queue (unpublished) one chain of ``size`` poisoned bytes in ``segs`` buffers."""
        if size <= 0:
            raise ValueError(f"a chain of {size} bytes")
        if self.queue.next_head() in self.done:
            # that head came back and nobody took its completion yet: a second chain on
            # it would make the two indistinguishable
            raise RuntimeError(
                f"head {self.queue.next_head()} would be reused before its completion was taken"
            )
        bufs: list[tuple[BufferPool, int, int]] = []
        for n in _split(size, segs):
            pool = self._pool()
            gpa = pool.alloc(n)
            self.ram.fill(gpa, n, self.poison)
            bufs.append((pool, gpa, n))
        try:
            head = self.queue.add_chain([(gpa, n, True) for _, gpa, n in bufs], indirect)
        except BaseException:
            for pool, gpa, n in bufs:
                pool.free(gpa, n)
            raise
        self.outstanding[head] = bufs
        return head

    def post(self, sizes: Sequence[int], *, segs: int = 1, indirect: bool = False) -> list[int]:
        """Queue one chain per size (unpublished: see :meth:`kick`); returns the heads."""
        return [self.add_chain(n, segs=segs, indirect=indirect) for n in sizes]

    def kick(self) -> None:
        """Publish every queued chain and notify the device."""
        self.queue.publish()
        self.queue.kick()

    # --- what came back ------------------------------------------------------------------
    def _read_back(self, bufs: list[tuple[BufferPool, int, int]], used_len: int) -> bytes:
        out = bytearray()
        for _, gpa, n in bufs:
            take = min(n, used_len - len(out))
            if take <= 0:
                break
            out += self.ram.read(gpa, take)
        return bytes(out)

    def _gather(self) -> None:
        """Process new used entries: each returned chain is read back, its buffers are
        freed, and its completion waits in :attr:`done` to be taken."""
        for head, used_len in self.queue.get_used():
            bufs = self.outstanding.pop(head, None)
            if bufs is None:
                self.unexpected_used.append((head, used_len))
                continue
            self.done[head] = RngCompletion(head, self._read_back(bufs, used_len), used_len)
            for pool, gpa, n in bufs:
                pool.free(gpa, n)

    def collect(self) -> list[RngCompletion]:
        """Take every completion there is (no waiting), in the order the chains came back."""
        self._gather()
        got = list(self.done.values())
        self.done.clear()
        return got

    def wait(
        self, heads: Sequence[int], timeout: float = 5.0, *, poll_interval: float | None = None
    ) -> list[RngCompletion]:
        """Wait until every chain in ``heads`` came back and take their completions, in
        the order of ``heads`` (others stay for a later :meth:`wait` or :meth:`collect`).
        Relies on call notifications (a device that never signals times out) unless
        ``poll_interval`` is set."""
        deadline = time.monotonic() + timeout
        while True:
            self._gather()
            if all(h in self.done for h in heads):
                break
            self.queue.enable_cb()
            self._gather()
            if all(h in self.done for h in heads):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [h for h in heads if h not in self.done]
                raise TimeoutError(
                    f"{len(missing)} of {len(heads)} virtio-rng chains not returned within "
                    f"{timeout}s (heads {missing[:16]}); used_idx={self.queue.used_idx()}"
                )
            self.queue.wait_call(left if poll_interval is None else min(left, poll_interval))
        return [self.done.pop(h) for h in heads]

    def read(self, n: int, *, segs: int = 1, indirect: bool = False, timeout: float = 5.0) -> bytes:
        """Offer one chain of ``n`` bytes, kick, wait for it; the bytes the device says
        it wrote (it may write fewer than ``n``)."""
        (head,) = self.post([n], segs=segs, indirect=indirect)
        self.kick()
        return self.wait([head], timeout)[0].data

    def poisoned_tail(self, c: RngCompletion) -> int:
        """How many bytes at the end of ``c.data`` still hold the poison: a device that
        reported more than it wrote leaves a run of them (random bytes end in a run of
        k poison bytes with probability 256**-k)."""
        return len(c.data) - len(c.data.rstrip(bytes([self.poison])))


# =========================================================================================
# A guest's connection to the daemon
# =========================================================================================


@dataclass
class Rng:
    """One front-end connection with its guest RAM and the driver on requestq."""

    fe: FrontEnd
    ram: GuestRam
    driver: RngDriver
    daemon: Daemon

    @property
    def queue(self) -> DriverQueue:
        return self.driver.queue

    def close(self) -> None:
        self.fe.close()
        self.ram.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_rng(
    d: Daemon,
    *,
    features: int = ALL_FEATURES,
    queue_size: int = 128,
    regions: int = 2,
    ram_size: int = 16 * MiB,
    buf_regions: Sequence[int] = (0,),
) -> Rng:
    """Connect to ``d``, negotiate ``features`` (masked by what is offered), send the
    memory table and set up requestq."""
    ram = GuestRam(ram_size, regions)
    fe = FrontEnd(d.socket_path, ram)
    try:
        fe.connect()
        fe.negotiate(features)
        fe.set_mem_table()
        driver = RngDriver(fe.setup_queue(REQUESTQ, queue_size), buf_regions=buf_regions)
    except BaseException:
        fe.close()
        ram.close()
        raise
    return Rng(fe, ram, driver, d)
