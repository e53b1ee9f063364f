"""Virtqueues: the state the front end configures for each queue, its C handle,
and the worker thread that serves it.

A queue is *started* when it has a size, ring addresses, a kick fd, mapped
memory and is enabled. Starting translates the rings (C checks every address)
and starts one thread that loops in C (``runner``: the device's run function,
called with the GIL released) until asked to stop. Python sees the queue again
only to stop it, or to log errors the C side recorded (rate limited).

Boundary: no protocol here and no device logic; a device supplies ``runner``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from vhost import limits
from vhost._native import ffi, lib
from vhost.memory import GuestMemory

log = logging.getLogger("vhost.virtqueue")

MAX_QUEUE_SIZE: int = limits.MAX_QUEUE_SIZE

# virtio feature bits the ring walker implements
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

# C error codes (c_ext/vu.h) and what they mean, for log lines and exceptions.
ERROR_TEXT: dict[int, str] = {
    -1: "avail index moved further than the queue size",
    -2: "head index outside the descriptor table",
    -3: "next index outside its descriptor table",
    -4: "buffer outside guest memory",
    -5: "descriptor loop",
    -6: "chain longer than the queue size",
    -7: "nested indirect descriptor",
    -8: "indirect table length not a positive multiple of 16",
    -9: "indirect table outside guest memory",
    -10: "device-readable descriptor after a device-writable one",
    -11: "chain needs too many iovecs",
    -12: "indirect descriptor with NEXT set",
    -13: "indirect descriptor but INDIRECT_DESC not negotiated",
    -14: "ring address not in guest memory or misaligned",
    -15: "queue size not a power of 2 in 1..1024",
    -21: "inflight region unusable (too small, wrong version or queue size, bad last batch)",
    -30: "request has no device-writable status byte",
    -31: "request header shorter than 16 bytes",
    -32: "request buffers in the wrong direction or size",
    -33: "sector range beyond capacity or not sector aligned",
    -34: "host I/O error",
    -35: "unsupported request type",
    -36: "write to a read-only device",
    -37: "bad discard/write-zeroes segments",
    -38: "read/write longer than seg_max x size_max",
    -40: "tx chain shorter than the virtio-net header and an Ethernet header",
    -41: "tx frame longer than the MTU (or the GSO limit)",
    -42: "tx chain has device-writable buffers",
    -43: "rx chain has device-readable buffers",
    -44: "TAP I/O error",
    -45: "tx frame needs more iovecs than writev takes",
}

Runner = Callable[[Any], int]


class VirtqueueError(Exception):
    """A queue could not be configured or started; the text names the value."""


class RateLimitedLog:
    """At most ``burst`` lines per ``interval`` seconds; counts what it held back."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 5.0) -> None:
        self._log = logger
        self._burst = burst
        self._interval = interval
        self._window_start = 0.0
        self._sent = 0
        self._suppressed = 0

    def warning(self, msg: str) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._interval:
            if self._suppressed:
                self._log.warning("(%d similar messages suppressed)", self._suppressed)
            self._window_start, self._sent, self._suppressed = now, 0, 0
        if self._sent < self._burst:
            self._sent += 1
            self._log.warning("%s", msg)
        else:
            self._suppressed += 1

    def flush(self) -> None:
        """Say how many lines were held back (before the source goes away)."""
        if self._suppressed:
            self._log.warning("(%d similar messages suppressed)", self._suppressed)
            self._suppressed = 0


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _nonblocking(fd: int | None) -> int | None:
    """A worker must never block on a front end's fd (a full eventfd, a pipe): one
    engine may serve many front ends."""
    if fd is not None:
        try:
            os.set_blocking(fd, False)
        except OSError:
            pass  # not ours to fix: the C side treats write errors as a lost signal
    return fd


