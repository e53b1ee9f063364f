"""The virtio-blk driver of the test front end: requests built on a
:class:`~tests.support.frontend.DriverQueue`, completions read back from guest memory,
and the config space decoded.

* :class:`BlkDriver` -- builds virtio-blk requests (header, data, status byte) out of
  :class:`~tests.support.frontend.BufferPool` buffers, poisons what the device must
  write, and collects completions by waiting on the call eventfd.
* :class:`BlkRequest` / :class:`Completion` -- a request in flight and how it ended.
* :func:`parse_blk_config` -- struct virtio_blk_config.
* :class:`Guest` / :func:`connect_guest` -- one connection to a running
  ``vhost-user-blk`` (a :class:`~tests.support.daemon.Daemon`): negotiated, memory
  described, a :class:`BlkDriver` per queue.
* Raw chains (:func:`raw_header`, :func:`raw_buffer`, :func:`raw_table`,
  :func:`raw_chain`): descriptors written by hand, for chains no driver would make.
* The image seen from the host (:func:`disk_read`, :func:`disk_write`), and the two
  checks many tests end with: :func:`check_io_works` (a write and a read on a
  connection reach the image) and :func:`check_new_connection_works`.

Boundary: the driver asserts nothing about the device (only its own bookkeeping); the
two ``check_*`` functions are the only shared assertions, that the daemon still serves.
Constants keep the names of include/uapi/linux/virtio_blk.h.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from tests.support.daemon import Daemon
from tests.support.frontend import (
    ALL_FEATURES,
    DESC_SIZE,
    BufferPool,
    DriverQueue,
    FrontEnd,
    GuestRam,
    KiB,
    MiB,
)

#: the guest RAM of :func:`connect_guest`
RAM_SIZE = 64 * MiB

# --- virtio-blk feature bits (virtio 1.x, 5.2.3) ----------------------------------------

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# --- virtio-blk (include/uapi/linux/virtio_blk.h) ----------------------------------------
SECTOR_SIZE = 512
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
BLK_HDR = struct.Struct("<IIQ")  # type, ioprio (reserved), sector
BLK_DISCARD_SEG = struct.Struct("<QII")  # sector, num_sectors, flags
STATUS_UNTOUCHED = 0xFF


@dataclass(frozen=True)
class Completion:
    """How a virtio-blk request ended. status is None if the device left it untouched."""

    status: int | None
    used_len: int | None
    data: bytes = b""
    completed: bool = True

    @property
    def ok(self) -> bool:
        return self.completed and self.status == VIRTIO_BLK_S_OK


@dataclass(eq=False)
class BlkRequest:
    """A submitted request (the token :meth:`BlkDriver.kick_and_wait` takes)."""

    type: int
    sector: int
    head: int
    status_gpa: int
    in_segs: list[tuple[int, int]]
    allocs: list[tuple[BufferPool, int, int]] = field(repr=False)
    completion: Completion | None = None

    @property
    def done(self) -> bool:
        return self.completion is not None


class BlkError(Exception):
    def __init__(self, what: str, status: int | None) -> None:
        super().__init__(f"virtio-blk {what} failed with status {status}")
        self.status = status


def _split(n: int, segs: int | Sequence[int]) -> list[int]:
    if not isinstance(segs, int):
        sizes = list(segs)
        if sum(sizes) != n:
            raise ValueError(f"segment sizes {sizes} do not add up to {n}")
        return sizes
    segs = max(1, min(segs, n)) if n else 1
    base, extra = divmod(n, segs)
    return [base + (1 if k < extra else 0) for k in range(segs)]


class BlkDriver:
    """virtio-blk request builder on a :class:`DriverQueue`.

    Data buffers come from per-region :class:`BufferPool` s (round-robin over
    ``buf_regions``), are poisoned with ``poison`` before IN requests and freed on completion.
    """

    def __init__(
        self, queue: DriverQueue, *, buf_regions: Sequence[int] = (0,), poison: int = 0xA5
    ) -> None:
        self.queue = queue
        self.ram = queue.ram
        self.pools = [BufferPool(self.ram, r) for r in buf_regions]
        self.poison = poison
        self._rr = 0
        self.inflight: dict[int, BlkRequest] = {}
        self.unexpected_used: list[tuple[int, int]] = []

    # --- building -----------------------------------------------------------------------
    def _pool(self) -> BufferPool:
        p = self.pools[self._rr % len(self.pools)]
        self._rr += 1
        return p

    def submit_raw(
        self,
        type: int,
        sector: int = 0,
        out_data: bytes = b"",
        in_len: int = 0,
        *,
        segs: int | Sequence[int] = 1,
        indirect: bool = False,
        header_split: int | None = None,
        ioprio: int = 0,
    ) -> BlkRequest:
        """Queue (without publishing) header + out_data (readable) + in_len bytes
        (writable) + a status byte pre-set to 0xFF."""
        allocs: list[tuple[BufferPool, int, int]] = []
        bufs: list[tuple[int, int, bool]] = []

        def take(data: bytes | None, n: int, writable: bool) -> int:
            pool = self._pool()
            gpa = pool.alloc(n)
            allocs.append((pool, gpa, n))
            if data is not None:
                self.ram.write(gpa, data)
            bufs.append((gpa, n, writable))
            return gpa

        hdr = BLK_HDR.pack(type, ioprio, sector)
        if header_split is None:
            take(hdr, len(hdr), False)
        else:
            take(hdr[:header_split], header_split, False)
            take(hdr[header_split:], len(hdr) - header_split, False)
        if out_data:
            pos = 0
            for n in _split(len(out_data), segs):
                take(out_data[pos : pos + n], n, False)
                pos += n
        in_segs: list[tuple[int, int]] = []
        if in_len:
            for n in _split(in_len, segs):
                gpa = take(bytes([self.poison]) * n, n, True)
                in_segs.append((gpa, n))
        status_gpa = take(bytes([STATUS_UNTOUCHED]), 1, True)
        try:
            head = self.queue.add_chain(bufs, indirect)
        except BaseException:
            for pool, gpa, n in allocs:
                pool.free(gpa, n)
            raise
        req = BlkRequest(type, sector, head, status_gpa, in_segs, allocs)
        self.inflight[head] = req
        return req

    def submit_read(
        self, sector: int, nbytes: int, segs: int | Sequence[int] = 1, indirect: bool = False
    ) -> BlkRequest:
        return self.submit_raw(VIRTIO_BLK_T_IN, sector, in_len=nbytes, segs=segs, indirect=indirect)

    def submit_write(
        self, sector: int, data: bytes, segs: int | Sequence[int] = 1, indirect: bool = False
    ) -> BlkRequest:
        return self.submit_raw(
            VIRTIO_BLK_T_OUT, sector, out_data=data, segs=segs, indirect=indirect
        )

    def submit_flush(self, indirect: bool = False) -> BlkRequest:
        return self.submit_raw(VIRTIO_BLK_T_FLUSH, 0, indirect=indirect)

    def submit_get_id(self, indirect: bool = False) -> BlkRequest:
        return self.submit_raw(
            VIRTIO_BLK_T_GET_ID, 0, in_len=VIRTIO_BLK_ID_BYTES, indirect=indirect
        )

    @staticmethod
    def pack_segments(segments: Sequence[tuple[int, int, int]]) -> bytes:
        return b"".join(BLK_DISCARD_SEG.pack(s, n, f) for s, n, f in segments)

    def submit_discard(
        self, segments: Sequence[tuple[int, int, int]], indirect: bool = False
    ) -> BlkRequest:
        return self.submit_raw(
            VIRTIO_BLK_T_DISCARD, 0, out_data=self.pack_segments(segments), indirect=indirect
        )

    def submit_write_zeroes(
        self, segments: Sequence[tuple[int, int, int]], indirect: bool = False
    ) -> BlkRequest:
        return self.submit_raw(
            VIRTIO_BLK_T_WRITE_ZEROES, 0, out_data=self.pack_segments(segments), indirect=indirect
        )

    # --- completion ---------------------------------------------------------------------
    def collect(self) -> int:
        """Process new used entries; returns how many requests completed."""
        n = 0
        for uid, ulen in self.queue.get_used():
            req = self.inflight.pop(uid, None)
            if req is None:
                self.unexpected_used.append((uid, ulen))
                continue
            st = self.ram.read(req.status_gpa, 1)[0]
            data = b"".join(self.ram.read(g, k) for g, k in req.in_segs)
            for pool, gpa, k in req.allocs:
                pool.free(gpa, k)
            req.allocs.clear()
            req.completion = Completion(None if st == STATUS_UNTOUCHED else st, ulen, data)
            n += 1
        return n

    def publish_and_kick(self) -> None:
        self.queue.publish()
        self.queue.kick()

    def wait(
        self,
        tokens: Sequence[BlkRequest],
        timeout: float = 5.0,
        *,
        allow_timeout: bool = False,
        poll_interval: float | None = None,
    ) -> list[Completion]:
        """Wait for ``tokens`` to complete, relying on call notifications (a device that
        never signals times out) unless ``poll_interval`` is set."""
        deadline = time.monotonic() + timeout
        while True:
            self.collect()
            if all(t.done for t in tokens):
                break
            self.queue.enable_cb()
            self.collect()
            if all(t.done for t in tokens):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                if allow_timeout:
                    break
                missing = [t.head for t in tokens if not t.done]
                raise TimeoutError(
                    f"{len(missing)} of {len(tokens)} virtio-blk requests not completed "
                    f"within {timeout}s (heads {missing[:16]}); used_idx={self.queue.used_idx()}"
                )
            self.queue.wait_call(left if poll_interval is None else min(left, poll_interval))
        return [
            t.completion if t.completion is not None else Completion(None, None, b"", False)
            for t in tokens
        ]

    def kick_and_wait(
        self,
        tokens: Sequence[BlkRequest],
        timeout: float = 5.0,
        *,
        allow_timeout: bool = False,
        poll_interval: float | None = None,
    ) -> list[Completion]:
        self.publish_and_kick()
        return self.wait(tokens, timeout, allow_timeout=allow_timeout, poll_interval=poll_interval)

    # --- synchronous helpers ------------------------------------------------------------
    def _one(self, req: BlkRequest, timeout: float) -> Completion:
        return self.kick_and_wait([req], timeout)[0]

    def read(self, sector: int, nbytes: int, timeout: float = 5.0, **kw: Any) -> bytes:
        """Read ``nbytes`` at ``sector``; raises :class:`BlkError` unless status is OK."""
        c = self._one(self.submit_read(sector, nbytes, **kw), timeout)
        if c.status != VIRTIO_BLK_S_OK:
            raise BlkError(f"read of sector {sector}", c.status)
        return c.data

    def write(self, sector: int, data: bytes, timeout: float = 5.0, **kw: Any) -> int | None:
        return self._one(self.submit_write(sector, data, **kw), timeout).status

    def flush(self, timeout: float = 5.0) -> int | None:
        return self._one(self.submit_flush(), timeout).status

    def get_id(self, timeout: float = 5.0) -> bytes:
        """The device ID string (up to 20 bytes, cut at the first NUL)."""
        c = self._one(self.submit_get_id(), timeout)
        if c.status != VIRTIO_BLK_S_OK:
            raise BlkError("GET_ID", c.status)
        return c.data.split(b"\0", 1)[0]

    def discard(self, segments: Sequence[tuple[int, int, int]], timeout: float = 5.0) -> int | None:
        return self._one(self.submit_discard(segments), timeout).status

    def write_zeroes(
        self, segments: Sequence[tuple[int, int, int]], timeout: float = 5.0
    ) -> int | None:
        return self._one(self.submit_write_zeroes(segments), timeout).status


_BLK_CONFIG_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("capacity", 0, "<Q"),
    ("size_max", 8, "<I"),
    ("seg_max", 12, "<I"),
    ("cylinders", 16, "<H"),
    ("heads", 18, "<B"),
    ("sectors", 19, "<B"),
    ("blk_size", 20, "<I"),
    ("physical_block_exp", 24, "<B"),
    ("alignment_offset", 25, "<B"),
    ("min_io_size", 26, "<H"),
    ("opt_io_size", 28, "<I"),
    ("writeback", 32, "<B"),
    ("num_queues", 34, "<H"),
    ("max_discard_sectors", 36, "<I"),
    ("max_discard_seg", 40, "<I"),
    ("discard_sector_alignment", 44, "<I"),
    ("max_write_zeroes_sectors", 48, "<I"),
    ("max_write_zeroes_seg", 52, "<I"),
    ("write_zeroes_may_unmap", 56, "<B"),
)
BLK_CONFIG_SIZE = 60


def parse_blk_config(data: bytes) -> dict[str, int]:
    """Decode struct virtio_blk_config; fields beyond ``len(data)`` are left out."""
    out: dict[str, int] = {}
    for name, off, fmt in _BLK_CONFIG_FIELDS:
        if off + struct.calcsize(fmt) <= len(data):
            out[name] = struct.unpack_from(fmt, data, off)[0]
    return out


# =========================================================================================
# A guest's connection to the daemon
# =========================================================================================


@dataclass
class Guest:
    """One front-end connection with its guest RAM and a BlkDriver per queue."""

    fe: FrontEnd
    ram: GuestRam
    drivers: list[BlkDriver]
    daemon: Daemon

    @property
    def blk(self) -> BlkDriver:
        return self.drivers[0]

    @property
    def queue(self) -> DriverQueue:
        return self.drivers[0].queue

    def capacity(self) -> int:
        return parse_blk_config(self.fe.get_config())["capacity"]

    def close(self) -> None:
        self.fe.close()
        self.ram.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_guest(
    d: Daemon,
    *,
    queues: int | None = 1,
    queue_size: int = 128,
    features: int = ALL_FEATURES,
    regions: int = 2,
    ram_size: int = RAM_SIZE,
    add_mem_reg: bool = False,
    start_idx: int = 0,
    buf_regions: Sequence[int] = (0,),
) -> Guest:
    """Connect to ``d``, negotiate ``features`` (masked by what is offered), describe
    the RAM (SET_MEM_TABLE, or one ADD_MEM_REG per region) and set up ``queues``
    queues (None: as many as GET_QUEUE_NUM says)."""
    ram = GuestRam(ram_size, regions)
    fe = FrontEnd(d.socket_path, ram)
    try:
        fe.connect()
        fe.negotiate(features)
        if add_mem_reg:
            fe.add_mem_regions()
        else:
            fe.set_mem_table()
        n = fe.queue_num if queues is None else queues
        drivers = [
            BlkDriver(fe.setup_queue(i, queue_size, start_idx=start_idx), buf_regions=buf_regions)
            for i in range(n)
        ]
    except BaseException:
        fe.close()
        ram.close()
        raise
    return Guest(fe, ram, drivers, d)


# =========================================================================================
# Raw chains: descriptors written by hand
# =========================================================================================


def raw_header(ram: GuestRam, rtype: int = VIRTIO_BLK_T_IN, sector: int = 0) -> int:
    """A request header in fresh guest memory; returns its gpa."""
    gpa = ram.alloc(16)
    ram.write(gpa, BLK_HDR.pack(rtype, 0, sector))
    return gpa


def raw_buffer(ram: GuestRam, n: int, fill: int = 0xFF) -> int:
    """``n`` bytes of fresh guest memory filled with ``fill``; returns their gpa."""
    gpa = ram.alloc(n)
    ram.fill(gpa, n, fill)
    return gpa


def raw_table(ram: GuestRam, entries: Sequence[tuple[int, int, int, int]]) -> int:
    """An indirect table of (addr, len, flags, next) entries; returns its gpa."""
    gpa = ram.alloc(DESC_SIZE * len(entries), 16)
    for k, e in enumerate(entries):
        ram.pack("<QIHH", gpa + DESC_SIZE * k, *e)
    return gpa


def raw_chain(q: DriverQueue, entries: Sequence[tuple[int, int, int, int | None]]) -> list[int]:
    """Write entries (addr, len, flags, next as an index into ``entries`` or a raw
    number if >= len) into reserved descriptors; returns the descriptor indices."""
    idx = q.reserve_descs(len(entries))
    for k, (addr, n, flags, nxt) in enumerate(entries):
        raw = 0 if nxt is None else (idx[nxt] if nxt < len(entries) else nxt)
        q.write_desc(idx[k], addr, n, flags, raw)
    return idx


# =========================================================================================
# The image from the host side, and the checks that the daemon still serves
# =========================================================================================


def pattern(seed: int | str, n: int) -> bytes:
    """``n`` bytes that depend on ``seed``."""
    return random.Random(seed).randbytes(n)


def disk_read(d: Daemon, offset: int, n: int) -> bytes:
    """``n`` bytes of ``d``'s image at byte ``offset``, read by the host."""
    with open(d.image_path, "rb") as f:
        return os.pread(f.fileno(), n, offset)


def disk_write(d: Daemon, offset: int, data: bytes) -> None:
    """Write ``data`` into ``d``'s image at byte ``offset``, from the host."""
    with open(d.image_path, "r+b") as f:
        os.pwrite(f.fileno(), data, offset)


def check_io_works(g: Guest, d: Daemon, sector: int = 777) -> None:
    """A good write and read on queue 0 of ``g`` land on / come from the image (fresh
    random data each time, so an earlier call cannot make a dead write look good)."""
    data = os.urandom(4 * KiB)
    assert g.blk.write(sector, data) == VIRTIO_BLK_S_OK
    assert disk_read(d, sector * SECTOR_SIZE, len(data)) == data
    assert g.blk.read(sector, len(data)) == data


def check_new_connection_works(d: Daemon, sector: int = 901) -> None:
    """:func:`check_io_works` on a connection of its own."""
    with connect_guest(d) as g:
        check_io_works(g, d, sector)
