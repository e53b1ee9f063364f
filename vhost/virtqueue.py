"""Virtqueues: the state the front end configures for each queue, its C handle,
and what serves it once it runs.

A queue is *started* when it has a size, ring addresses, a kick fd, mapped memory and
is enabled. Starting translates the rings (C checks every address) and then one of:

* a device in C: one worker thread loops in the device's C run function (``Runner``,
  called with the GIL released) until asked to stop; Python sees the queue again only to
  stop it, or to log errors the C side recorded (rate limited);
* a device in Python, on the chain API (vhost.chains): its ``process_queue`` is called
  with a :class:`~vhost.chains.ChainQueue` on each kick, either on the event loop (the
  kick fd watched by asyncio) or in a worker thread of its own that sleeps in C.

Boundary: no protocol here and no device logic; a device supplies the run function or
the chain handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

from vhost import limits
from vhost._native import ffi, lib
from vhost.chains import ChainQueue
from vhost.errors import CORE_ERRORS, ErrorTable
from vhost.fds import close_all
from vhost.memory import GuestMemory

if TYPE_CHECKING:
    from vhost._native import CData, vu_log, vu_vq

log = logging.getLogger("vhost.virtqueue")

MAX_QUEUE_SIZE: int = limits.MAX_QUEUE_SIZE

# virtio feature bits the ring walker implements
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

#: a C device's loop for one queue: called in a worker thread with the queue's C handle,
#: returns a VU_RUN_* code
Runner: TypeAlias = "Callable[[vu_vq], int]"
#: a Python device's handler for one queue: called on each kick; returns None (wait for
#: the next kick) or a delay in seconds after which it wants to be called again, kick or
#: not (a rate limit: chains it could not serve yet were discarded, they wait in the ring)
ChainHandler = Callable[[ChainQueue], float | None]
ChainWorker = Literal["loop", "thread"]

# what a C runner returns (c_ext/vu.h)
RUN_STOPPED: int = lib.VU_RUN_STOPPED
RUN_ERRORS: int = lib.VU_RUN_ERRORS
RUN_BROKEN: int = lib.VU_RUN_BROKEN

#: buckets of the chains-per-batch histogram (c_ext/vu.h): bucket b counts batches of
#: 2^(b-1) < n <= 2^b chains, the last one every larger batch
BATCH_BUCKETS: int = lib.VU_BATCH_BUCKETS
#: the upper bounds of those buckets, in chains; None: no bound (Prometheus' +Inf)
BATCH_BOUNDS: tuple[int | None, ...] = (*(1 << b for b in range(BATCH_BUCKETS - 1)), None)


class VirtqueueError(Exception):
    """A queue could not be configured or started; the text names the value."""


@dataclass(frozen=True)
class RingCounters:
    """A queue's ring counters at one moment (struct vu_stats, c_ext/vu.h), or the sum
    of several queues' (``+``): what the metrics scrape reports per queue."""

    chains: int = 0
    bad_chains: int = 0
    kicks: int = 0
    signals: int = 0
    batches: int = 0
    #: chains in all the batches counted in batch_hist (the histogram's sum)
    batch_chains: int = 0
    #: batches by size, one count per bucket of BATCH_BOUNDS (not cumulative)
    batch_hist: tuple[int, ...] = (0,) * BATCH_BUCKETS
    resubmitted: int = 0
    #: used entries written (chains given back); unlike chains, never goes back
    pushed: int = 0
    log_words: int = 0
    log_beyond: int = 0
    #: errors recorded, by error code (negative; 0 for a code out of the table's range),
    #: only the codes seen
    errors: Mapping[int, int] = field(default_factory=dict)

    def __add__(self, other: RingCounters) -> RingCounters:
        errors = dict(self.errors)
        for code, n in other.errors.items():
            errors[code] = errors.get(code, 0) + n
        return RingCounters(
            chains=self.chains + other.chains,
            bad_chains=self.bad_chains + other.bad_chains,
            kicks=self.kicks + other.kicks,
            signals=self.signals + other.signals,
            batches=self.batches + other.batches,
            batch_chains=self.batch_chains + other.batch_chains,
            batch_hist=tuple(a + b for a, b in zip(self.batch_hist, other.batch_hist, strict=True)),
            resubmitted=self.resubmitted + other.resubmitted,
            pushed=self.pushed + other.pushed,
            log_words=self.log_words + other.log_words,
            log_beyond=self.log_beyond + other.log_beyond,
            errors=errors,
        )