class Virtqueue:
    def __init__(self, index: int, label: str = "") -> None:
        self.index = index
        self.label = label or f"vq{index}"
        self.num = 0
        self.rings: tuple[int, int, int] | None = None  # desc, avail, used (front-end virtual)
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.active = False
        self.errors_reported = 0
        #: this queue's inflight region (pointer, size), set by the session; None: off
        self.inflight: tuple[Any, int] | None = None
        #: requests resubmitted from the inflight region at the last start
        self.resubmitted = 0
        #: buffers left untaken at a stop are normal (rx rings): no INFO line for them
        self.untaken_is_normal = False
        self._vq = ffi.new("struct vu_vq *")
        self._vq.kick_fd = self._vq.call_fd = self._vq.err_fd = self._vq.stop_fd = -1
        self._worker: threading.Thread | None = None
        self._errors = RateLimitedLog(log)

    # --- configuration (from the session) ---
    def set_num(self, num: int) -> None:
        if not (0 < num <= MAX_QUEUE_SIZE) or num & (num - 1):
            raise VirtqueueError(f"{self.label}: queue size {num} is not a power of 2 "
                                 f"in 1..{MAX_QUEUE_SIZE}")
        self.num = num

    def set_rings(self, desc: int, avail: int, used: int) -> None:
        self.rings = (desc, avail, used)

    def set_base(self, base: int) -> None:
        if not 0 <= base <= 0xFFFF:
            raise VirtqueueError(f"{self.label}: ring base {base} is not a 16-bit index")
        self.base = base

    def set_kick(self, fd: int | None) -> None:
        _close(self.kick_fd)
        self.kick_fd = _nonblocking(fd)

    def set_call(self, fd: int | None) -> None:
        _close(self.call_fd)
        self.call_fd = _nonblocking(fd)

    def set_err(self, fd: int | None) -> None:
        _close(self.err_fd)
        self.err_fd = _nonblocking(fd)

    @property
    def running(self) -> bool:
        """Being served: by its own worker (one that gave up on a broken ring is not),
        or, when it has none, by a device engine since activate()."""
        if self._worker is not None:
            return self._worker.is_alive()
        return self.active

    def startable(self, memory: GuestMemory) -> bool:
        return (self.num > 0 and self.rings is not None and self.kick_fd is not None
                and self.enabled and bool(memory.regions))

    # --- start/stop ---
    def activate(self, memory: GuestMemory, features: int) -> None:
        """Translate and check the rings; the queue is then ready for a worker (its own,
        see start(), or a device's engine that serves several queues)."""
        assert self.rings is not None and self.kick_fd is not None
        desc, avail, used = self.rings
        vq = self._vq
        rc = lib.vu_vq_setup(vq, memory.handle, self.num, desc, avail, used, self.base,
                             int(bool(features & VIRTIO_RING_F_EVENT_IDX)),
                             int(bool(features & VIRTIO_RING_F_INDIRECT_DESC)))
        if rc < 0:
            raise VirtqueueError(f"{self.label}: cannot start: {ERROR_TEXT.get(rc, rc)} "
                                 f"(size {self.num}, desc {desc:#x}, avail {avail:#x}, "
                                 f"used {used:#x})")
        if self.inflight is not None:
            self._attach_inflight(*self.inflight)
        vq.kick_fd = self.kick_fd
        vq.call_fd = -1 if self.call_fd is None else self.call_fd
        vq.err_fd = -1 if self.err_fd is None else self.err_fd
        self.active = True
        self.errors_reported = 0

    def _attach_inflight(self, region: Any, size: int) -> None:
        """Recover from the front end's inflight region (requests a crashed back end
        left in flight are run again first), then track into it."""
        vq = self._vq
        base = vq.last_avail_idx
        rc = lib.vu_vq_set_inflight(vq, region, size)
        if rc < 0:
            err = vq.err
            # Serving without tracking beats a dead disk; only a crash would lose.
            log.error("%s: %s (detail %#x/%#x, %d bytes); serving without inflight "
                      "tracking", self.label, ERROR_TEXT.get(rc, rc), err.head, err.detail, size)
            return
        self.resubmitted = rc
        if rc or vq.last_avail_idx != base:
            log.info("%s: inflight region: %d request%s in flight before the restart run "
                     "again first; used idx %d, taking new ones from %d (front end said %d)",
                     self.label, rc, "" if rc == 1 else "s", vq.used_idx, vq.last_avail_idx,
                     base)

    def deactivate(self) -> int:
        """The worker serving this queue has stopped: keep where the ring stopped."""
        if self.active:
            self.base = self._vq.last_avail_idx
            self.active = False
            self._log_ring_state()
        return self.base

    def _log_ring_state(self) -> None:
        """One line on where the ring stood; INFO when the driver had offered buffers we
        never took (a lost kick would show here), DEBUG otherwise."""
        st = ffi.new("uint16_t[4]")
        lib.vu_vq_ring_state(self._vq, st)
        s = self._vq.stats
        pending = (st[0] - self.base) & 0xFFFF
        log.log(logging.INFO if pending and not self.untaken_is_normal else logging.DEBUG,
                "%s: stopped: avail idx %d, taken %d (%d not taken), used idx %d, "
                "used_event %d, avail_event %d, %d kicks, %d signals, %d chains",
                self.label, st[0], self.base, pending, st[1], st[2], st[3], s.kicks,
                s.signals, s.chains)

    def start(self, memory: GuestMemory, features: int, runner: Runner) -> None:
        """Serve the queue in a worker thread of its own, looping in ``runner``."""
        if self.running:
            return
        self.stop()  # reap a worker that ended on its own (broken ring, fd error)
        self.activate(memory, features)
        vq = self._vq
        vq.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._worker = threading.Thread(target=self._serve, args=(runner,),
                                        name=f"{self.label}", daemon=True)
        self._worker.start()
        log.debug("%s: started (size %d, base %d)", self.label, self.num, self.base)

    def stop(self) -> int:
        """Stop its own worker (the batch in progress completes); return last_avail_idx."""
        worker = self._worker
        if worker is not None:
            lib.vu_vq_request_stop(self._vq)
            worker.join()
            self._worker = None
            _close(self._vq.stop_fd)
            self._vq.stop_fd = -1
        self._errors.flush()
        return self.deactivate()

    def _serve(self, runner: Runner) -> None:
        vq = self._vq
        while True:
            rc = runner(vq)
            if rc == lib.VU_RUN_ERRORS:
                self._report_error()
                continue
            if rc == lib.VU_RUN_STOPPED:
                return
            self._report_error()
            if rc == lib.VU_RUN_BROKEN:
                log.error("%s: ring broken, queue stopped until the front end sets it up "
                          "again", self.label)
            else:
                log.error("%s: kick fd failed, queue stopped", self.label)
            return

    def report_new_errors(self) -> None:
        """Log (rate limited) errors the C side recorded since the last call."""
        if self._vq.err.count != self.errors_reported:
            self.errors_reported = self._vq.err.count
            self._report_error()

    def _report_error(self) -> None:
        err = self._vq.err
        text = ERROR_TEXT.get(err.code, f"error {err.code}")
        if err.code == -34:
            text += f": {os.strerror(err.detail)}" if 0 < err.detail < 4096 else ""
        self._errors.warning(f"{self.label}: head {err.head}: {text} (detail {err.detail:#x}); "
                             f"{err.count} errors since start")

    # --- introspection ---
    @property
    def handle(self) -> Any:
        return self._vq

    def stats(self) -> dict[str, int]:
        s = self._vq.stats
        return {"chains": s.chains, "bad_chains": s.bad_chains, "kicks": s.kicks,
                "signals": s.signals, "batches": s.batches, "errors": self._vq.err.count,
                "last_avail_idx": self._vq.last_avail_idx, "used_idx": self._vq.used_idx}

    def reset(self) -> None:
        """Back to the unconfigured state, closing every fd (disconnect, RESET_DEVICE)."""
        self.stop()
        self.set_kick(None)
        self.set_call(None)
        self.set_err(None)
        self.num = 0
        self.rings = None
        self.base = 0
        self.enabled = False
        self.inflight = None
