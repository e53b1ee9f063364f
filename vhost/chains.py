"""The chain API: how a device written in Python serves a queue.

The C walker (``vu_vq_pop_batch``) takes a batch of chains at once and validates each
one -- every address and length inside guest memory, chain length bounded, no loops,
indirect tables in bounds, readable before writable -- before Python sees it; a chain
that fails is returned to the driver in C, logged, and never reaches the device. Python
gets one :class:`Chain` object per chain: its device-readable and device-writable bytes,
copied in one C call (:meth:`Chain.read`, :meth:`Chain.write`) or as memoryviews straight
into guest memory (:attr:`Chain.readable`, :attr:`Chain.writable`, built only when asked
for). The device pushes the chains back with the lengths it wrote (one C call per batch,
which also decides with event idx whether to signal the driver) or gives them back
untouched with :meth:`ChainQueue.discard`.

A chain's views never outlive the mapping they point into: a chain is *finished* when it
is pushed or discarded, and every chain still held is finished by the core when its
queue stops (before a memory-table change or a disconnect). Finishing releases its
memoryviews, so using one afterwards raises ValueError instead of touching memory that
may be gone. A view the device derived from one (a slice it kept) cannot be released
from here; such a view is reported to the guest memory map, which then replaces the
pages under it with private zero pages instead of unmapping them (see
:meth:`vhost.memory.GuestMemory.pin`): it reads zeros and writes nowhere, and cannot
crash the daemon or reach a new guest mapping at the same address.

Boundary: no protocol, no threads, no event loop (vhost.virtqueue runs the handler); a
ChainQueue is used from one thread at a time, the one that serves its queue.
"""

from __future__ import annotations

import select
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from vhost._native import ffi, lib
from vhost.limits import MAX_READ_BYTES

if TYPE_CHECKING:
    from vhost._native import Pointer, iovec, vu_chain_ref, vu_vq
    from vhost.memory import GuestMemory

#: chains one pop takes at most when the device names no number
DEFAULT_BATCH = 64
#: iovecs a batch can hold: any chain fits (a chain has at most MAX_CHAIN_IOV)
BATCH_IOV = 2 * lib.VU_MAX_CHAIN_IOV


class ChainError(ValueError):
    """A chain was used after it was pushed, discarded or its queue stopped, or was
    pushed or discarded in a way the ring cannot take."""