def read_ring_counters(vq: vu_vq) -> RingCounters:
    """The counters of a queue's C handle, read without a lock while its worker may be
    writing them (each one is a single aligned 64-bit load; see struct vu_stats)."""
    s = vq.stats
    hist = memoryview(ffi.buffer(s.batch_hist)).cast("Q").tolist()
    by_slot = memoryview(ffi.buffer(s.errors)).cast("Q").tolist()
    return RingCounters(
        chains=s.chains,
        bad_chains=s.bad_chains,
        kicks=s.kicks,
        signals=s.signals,
        batches=s.batches,
        batch_chains=s.batch_chains,
        batch_hist=tuple(hist),
        resubmitted=s.resubmitted,
        pushed=s.pushed,
        log_words=s.log_words,
        log_beyond=s.log_beyond,
        errors={-slot: n for slot, n in enumerate(by_slot) if n},
    )


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


def _nonblocking(fd: int | None) -> int | None:
    """A worker must never block on a front end's fd (a full eventfd, a pipe): one
    engine may serve many front ends."""
    if fd is not None:
        # not ours to fix if it fails: the C side treats write errors as a lost signal
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)
    return fd


class Virtqueue:
    def __init__(self, index: int, label: str = "", errors: ErrorTable = CORE_ERRORS) -> None:
        self.index = index
        self.label = label or f"vq{index}"
        self.errors = errors
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
        self.inflight: tuple[CData, int] | None = None
        #: buffers left untaken at a stop are normal (rx rings): no INFO line for them
        self.untaken_is_normal = False
        #: the dirty log this queue writes while it runs (set by the session); None: off
        self.log: vu_log | None = None
        #: guest-physical address of the used ring, when its writes are logged too
        #: (SET_VRING_ADDR with VHOST_VRING_F_LOG)
        self.log_used_gpa: int | None = None
        self._vq = ffi.new("struct vu_vq *")
        self._vq.kick_fd = self._vq.call_fd = self._vq.err_fd = self._vq.stop_fd = -1
        self._worker: threading.Thread | None = None
        self._chains: _ChainServer | None = None
        self._errors = RateLimitedLog(log)

    # --- configuration (from the session) ---
    def set_num(self, num: int) -> None:
        if not (0 < num <= MAX_QUEUE_SIZE) or num & (num - 1):
            raise VirtqueueError(
                f"{self.label}: queue size {num} is not a power of 2 in 1..{MAX_QUEUE_SIZE}"
            )
        self.num = num

    def set_rings(self, desc: int, avail: int, used: int, log_used_gpa: int | None = None) -> None:
        """Ring addresses (front-end virtual), and the used ring's guest-physical address
        when the front end wants its writes logged."""
        self.rings = (desc, avail, used)
        self.log_used_gpa = log_used_gpa

    def set_base(self, base: int) -> None:
        if not 0 <= base <= 0xFFFF:
            raise VirtqueueError(f"{self.label}: ring base {base} is not a 16-bit index")
        self.base = base

    def set_kick(self, fd: int | None) -> None:
        close_all([self.kick_fd])
        self.kick_fd = _nonblocking(fd)

    def set_call(self, fd: int | None) -> None:
        close_all([self.call_fd])
        self.call_fd = _nonblocking(fd)

    def set_err(self, fd: int | None) -> None:
        close_all([self.err_fd])
        self.err_fd = _nonblocking(fd)

    @property
    def running(self) -> bool:
        """Being served: by its own worker (one that gave up on a broken ring is not),
        by a chain server that has not given up, or, when it has neither, by a device
        engine since activate()."""
        if self._worker is not None:
            return self._worker.is_alive()
        if self._chains is not None:
            return self._chains.serving
        return self.active

    def startable(self, memory: GuestMemory) -> bool:
        return (
            self.num > 0
            and self.rings is not None
            and self.kick_fd is not None
            and self.enabled
            and bool(memory.regions)
        )

    # --- start/stop ---
    def activate(self, memory: GuestMemory, features: int) -> None:
        """Translate and check the rings; the queue is then ready for a worker (its own,
        see start(), or a device's engine that serves several queues)."""
        assert self.rings is not None and self.kick_fd is not None
        desc, avail, used = self.rings
        vq = self._vq
        rc = lib.vu_vq_setup(
            vq,
            memory.handle,
            self.num,
            desc,
            avail,
            used,
            self.base,
            int(bool(features & VIRTIO_RING_F_EVENT_IDX)),
            int(bool(features & VIRTIO_RING_F_INDIRECT_DESC)),
        )
        if rc < 0:
            raise VirtqueueError(
                f"{self.label}: cannot start: {self.errors.text(rc)} "
                f"(size {self.num}, desc {desc:#x}, avail {avail:#x}, "
                f"used {used:#x})"
            )
        if self.inflight is not None:
            self._attach_inflight(*self.inflight)
        vq.log = ffi.NULL if self.log is None else self.log
        vq.log_used = int(self.log_used_gpa is not None)
        vq.log_used_gpa = self.log_used_gpa or 0
        vq.kick_fd = self.kick_fd
        vq.call_fd = -1 if self.call_fd is None else self.call_fd
        vq.err_fd = -1 if self.err_fd is None else self.err_fd
        self.active = True
        self.errors_reported = 0

    def _attach_inflight(self, region: CData, size: int) -> None:
        """Recover from the front end's inflight region (requests a crashed back end
        left in flight are run again first), then track into it."""
        vq = self._vq
        base = vq.last_avail_idx
        rc = lib.vu_vq_set_inflight(vq, region, size)
        if rc < 0:
            err = vq.err
            # Serving without tracking beats a dead disk; only a crash would lose.
            log.error(
                "%s: %s (detail %#x/%#x, %d bytes); serving without inflight tracking",
                self.label,
                self.errors.text(rc),
                err.head,
                err.detail,
                size,
            )
            return
        if rc or vq.last_avail_idx != base:
            log.info(
                "%s: inflight region: %d request%s in flight before the restart run "
                "again first; used idx %d, taking new ones from %d (front end said %d)",
                self.label,
                rc,
                "" if rc == 1 else "s",
                vq.used_idx,
                vq.last_avail_idx,
                base,
            )

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
        log.log(
            logging.INFO if pending and not self.untaken_is_normal else logging.DEBUG,
            "%s: stopped: avail idx %d, taken %d (%d not taken), used idx %d, "
            "used_event %d, avail_event %d, %d kicks, %d signals, %d chains",
            self.label,
            st[0],
            self.base,
            pending,
            st[1],
            st[2],
            st[3],
            s.kicks,
            s.signals,
            s.chains,
        )

    def start(self, memory: GuestMemory, features: int, runner: Runner) -> None:
        """Serve the queue in a worker thread of its own, looping in ``runner``."""
        if self.running:
            return
        self.stop()  # reap a worker that ended on its own (broken ring, fd error)
        self.activate(memory, features)
        vq = self._vq
        vq.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._worker = threading.Thread(
            target=self._serve, args=(runner,), name=f"{self.label}", daemon=True
        )
        self._worker.start()
        log.debug("%s: started (size %d, base %d)", self.label, self.num, self.base)

    def serve_chains(
        self,
        memory: GuestMemory,
        features: int,
        handler: ChainHandler,
        worker: ChainWorker = "loop",
    ) -> None:
        """Serve the queue with a Python handler on the chain API: on the running event
        loop (``"loop"``) or in a worker thread of its own (``"thread"``)."""
        if self.running:
            return
        self.stop()
        if worker == "loop":
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise VirtqueueError(
                    f"{self.label}: a queue served on the event loop needs a running loop"
                ) from None
        self.activate(memory, features)
        self._vq.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        queue = ChainQueue(self._vq, self.label, memory)
        if worker == "loop":
            self._chains = _LoopServer(self, queue, handler, loop)
        else:
            self._chains = _ThreadServer(self, queue, handler)
        self._chains.start()
        log.debug(
            "%s: serving chains on the %s (size %d, base %d)",
            self.label,
            worker,
            self.num,
            self.base,
        )

    def stop(self) -> int:
        """Stop whatever serves the queue (the batch in progress completes); chains a
        Python device still holds are finished. Returns last_avail_idx."""
        worker = self._worker
        if worker is not None:
            lib.vu_vq_request_stop(self._vq)
            worker.join()
            self._worker = None
        chains = self._chains
        if chains is not None:
            lib.vu_vq_request_stop(self._vq)
            chains.stop()
            self._chains = None
        if worker is not None or chains is not None:
            close_all([self._vq.stop_fd])
            self._vq.stop_fd = -1
        self._errors.flush()
        return self.deactivate()

    def _serve(self, runner: Runner) -> None:
        vq = self._vq
        while True:
            rc = runner(vq)
            if rc == RUN_ERRORS:
                self._report_error()
                continue
            if rc == RUN_STOPPED:
                return
            self._report_error()
            if rc == RUN_BROKEN:
                log.error(
                    "%s: ring broken, queue stopped until the front end sets it up again",
                    self.label,
                )
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
        self._errors.warning(
            f"{self.label}: head {err.head}: "
            f"{self.errors.describe(err.code, err.detail)}; "
            f"{err.count} errors since start"
        )

    # --- introspection ---
    @property
    def handle(self) -> vu_vq:
        return self._vq

    def counters(self) -> RingCounters:
        """The ring counters now (safe while the queue runs)."""
        return read_ring_counters(self._vq)

    def stats(self) -> dict[str, int]:
        s = self._vq.stats
        return {
            "chains": s.chains,
            "bad_chains": s.bad_chains,
            "kicks": s.kicks,
            "signals": s.signals,
            "batches": s.batches,
            "log_words": s.log_words,
            "log_beyond": s.log_beyond,
            "errors": self._vq.err.count,
            "last_avail_idx": self._vq.last_avail_idx,
            "used_idx": self._vq.used_idx,
        }

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
        self.log = None
        self.log_used_gpa = None


