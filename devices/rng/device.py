"""virtio-rng (virtio 1.x, 5.4): one request queue of device-writable buffers, which
the device fills with random bytes. Written in Python on the chain API (vhost.chains):
the ring walk and validation stay in C, each chain is one Python object.

Entropy comes from ``os.getrandom`` (served on the event loop: it does not block once
the host's pool is initialised, and GRND_NONBLOCK makes sure), or from ``--source FILE``
(a device like /dev/hwrng or a FIFO may block: served in a worker thread, read straight
into guest memory with readv). ``--max-bytes-per-second`` is a token bucket holding one
second's worth: a request is served when the bucket holds all of it (or a second's worth
of a larger one); until then it goes back to the ring, and the queue is called again when
the bucket has refilled.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

from devices.rng.limits import MAX_BATCH, MAX_CHAIN_BYTES
from vhost.chains import Chain, ChainQueue
from vhost.device import RING_FEATURES, Device
from vhost.metrics import MetricFamily
from vhost.virtqueue import ChainWorker

log = logging.getLogger("vhost.rng")

VIRTIO_ID_RNG = 4
RETRY_SECONDS = 0.1  # the host pool not ready yet, or a source with nothing to read


@dataclass(frozen=True)
class RngOptions:
    source: str | None = None  # None: os.getrandom
    max_bytes_per_second: int | None = None  # None: unlimited


class TokenBucket:
    """``rate`` bytes per second, at most one second's worth at once."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    def available(self) -> int:
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        self.tokens -= n

    def seconds_until(self, n: int) -> float:
        return max(0.0, (n - self.tokens) / self.rate)


class RngDevice(Device):
    def __init__(self, opts: RngOptions) -> None:
        rate = opts.max_bytes_per_second
        if rate is not None and rate <= 0:
            raise ValueError(f"--max-bytes-per-second {rate} is not a positive number")
        self.opts = opts
        self.bucket = TokenBucket(rate) if rate is not None else None
        self.fd = -1
        if opts.source is not None:
            try:
                self.fd = os.open(opts.source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise ValueError(f"--source {opts.source}: {e.strerror}") from None
        self.chain_worker: ChainWorker = "thread" if self.fd >= 0 else "loop"
        self.bytes_served = 0
        self.source_failed = False

    @property
    def features(self) -> int:
        return RING_FEATURES

    @property
    def num_queues(self) -> int:
        return 1

    def process_queue(self, queue: ChainQueue) -> float | None:
        chains = queue.pop(MAX_BATCH)
        done: list[Chain] = []
        wait: float | None = None
        for chain in chains:
            want = min(chain.writable_len, MAX_CHAIN_BYTES)
            if self.bucket is not None:
                # a whole request, or a second's worth of a larger one: no dribbles
                need = min(want, self.bucket.rate)
                if self.bucket.available() < need:
                    wait = self.bucket.seconds_until(need)
                    break
                want = min(want, self.bucket.available())
            if self._fill(chain, want, queue) is None:  # no entropy to be had right now
                wait = RETRY_SECONDS
                break
            done.append(chain)
        queue.push(done)
        rest = chains[len(done) :]
        if rest:
            queue.discard(rest)  # they wait in the ring
        return wait

    def _fill(self, chain: Chain, n: int, queue: ChainQueue) -> int | None:
        """Write up to n random bytes into the chain; None if there are none to be had."""
        if self.fd < 0:
            try:
                chain.write(os.getrandom(n, os.GRND_NONBLOCK))
            except BlockingIOError:
                return None
        elif not self._read_source(chain, n, queue):
            return None
        if self.bucket is not None:
            self.bucket.take(chain.written)
        self.bytes_served += chain.written
        return chain.written

    def _read_source(self, chain: Chain, n: int, queue: ChainQueue) -> bool:
        """readv from the source straight into the chain's buffers; False if it has
        nothing now (it would block, it ended, it failed: the chains wait)."""
        views, left = [], n
        for view in chain.writable:
            if left == 0:
                break
            views.append(view[:left])
            left -= len(views[-1])
        while views:
            try:
                chain.written = os.readv(self.fd, views)
            except BlockingIOError:
                if not queue.wait_readable(self.fd, RETRY_SECONDS):
                    return False
                continue
            except OSError as e:
                self._source_failed(os.strerror(e.errno or errno.EIO))
                return False
            if chain.written == 0:
                self._source_failed("end of file")
                return False
            break
        return True

    def _source_failed(self, why: str) -> None:
        if not self.source_failed:
            log.error(
                "--source %s: %s; no more entropy to give (requests wait)", self.opts.source, why
            )
        self.source_failed = True

    def metrics(self) -> list[MetricFamily]:
        served = MetricFamily(
            "vhost_rng_bytes_total", "random bytes written into the guest's buffers", "counter"
        )
        served.add(self.bytes_served)
        failed = MetricFamily(
            "vhost_rng_source_failed",
            "1 once --source failed or ended (requests then wait)",
            "gauge",
        )
        failed.add(int(self.source_failed))
        return [served, failed]

    def stats_line(self) -> str:
        return f"bytes={self.bytes_served}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