class Chain:
    """One validated descriptor chain: ``readable_len`` device-readable bytes, then
    ``writable_len`` device-writable ones. ``written`` is how many of the writable bytes
    the device filled, the length the used ring will report (``write`` moves it; a device
    that writes through the views sets it itself)."""

    __slots__ = (
        "_done",
        "_iov",
        "_n_in",
        "_n_out",
        "_queue",
        "_views",
        "head",
        "readable_len",
        "slot",
        "writable_len",
        "written",
    )

    def __init__(self, queue: ChainQueue, ref: vu_chain_ref, iov: Pointer[iovec]) -> None:
        self.head = int(ref.head)
        self.slot = int(ref.slot)
        self.readable_len = int(ref.out_bytes)
        self.writable_len = int(ref.in_bytes)
        self.written = 0
        self._iov = iov  # this chain's iovecs: n_out readable, then n_in writable
        self._n_out = int(ref.n_out)
        self._n_in = int(ref.n_in)
        self._queue = queue
        self._views: _Views | None = None
        self._done = False

    def __repr__(self) -> str:
        state = "finished" if self._done else "outstanding"
        return (
            f"<Chain head={self.head} readable={self.readable_len} "
            f"writable={self.writable_len} written={self.written} {state}>"
        )

    @property
    def finished(self) -> bool:
        return self._done

    def _check(self) -> None:
        if self._done:
            raise ChainError(f"chain {self.head} was already pushed, discarded or stopped")

    # --- copies (one C call each) ---
    def read(self, size: int = -1, offset: int = 0) -> bytes:
        """Up to ``size`` readable bytes from ``offset`` (with -1: all of them, if there
        are at most MAX_READ_BYTES; the lengths are the guest's, and overlapping
        descriptors can claim far more than its memory, so a larger chain must be read
        in pieces or through the views)."""
        self._check()
        if not 0 <= offset <= self.readable_len:
            raise ValueError(f"offset {offset} outside the {self.readable_len} readable bytes")
        left = self.readable_len - offset
        if size < 0 and left > MAX_READ_BYTES:
            raise ChainError(
                f"chain {self.head}: {left} readable bytes is more than read() "
                f"copies at once ({MAX_READ_BYTES}); give a size"
            )
        n = left if size < 0 else min(size, left)
        out = ffi.new("char[]", n)
        got = lib.vu_iov_copy_from(self._iov, self._n_out, offset, out, n)
        return bytes(ffi.buffer(out, got))

    def write(self, data: bytes | bytearray | memoryview, offset: int | None = None) -> int:
        """Copy ``data`` into the writable bytes at ``offset`` (default: after what was
        written so far); returns how many fit. ``written`` covers them afterwards."""
        self._check()
        at = self.written if offset is None else offset
        if not 0 <= at <= self.writable_len:
            raise ValueError(f"offset {at} outside the {self.writable_len} writable bytes")
        n = min(len(data), self.writable_len - at)
        if n:
            src = ffi.from_buffer(data)
            lib.vu_iov_copy_to(self._iov + self._n_out, self._n_in, at, src, n)
        self.written = max(self.written, at + n)
        return n

    # --- zero-copy views ---
    @property
    def readable(self) -> tuple[memoryview, ...]:
        """The readable buffers, one read-only memoryview each, in chain order."""
        return self._materialise()[1]

    @property
    def writable(self) -> tuple[memoryview, ...]:
        """The writable buffers, one memoryview each (for ``os.readv`` and the like)."""
        return self._materialise()[2]

    def _materialise(self) -> _Views:
        self._check()
        if self._views is None:
            base = [
                memoryview(ffi.buffer(self._iov[i].iov_base, self._iov[i].iov_len))
                for i in range(self._n_out + self._n_in)
            ]
            self._views = (
                base,
                tuple(v.toreadonly() for v in base[: self._n_out]),
                tuple(base[self._n_out :]),
            )
        return self._views

    def _finish(self) -> None:
        """Release the views; report any view derived from them that is still alive."""
        self._done = True
        views, self._views = self._views, None
        if views is None:
            return
        base, readonly, _writable = views
        held = [
            (weakref.ref(v.obj), int(ffi.cast("uintptr_t", self._iov[i].iov_base)), len(v))
            for i, v in enumerate(base)
        ]
        for v in (*readonly, *base):
            v.release()
        del views, base, readonly, _writable
        for ref, address, length in held:
            if ref() is not None:  # something derived from a view still holds the memory
                self._queue.report_kept_view(ref, address, length)


#: (every view made, the read-only ones handed out, the writable ones handed out)
_Views = tuple[list[memoryview], tuple[memoryview, ...], tuple[memoryview, ...]]