class QueueCounterBook:
    """A device's ring counters per queue index over the daemon's life. Each connection
    brings queues of its own (a Session's Virtqueues), counting from zero; when one is
    retired (its connection ends) its final counts are added to those of the index, so
    a counter never goes back, and no queue of a gone connection is kept alive."""

    def __init__(self) -> None:
        self._live: dict[int, Virtqueue] = {}
        self._retired: dict[int, RingCounters] = {}

    def attach(self, q: Virtqueue) -> None:
        """``q`` is about to be served (its connection's earlier ones are stopped)."""
        old = self._live.get(q.index)
        if old is not None and old is not q:
            self.retire(old)
        self._live[q.index] = q

    def retire(self, q: Virtqueue) -> None:
        """``q``'s connection is over (called before its queues are reset): keep its
        final counts, drop the queue."""
        if self._live.get(q.index) is q:
            del self._live[q.index]
            self._retired[q.index] = self._retired.get(q.index, RingCounters()) + q.counters()

    def totals(self) -> dict[int, RingCounters]:
        """Counts by queue index, of every connection so far."""
        out = dict(self._retired)
        for index, q in self._live.items():
            out[index] = out[index] + q.counters() if index in out else q.counters()
        return out

    def indexes(self) -> list[int]:
        """The queues served at least once (the ones a front end used), in order."""
        return sorted({*self._live, *self._retired})

    def running(self, index: int) -> bool:
        q = self._live.get(index)
        return q is not None and q.running


