"""virtio-blk: feature bits, config space and the image back end.

Requests are handled in C (devices/blk/blk.c) by one worker thread per queue, with
preadv/pwritev straight between the image and guest memory. Synchronous I/O
in per-queue threads was chosen over io_uring for now: with a page-cached
image a 4 KiB preadv costs about a microsecond, less than an io_uring
submission round trip; see bench/ for the figures.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devices.blk import limits
from devices.blk._blk import ffi, lib
from vhost.device import RING_FEATURES, Device
from vhost.errors import CORE_ERRORS, ErrorTable
from vhost.metrics import MetricFamily
from vhost.virtqueue import Runner

if TYPE_CHECKING:
    from vhost._native import vu_vq

SECTOR = 512

# virtio-blk feature bits (virtio 1.x, 5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

CONFIG_SIZE = 60  # struct virtio_blk_config up to write_zeroes_may_unmap + padding

# Limits advertised in config space (devices/blk/limits.py); the C handler enforces them.
SIZE_MAX = limits.SIZE_MAX
SEG_MAX = limits.SEG_MAX
MAX_REQUEST_BYTES = limits.MAX_REQUEST_BYTES
MAX_DISCARD_SECTORS = limits.MAX_DISCARD_SECTORS
MAX_DISCARD_SEG = limits.MAX_DISCARD_SEG
MAX_WRITE_ZEROES_SECTORS = limits.MAX_WRITE_ZEROES_SECTORS
MAX_WRITE_ZEROES_SEG = limits.MAX_WRITE_ZEROES_SEG
DISCARD_ALIGNMENT_SECTORS = 8  # punching holes works in 4 KiB pages
MAX_QUEUES = limits.MAX_BLK_QUEUES

#: the request errors blk.c records, then the core's
BLK_ERRORS = ErrorTable.from_c(lib.blk_error_table, CORE_ERRORS)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B


class ImageError(Exception):
    """The image cannot be opened or created; the text says which and why."""


@dataclass(frozen=True)
class BlkOptions:
    path: str
    size: int | None = None
    read_only: bool = False
    num_queues: int = 1
    serial: str = ""


def parse_size(text: str) -> int:
    """'4096', '512K', '64M', '2G', '1T' (binary units, optional 'iB'/'B') -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    if not t.isdigit():
        raise ValueError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix")
    size = int(t) * mult
    if size <= 0 or size % SECTOR:
        raise ValueError(f"bad size {text!r}: must be a positive multiple of {SECTOR} bytes")
    return size