class ChainQueue:
    """One running queue as a Python device sees it: pop, push, discard."""

    def __init__(self, vq: vu_vq, label: str, memory: GuestMemory) -> None:
        self._vq = vq
        self.label = label
        self._memory = memory
        self._refs = ffi.new("struct vu_chain_ref[]", lib.VU_MAX_QUEUE_SIZE)
        self._iov = ffi.new("struct iovec[]", BATCH_IOV)
        self._outstanding: dict[int, Chain] = {}  # slot -> chain, in the order taken
        self.kept_views = 0

    @property
    def size(self) -> int:
        return int(self._vq.num)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    @property
    def stopping(self) -> bool:
        """The queue is being stopped: finish (push or discard) and return."""
        return bool(self._vq.stop)

    def wait_readable(self, fd: int, timeout: float | None = None) -> bool:
        """For a handler in a worker thread that reads a slow source: wait until ``fd`` is
        readable (True), the queue is being stopped or ``timeout`` passes (False). A stop
        never waits for the source."""
        if self.stopping:
            return False
        ready = select.select([fd, int(self._vq.stop_fd)], [], [], timeout)[0]
        return fd in ready and not self.stopping

    def pop(self, max_chains: int = DEFAULT_BATCH) -> list[Chain]:
        """Take up to ``max_chains`` available chains (validated in C)."""
        want = max(0, min(max_chains, lib.VU_MAX_QUEUE_SIZE))
        if want == 0 or self._vq.broken:
            return []
        n = lib.vu_vq_pop_batch(self._vq, self._refs, want, self._iov, BATCH_IOV)
        if n <= 0:
            return []  # a broken ring is recorded; the server stops the queue
        total = sum(int(self._refs[i].n_out) + int(self._refs[i].n_in) for i in range(n))
        iov = ffi.new("struct iovec[]", total)  # the chains' own copy: the batch's is reused
        ffi.memmove(iov, self._iov, total * ffi.sizeof("struct iovec"))
        chains = []
        for i in range(n):
            ref = self._refs[i]
            chain = Chain(self, ref, iov + int(ref.iov_start))
            self._outstanding[chain.slot] = chain
            chains.append(chain)
        return chains

    def push(self, chains: Iterable[Chain]) -> None:
        """Return chains to the driver with ``written`` bytes each, in one C call (which
        publishes the used entries and signals the driver if event idx asks for it)."""
        batch = list(chains)
        for chain in batch:
            self._own(chain)
            if not 0 <= chain.written <= chain.writable_len:
                raise ChainError(
                    f"chain {chain.head}: written {chain.written} is not within "
                    f"its {chain.writable_len} writable bytes"
                )
        if len({id(c) for c in batch}) != len(batch):
            raise ChainError("a chain is pushed twice in one batch")
        heads = ffi.new("uint32_t[]", [c.head for c in batch])
        lens = ffi.new("uint32_t[]", [c.written for c in batch])
        for chain in batch:
            del self._outstanding[chain.slot]
            chain._finish()
        lib.vu_vq_push_batch(self._vq, heads, lens, len(batch))

    def discard(self, chains: Sequence[Chain]) -> None:
        """Give chains back untouched: the next pop takes them again. They must be the
        newest chains taken and still outstanding (the ring can only move back)."""
        batch = list(chains)
        for chain in batch:
            self._own(chain)
        last = int(self._vq.last_avail_idx)
        newest = {(last - k) & 0xFFFF for k in range(1, len(batch) + 1)}
        if {c.slot for c in batch} != newest or any(s not in self._outstanding for s in newest):
            raise ChainError("only the newest outstanding chains can be discarded")
        for chain in batch:
            del self._outstanding[chain.slot]
            chain._finish()
        lib.vu_vq_discard(self._vq, len(batch))

    def _own(self, chain: Chain) -> None:
        chain._check()
        if chain._queue is not self or self._outstanding.get(chain.slot) is not chain:
            raise ChainError(f"chain {chain.head} is not outstanding on {self.label}")

    def report_kept_view(self, ref: weakref.ref[Any], address: int, length: int) -> None:
        self.kept_views += 1
        self._memory.pin(ref, address, length)

    def finish_all(self) -> tuple[int, int]:
        """The queue stops: discard what can be discarded (the newest chains, while no
        pushed one follows them), complete the rest with nothing written. Returns
        (discarded, completed empty)."""
        discarded = completed = 0
        last = int(self._vq.last_avail_idx)
        tail: list[Chain] = []
        while (chain := self._outstanding.get((last - len(tail) - 1) & 0xFFFF)) is not None:
            tail.append(chain)
        if tail:
            self.discard(tail)
            discarded = len(tail)
        rest = list(self._outstanding.values())
        for chain in rest:
            chain.written = 0
        if rest:
            self.push(rest)
            completed = len(rest)
        return discarded, completed