class _ChainServer:
    """Runs a Python device's handler for one queue; subclasses say where."""

    def __init__(self, q: Virtqueue, queue: ChainQueue, handler: ChainHandler) -> None:
        self.q = q
        self.queue = queue
        self.handler = handler
        self.serving = True

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def run_handler(self) -> float | None:
        """One call of the handler. A handler that raises costs its queue, not the
        daemon: the queue stops (until the front end sets it up again)."""
        try:
            delay = self.handler(self.queue)
        except Exception:
            log.exception("%s: the device's queue handler failed; queue stopped", self.q.label)
            self.give_up()
            return None
        self.q.report_new_errors()
        if self.q.handle.broken:
            log.error(
                "%s: ring broken, queue stopped until the front end sets it up again", self.q.label
            )
            self.give_up()
            return None
        return delay

    def give_up(self) -> None:
        self.serving = False

    def finish_chains(self) -> None:
        """Chains the device still holds when the queue stops: given back or completed
        empty, and their views released (before memory can go away)."""
        held = self.queue.outstanding
        discarded, completed = self.queue.finish_all()
        if held:
            log.log(
                logging.WARNING if completed else logging.DEBUG,
                "%s: stopped with %d chain%s held by the device: %d given back, %d "
                "completed with nothing written",
                self.q.label,
                held,
                "" if held == 1 else "s",
                discarded,
                completed,
            )