class BlkDevice(Device):
    supports_inflight = True
    errors = BLK_ERRORS

    def __init__(self, opts: BlkOptions) -> None:
        if not 1 <= opts.num_queues <= MAX_QUEUES:
            raise ValueError(f"--num-queues {opts.num_queues} is not in 1..{MAX_QUEUES}")
        if len(opts.serial.encode()) > 20:
            raise ValueError(f"--serial {opts.serial!r} is longer than 20 bytes")
        self.opts = opts
        self.created = not os.path.lexists(opts.path)  # this run made the image
        self.fd, self.is_blockdev = _open_image(opts)
        self.size, self.logical_block, self.physical_block = _geometry(self.fd, self.is_blockdev)
        if self.size < SECTOR:
            os.close(self.fd)
            raise ImageError(f"{opts.path}: image is smaller than one sector")
        self._dev = ffi.new("struct blk_dev *")
        self._dev.fd = self.fd
        self._dev.read_only = int(opts.read_only)
        self._dev.is_blockdev = int(self.is_blockdev)
        self._dev.capacity = self.size // SECTOR
        self._dev.max_discard_sectors = MAX_DISCARD_SECTORS
        self._dev.max_discard_seg = MAX_DISCARD_SEG
        self._dev.max_write_zeroes_sectors = MAX_WRITE_ZEROES_SECTORS
        self._dev.max_write_zeroes_seg = MAX_WRITE_ZEROES_SEG
        self._dev.max_request_bytes = MAX_REQUEST_BYTES
        serial = opts.serial.encode()
        ffi.memmove(self._dev.serial, serial.ljust(20, b"\0"), 20)
        self._queues = [ffi.new("struct blk_queue *") for _ in range(opts.num_queues)]
        for q in self._queues:
            q.dev = self._dev

    @property
    def features(self) -> int:
        f = (
            RING_FEATURES
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_MQ
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
        )
        if self.opts.read_only:
            f |= VIRTIO_BLK_F_RO
        return f

    @property
    def num_queues(self) -> int:
        return self.opts.num_queues

    def config_space(self) -> bytes:
        phys_exp = max(0, (self.physical_block // self.logical_block).bit_length() - 1)
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.size // SECTOR,  # capacity
            SIZE_MAX,
            SEG_MAX,
            0,
            0,
            0,  # geometry (not offered)
            self.logical_block,  # blk_size
            phys_exp,
            0,
            1,
            0,  # topology: exp, alignment, min_io, opt_io (blocks)
            0,
            0,  # writeback, unused
            self.opts.num_queues,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            DISCARD_ALIGNMENT_SECTORS,
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1,
        )

    def runner(self, queue_index: int) -> Runner:
        q = self._queues[queue_index]

        def run(vq: vu_vq) -> int:
            return int(lib.blk_run_queue(vq, q))

        return run

    def queue_stats(self, queue_index: int) -> dict[str, Any]:
        s = self._queues[queue_index].stats
        return {
            k: getattr(s, k)
            for k in (
                "reads",
                "writes",
                "flushes",
                "discards",
                "write_zeroes",
                "get_ids",
                "ioerr",
                "unsupp",
                "bytes_read",
                "bytes_written",
            )
        }

    def metrics(self) -> list[MetricFamily]:
        requests = MetricFamily(
            "vhost_blk_requests_total",
            "requests completed with status OK, by type (op)",
            "counter",
        )
        read = MetricFamily(
            "vhost_blk_read_bytes_total", "bytes read from the image into guest memory", "counter"
        )
        written = MetricFamily(
            "vhost_blk_written_bytes_total",
            "bytes written to the image from guest memory",
            "counter",
        )
        errors = MetricFamily(
            "vhost_blk_errors_total",
            "requests failed, by the status the guest got (kind: ioerr, unsupp)",
            "counter",
        )
        for i in self.queue_counters.indexes():  # the queues a front end has used
            s, queue = self._queues[i].stats, str(i)
            for op, n in (
                ("read", s.reads),
                ("write", s.writes),
                ("flush", s.flushes),
                ("discard", s.discards),
                ("write_zeroes", s.write_zeroes),
                ("get_id", s.get_ids),
            ):
                requests.add(n, queue=queue, op=op)
            read.add(s.bytes_read, queue=queue)
            written.add(s.bytes_written, queue=queue)
            errors.add(s.ioerr, queue=queue, kind="ioerr")
            errors.add(s.unsupp, queue=queue, kind="unsupp")
        return [requests, read, written, errors]

    def stats_line(self) -> str:
        totals: dict[str, int] = {}
        for i in range(self.num_queues):
            for k, v in self.queue_stats(i).items():
                totals[k] = totals.get(k, 0) + int(v)
        return " ".join(f"{k}={v}" for k, v in totals.items())

    def flush(self) -> None:
        if not self.opts.read_only:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._dev.fd = -1

    def abort(self) -> None:
        """A start that did not happen leaves no trace: the image goes if this run
        made it."""
        self.close()
        if self.created:
            os.unlink(self.opts.path)


def _open_image(opts: BlkOptions) -> tuple[int, bool]:
    flags = (os.O_RDONLY if opts.read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        st = os.stat(opts.path)
    except FileNotFoundError:
        if opts.size is None:
            raise ImageError(f"{opts.path}: no such file (give --size to create it)") from None
        if opts.read_only:
            raise ImageError(
                f"{opts.path}: no such file, and --read-only cannot create it"
            ) from None
        try:
            fd = os.open(opts.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, opts.size)  # sparse: no blocks until written
        except OSError as e:
            raise ImageError(f"{opts.path}: cannot create: {e.strerror}") from None
        return fd, False
    except OSError as e:
        raise ImageError(f"{opts.path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(f"{opts.path}: not a regular file or block device")
    try:
        fd = os.open(opts.path, flags)
    except OSError as e:
        raise ImageError(f"{opts.path}: cannot open: {e.strerror}") from None
    return fd, stat.S_ISBLK(st.st_mode)


def _geometry(fd: int, is_blockdev: bool) -> tuple[int, int, int]:
    """(size in bytes rounded down to sectors, logical block, physical block)."""
    if not is_blockdev:
        return os.fstat(fd).st_size // SECTOR * SECTOR, SECTOR, 4096
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    size = struct.unpack("<Q", buf)[0]
    logical = struct.unpack("<i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    physical = struct.unpack("<I", fcntl.ioctl(fd, BLKPBSZGET, b"\0" * 4))[0]
    return size // SECTOR * SECTOR, logical, physical