class _LoopServer(_ChainServer):
    """On the event loop: the kick fd is watched by asyncio; one batch per callback, so a
    busy queue cannot hold the loop (the next batch is scheduled, not looped over)."""

    def __init__(
        self,
        q: Virtqueue,
        queue: ChainQueue,
        handler: ChainHandler,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(q, queue, handler)
        self.loop = loop
        self.kick_fd = int(q.handle.kick_fd)
        self._pending: asyncio.Handle | None = None
        self._waiting = False  # the handler asked for a delay: kicks do not run it early

    def start(self) -> None:
        self.loop.add_reader(self.kick_fd, self._on_kick)
        self._schedule()  # chains may already be waiting (a restart, a base in the middle)

    def _on_kick(self) -> None:
        try:
            data = os.read(self.kick_fd, 8)
        except BlockingIOError:
            return
        except OSError as e:
            self._fd_failed(lib.VU_ERR_KICK_FD, e.errno or 0)
            return
        if not data:  # end of file: readable forever
            self._fd_failed(lib.VU_ERR_KICK_HUP, 0)
            return
        self.q.handle.stats.kicks += 1
        if not self._waiting:
            self._schedule()

    def _fd_failed(self, code: int, detail: int) -> None:
        log.error("%s: %s; queue stopped", self.q.label, self.q.errors.describe(code, detail))
        self.give_up()

    def _schedule(self, delay: float | None = None) -> None:
        if self._pending is not None or not self.serving:
            return
        if delay is None:
            self._pending = self.loop.call_soon(self._run)
        else:
            self._waiting = True
            self._pending = self.loop.call_later(delay, self._run)

    def _run(self) -> None:
        self._pending = None
        self._waiting = False
        delay = self.run_handler()
        if not self.serving:
            return
        if delay is not None:
            self._schedule(max(0.0, delay))
            return
        n = lib.vu_vq_enable_notification(self.q.handle)
        if n != 0:  # more came while we asked for a kick (or the ring broke: say so)
            self._schedule()

    def give_up(self) -> None:
        super().give_up()
        self.loop.remove_reader(self.kick_fd)
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def stop(self) -> None:
        if self.serving:
            self.give_up()
        self.finish_chains()


class _ThreadServer(_ChainServer):
    """In a worker thread of its own: it sleeps in C (GIL released) until a kick or a
    stop, and calls the handler with the GIL."""

    def __init__(self, q: Virtqueue, queue: ChainQueue, handler: ChainHandler) -> None:
        super().__init__(q, queue, handler)
        self.thread = threading.Thread(target=self._loop, name=q.label, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        vq = self.q.handle
        stop_fd = int(vq.stop_fd)
        while self.serving:
            w = lib.vu_vq_wait(vq, -1)
            if w == lib.VU_WAIT_STOP:
                return
            if w < 0:
                self.q.report_new_errors()
                log.error("%s: %s; queue stopped", self.q.label, self.q.errors.text(w))
                self.give_up()
                return
            delay = self.run_handler()
            while delay is not None and self.serving:
                # a rate limit: sleep (a stop wakes us), then call it again, kick or not
                if select.select([stop_fd], [], [], max(0.0, delay))[0]:
                    return
                delay = self.run_handler()

    def stop(self) -> None:
        self.thread.join()
        self.serving = False
        self.finish_chains()
