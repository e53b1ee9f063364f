"""The vhost-user front end of the tests: plays QEMU's role over a real unix socket.

Layers, each usable on its own:

* :class:`GuestRam` -- guest memory: one memfd mmapped here, exposed as one or more
  vhost-user memory regions (with gaps in guest-physical space between them).
* :class:`DriverQueue` -- the driver side of a virtio 1.x split virtqueue living in
  :class:`GuestRam`, with its kick and call eventfds.
* :class:`FrontEnd` -- the vhost-user front end: connects to the back end's socket,
  negotiates features, sends the memory table and sets up queues.
* :class:`FrontEndListener` -- the front end as the server (QEMU's ``-chardev
  socket,server=on``): listens, and a back end in client mode (``--client``) connects;
  each accepted connection is a :class:`FrontEnd`.
* :class:`BufferPool` -- guest buffers in power-of-two size classes, for the drivers.

Boundary: nothing here knows a device. The virtio drivers that build requests on a
:class:`DriverQueue` live beside it: :mod:`tests.support.blk`, :mod:`tests.support.net`,
:mod:`tests.support.rng`.

All ring structures are little-endian (virtio 1.x); vhost-user messages are encoded by
:mod:`vhost.protocol`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeAlias

from vhost.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    AddMemReg,
    ConfigReply,
    GetConfig,
    GetFeatures,
    GetInflightFd,
    GetMaxMemSlots,
    GetProtocolFeatures,
    GetQueueNum,
    GetVringBase,
    InflightReply,
    MemoryRegion,
    ProtocolFeature,
    RemMemReg,
    ReplyReader,
    ResetDevice,
    SetConfig,
    SetFeatures,
    SetInflightFd,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringErr,
    SetVringKick,
    SetVringNum,
    U64Reply,
    VringStateReply,
    encode_message,
)

__all__ = [
    "ALL_FEATURES",
    "AckError",
    "BackEndClosed",
    "BufferPool",
    "DriverQueue",
    "FrontEnd",
    "FrontEndError",
    "FrontEndListener",
    "GuestRam",
    "QueueFull",
    "RamRegion",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = mmap.PAGESIZE

# --- virtio ring layout (include/uapi/linux/virtio_ring.h) -----------------------------
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len
MAX_QUEUE_SIZE = 1024

# --- feature bits -----------------------------------------------------------------------
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
ALL_FEATURES = (1 << 64) - 1

# vhost-user protocol feature masks
PF_MQ = int(ProtocolFeature.MQ)
PF_REPLY_ACK = int(ProtocolFeature.REPLY_ACK)
PF_CONFIG = int(ProtocolFeature.CONFIG)
PF_RESET_DEVICE = int(ProtocolFeature.RESET_DEVICE)
PF_CONFIGURE_MEM_SLOTS = int(ProtocolFeature.CONFIGURE_MEM_SLOTS)
PF_INFLIGHT_SHMFD = int(ProtocolFeature.INFLIGHT_SHMFD)
PF_LOG_SHMFD = int(ProtocolFeature.LOG_SHMFD)
#: VHOST_F_LOG_ALL: like QEMU, the front end sets it only while it migrates
F_LOG_ALL = 1 << 26
#: the protocol features this front end knows how to drive
FRONTEND_PROTOCOL_FEATURES = (
    PF_MQ
    | PF_REPLY_ACK
    | PF_CONFIG
    | PF_CONFIGURE_MEM_SLOTS
    | PF_RESET_DEVICE
    | PF_INFLIGHT_SHMFD
    | PF_LOG_SHMFD
)


def _as_mask(bit_or_mask: int) -> int:
    """A feature given either as a bit number or as a mask, as a mask."""
    v = int(bit_or_mask)
    return 1 << v if v < 64 else v


F_PROTOCOL_FEATURES = _as_mask(VHOST_USER_F_PROTOCOL_FEATURES)


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


# =========================================================================================
# Guest RAM
# =========================================================================================


@dataclass(frozen=True)
class RamRegion:
    """One region of :class:`GuestRam` as the front end describes it to the back end."""

    gpa: int
    size: int
    uva: int  # fake front-end virtual address; only has to be self-consistent
    mmap_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, n: int = 1) -> bool:
        return self.gpa <= gpa and gpa + n <= self.end


class GuestRam:
    """Guest memory: one memfd of ``size`` bytes, mmapped here, split into ``regions``.

    Region ``k`` covers file bytes ``[k*size/regions, (k+1)*size/regions)``. Region 0
    starts at guest-physical 0; every further region starts at the next 1 GiB boundary
    strictly above the previous region's end, so there is always a hole in between.
    """

    UVA_BASE = 0x7F00_0000_0000

    def __init__(self, size: int = 64 * MiB, regions: int = 1, *, name: str = "guest-ram") -> None:
        if not 1 <= regions <= 8:
            raise ValueError("regions must be between 1 and 8")
        if size <= 0 or size % (regions * PAGE_SIZE):
            raise ValueError(f"size must be a positive multiple of {regions} pages")
        self.size = size
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._mm: mmap.mmap | None = mmap.mmap(
                self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self._fd)
            raise
        per = size // regions
        layout: list[RamRegion] = []
        gpa = 0
        for k in range(regions):
            off = k * per
            layout.append(RamRegion(gpa=gpa, size=per, uva=self.UVA_BASE + off, mmap_offset=off))
            gpa = _align_up(gpa + per + 1, GiB)
        self.layout: tuple[RamRegion, ...] = tuple(layout)
        self._bump = [r.gpa for r in layout]

    # --- description --------------------------------------------------------------------
    @property
    def fd(self) -> int:
        return self._fd

    def regions(self) -> list[MemoryRegion]:
        return [
            MemoryRegion(
                guest_phys_addr=r.gpa,
                memory_size=r.size,
                userspace_addr=r.uva,
                mmap_offset=r.mmap_offset,
            )
            for r in self.layout
        ]

    def region_of(self, gpa: int, n: int = 1) -> RamRegion:
        """The region holding all of ``[gpa, gpa+n)`` (n may be 0); ValueError otherwise."""
        for r in self.layout:
            if r.gpa <= gpa < r.end and gpa + n <= r.end:
                return r
        raise ValueError(f"guest range {gpa:#x}+{n:#x} is not inside one RAM region")

    def gpa_to_offset(self, gpa: int, n: int = 1) -> int:
        r = self.region_of(gpa, n)
        return r.mmap_offset + (gpa - r.gpa)

    def uva_of(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uva + (gpa - r.gpa)

    # --- access -------------------------------------------------------------------------
    @property
    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError("GuestRam is closed")
        return self._mm

    def read(self, gpa: int, n: int) -> bytes:
        off = self.gpa_to_offset(gpa, n)
        return self._map[off : off + n]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        off = self.gpa_to_offset(gpa, n)
        self._map[off : off + n] = bytes(data)

    def fill(self, gpa: int, n: int, byte: int) -> None:
        self.write(gpa, bytes([byte]) * n)

    def unpack(self, fmt: str | struct.Struct, gpa: int) -> tuple[Any, ...]:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        return s.unpack_from(self._map, self.gpa_to_offset(gpa, s.size))

    def pack(self, fmt: str | struct.Struct, gpa: int, *values: Any) -> None:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        off = self.gpa_to_offset(gpa, s.size)
        # One slice store: pack_into zeroes the field before writing it, and the device
        # reading concurrently (avail->idx!) would see that transient 0.
        self._map[off : off + s.size] = s.pack(*values)

    def read_u16(self, gpa: int) -> int:
        return int(self.unpack("<H", gpa)[0])

    def write_u16(self, gpa: int, v: int) -> None:
        self.pack("<H", gpa, v & 0xFFFF)

    def read_u32(self, gpa: int) -> int:
        return int(self.unpack("<I", gpa)[0])

    def write_u32(self, gpa: int, v: int) -> None:
        self.pack("<I", gpa, v & 0xFFFF_FFFF)

    def read_u64(self, gpa: int) -> int:
        return int(self.unpack("<Q", gpa)[0])

    def write_u64(self, gpa: int, v: int) -> None:
        self.pack("<Q", gpa, v & ALL_FEATURES)

    # --- allocation ---------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16, region: int = 0) -> int:
        """Bump-allocate ``size`` bytes in region ``region``; never freed. MemoryError if full."""
        if align <= 0 or align & (align - 1):
            raise ValueError("align must be a power of two")
        r = self.layout[region]
        gpa = _align_up(self._bump[region], align)
        if gpa + size > r.end:
            raise MemoryError(f"guest RAM region {region} exhausted ({size} bytes wanted)")
        self._bump[region] = gpa + size
        return gpa

    def free_bytes(self, region: int = 0) -> int:
        return self.layout[region].end - self._bump[region]

    # --- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# =========================================================================================
# Driver-side split virtqueue
# =========================================================================================


class QueueFull(RuntimeError):
    """Not enough free descriptors for the chain."""


class DriverQueue:
    """The driver side of a split virtqueue in :class:`GuestRam`.

    Keeps its own free list of descriptors and a shadow ``avail_idx``; buffers added with
    :meth:`add_chain` become visible to the device only on :meth:`publish`.
    """

    def __init__(
        self,
        ram: GuestRam,
        num: int = 128,
        event_idx: bool = False,
        *,
        region: int = 0,
        start_idx: int = 0,
    ) -> None:
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise ValueError("queue size must be a power of two <= 1024")
        self.ram = ram
        self.num = num
        self.event_idx = event_idx
        self.region = region
        self._desc = ram.alloc(DESC_SIZE * num, 16, region)
        self._avail = ram.alloc(6 + 2 * num, 2, region)
        self._used = ram.alloc(6 + 8 * num, 4, region)
        ram.write(self._desc, bytes(DESC_SIZE * num))
        ram.write(self._avail, bytes(6 + 2 * num))
        ram.write(self._used, bytes(6 + 8 * num))
        self._free: list[int] = list(reversed(range(num)))
        self._chains: dict[int, list[int]] = {}
        self._indirect_tables: dict[int, tuple[int, int]] = {}  # head -> (gpa, capacity)
        self._avail_idx = 0
        self._last_used = 0
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks = 0
        if start_idx:
            self.start_index(start_idx)

    # --- geometry -----------------------------------------------------------------------
    @property
    def desc_gpa(self) -> int:
        return self._desc

    @property
    def avail_gpa(self) -> int:
        return self._avail

    @property
    def used_gpa(self) -> int:
        return self._used

    @property
    def avail_idx(self) -> int:
        """The driver's shadow avail index (what the next :meth:`publish` writes)."""
        return self._avail_idx

    @property
    def last_used_idx(self) -> int:
        return self._last_used

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    def chain_of(self, head: int) -> list[int]:
        """Descriptor indices (in the main table) that a pending chain occupies."""
        return list(self._chains[head])

    def start_index(self, v: int) -> None:
        """Start the rings at index ``v`` (pair with SET_VRING_BASE v on the back end)."""
        if self._chains:
            raise RuntimeError("start_index on a queue with buffers in flight")
        v &= 0xFFFF
        self._avail_idx = self._last_used = v
        self.ram.write_u16(self._avail + 2, v)
        self.ram.write_u16(self._used + 2, v)

    # --- descriptors --------------------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int, next: int) -> None:
        """Raw write of descriptor ``i`` (no bookkeeping; for hostile tests)."""
        if not 0 <= i < self.num:
            raise IndexError(f"descriptor {i} out of range")
        self.ram.pack(_DESC, self._desc + DESC_SIZE * i, addr, length, flags, next)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, flags, next) of descriptor ``i``."""
        if not 0 <= i < self.num:
            raise IndexError(f"descriptor {i} out of range")
        return self.read_table(self.ram, self._desc + DESC_SIZE * i, 1)[0]

    @staticmethod
    def read_table(ram: GuestRam, gpa: int, count: int) -> list[tuple[int, int, int, int]]:
        """Decode ``count`` descriptors at ``gpa`` (the main table or an indirect one)."""
        return [tuple(ram.unpack(_DESC, gpa + DESC_SIZE * k)) for k in range(count)]

    def reserve_descs(self, n: int) -> list[int]:
        """Take ``n`` descriptors off the free list for hand-built chains."""
        if n > len(self._free):
            raise QueueFull(f"{n} descriptors wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def next_head(self) -> int | None:
        """The head the next :meth:`add_chain` will use (None: no descriptor is free)."""
        return self._free[-1] if self._free else None

    def release_descs(self, idxs: Iterable[int]) -> None:
        self._free.extend(reversed(list(idxs)))

    def _indirect_table(self, head: int, n: int) -> int:
        gpa, cap = self._indirect_tables.get(head, (0, 0))
        if cap < n:
            cap = max(n, 2 * cap, 8)
            gpa = self.ram.alloc(DESC_SIZE * cap, 16, self.region)
            self._indirect_tables[head] = (gpa, cap)
        return gpa

    def add_chain(self, bufs: Sequence[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Add a chain of (gpa, len, device_writable) buffers; returns the head index.

        The head goes into the avail ring but is not visible until :meth:`publish`.
        """
        if not bufs:
            raise ValueError("empty chain")
        if indirect:
            (head,) = self.reserve_descs(1)
            table = self._indirect_table(head, len(bufs))
            last = len(bufs) - 1
            for k, (addr, length, writable) in enumerate(bufs):
                flags = (VRING_DESC_F_NEXT if k < last else 0) | (
                    VRING_DESC_F_WRITE if writable else 0
                )
                self.ram.pack(
                    _DESC, table + DESC_SIZE * k, addr, length, flags, k + 1 if k < last else 0
                )
            self.write_desc(head, table, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT, 0)
            chain = [head]
        else:
            chain = self.reserve_descs(len(bufs))
            head = chain[0]
            for k, (addr, length, writable) in enumerate(bufs):
                more = k + 1 < len(chain)
                flags = (VRING_DESC_F_NEXT if more else 0) | (VRING_DESC_F_WRITE if writable else 0)
                self.write_desc(chain[k], addr, length, flags, chain[k + 1] if more else 0)
        self._chains[head] = chain
        self._put_ring_entry(head)
        return head

    # --- avail ring ---------------------------------------------------------------------
    def _put_ring_entry(self, head: int) -> None:
        self.ram.write_u16(self._avail + 4 + 2 * (self._avail_idx % self.num), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """Make every added chain visible: write avail->idx (ring entries were written first)."""
        self.ram.write_u16(self._avail + 2, self._avail_idx)

    def put_avail(self, head: int) -> None:
        """Raw: put ``head`` in the next avail slot and publish, with no bookkeeping."""
        self._put_ring_entry(head & 0xFFFF)
        self.publish()

    def set_avail_idx(self, v: int) -> None:
        """Raw: write avail->idx = v (and make it the shadow index)."""
        self._avail_idx = v & 0xFFFF
        self.publish()

    def published_avail_idx(self) -> int:
        return self.ram.read_u16(self._avail + 2)

    def set_no_interrupt(self, flag: bool) -> None:
        self.ram.write_u16(self._avail, VRING_AVAIL_F_NO_INTERRUPT if flag else 0)

    def set_used_event(self, v: int) -> None:
        """Write avail->used_event (avail->ring[num])."""
        self.ram.write_u16(self._avail + 4 + 2 * self.num, v)

    def used_event(self) -> int:
        return self.ram.read_u16(self._avail + 4 + 2 * self.num)

    # --- used ring ----------------------------------------------------------------------
    def used_idx(self) -> int:
        return self.ram.read_u16(self._used + 2)

    def used_flags(self) -> int:
        return self.ram.read_u16(self._used)

    def avail_event(self) -> int:
        """Read used->avail_event (used->ring[num])."""
        return self.ram.read_u16(self._used + 4 + 8 * self.num)

    def read_used_elem(self, slot: int) -> tuple[int, int]:
        return tuple(self.ram.unpack(_USED_ELEM, self._used + 4 + 8 * (slot % self.num)))

    def get_used(self) -> list[tuple[int, int]]:
        """New (id, len) used entries since the last call; frees their descriptors.

        Entries whose id is not a pending head (hostile or buggy device) are returned as-is.
        """
        idx = self.used_idx()
        pending = (idx - self._last_used) & 0xFFFF
        if pending > self.num:
            raise RuntimeError(
                f"used ring overrun: used->idx={idx} last_used={self._last_used} num={self.num}"
            )
        out: list[tuple[int, int]] = []
        for _ in range(pending):
            uid, ulen = self.read_used_elem(self._last_used)
            self._last_used = (self._last_used + 1) & 0xFFFF
            chain = self._chains.pop(uid, None)
            if chain is not None:
                self.release_descs(chain)
            out.append((uid, ulen))
        return out

    # --- notifications ------------------------------------------------------------------
    @staticmethod
    def need_event(event: int, new: int, old: int) -> bool:
        """virtio's vring_need_event on 16-bit indices."""
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def need_kick(self, old_avail_idx: int) -> bool:
        """Whether the device asked to be kicked for the entries after ``old_avail_idx``."""
        if self.event_idx:
            return self.need_event(self.avail_event(), self._avail_idx, old_avail_idx)
        return not self.used_flags() & VRING_USED_F_NO_NOTIFY

    def enable_cb(self) -> None:
        """Ask for a call on the next used entry (used_event, or clear NO_INTERRUPT)."""
        if self.event_idx:
            self.set_used_event(self._last_used)
        else:
            self.set_no_interrupt(False)

    def disable_cb(self) -> None:
        if not self.event_idx:
            self.set_no_interrupt(True)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    def wait_call(self, timeout: float) -> bool:
        """Wait until the call eventfd fires (and drain it); False on timeout."""
        p = select.poll()
        p.register(self.call_fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            if p.poll(int(left * 1000)) and self.drain_call():
                return True
            if time.monotonic() >= deadline:
                return False

    def drain_call(self) -> bool:
        try:
            os.eventfd_read(self.call_fd)
            return True
        except BlockingIOError:
            return False

    def drain_stale_calls(self) -> None:
        """Forget calls for work already collected: the device writes the call eventfd just
        after publishing used->idx, so a call can trail the completion the driver saw."""
        time.sleep(0.02)
        self.drain_call()

    def wait_used_idx(self, idx: int, timeout: float = 5.0) -> None:
        """Poll (without asking for a call) until used->idx reaches ``idx``."""
        deadline = time.monotonic() + timeout
        while self.used_idx() != idx & 0xFFFF:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"used idx {self.used_idx()}, waiting for {idx}")
            time.sleep(0.002)

    def close(self) -> None:
        for name in ("kick_fd", "call_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


# =========================================================================================
# vhost-user front end
# =========================================================================================

Reply: TypeAlias = U64Reply | VringStateReply | ConfigReply | InflightReply
_REPLYING = (
    GetFeatures,
    GetProtocolFeatures,
    GetVringBase,
    GetQueueNum,
    GetConfig,
    GetMaxMemSlots,
    GetInflightFd,
)
_HDR = struct.Struct("<III")


class FrontEndError(Exception):
    pass


class BackEndClosed(FrontEndError, ConnectionError):
    """The back end closed the connection."""


class AckError(FrontEndError):
    """A REPLY_ACK came back nonzero."""

    def __init__(self, msg: object, value: int) -> None:
        super().__init__(f"{type(msg).__name__} was refused by the back end (ack={value})")
        self.msg = msg
        self.value = value


class FrontEnd:
    """The QEMU role: a vhost-user front end connected to ``socket_path``."""

    def __init__(self, socket_path: str | os.PathLike[str], ram: GuestRam, timeout: float = 5.0):
        self.socket_path = os.fspath(socket_path)
        self.ram = ram
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._reader = ReplyReader()
        self.offered_features = 0
        self.features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.queue_num = 1
        self.queues: dict[int, DriverQueue] = {}
        self._reply_fds: list[int] = []  # fds that came with reply bytes not yet parsed

    # --- connection ---------------------------------------------------------------------
    def connect(self, timeout: float = 5.0) -> FrontEnd:
        """Connect, retrying until the socket exists and accepts; returns self."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"cannot connect to {self.socket_path}: {e}") from e
                time.sleep(0.02)
                continue
            self.sock = s
            self._reader = ReplyReader()
            return self

    def attach(self, sock: socket.socket) -> FrontEnd:
        """Use an already connected socket (e.g. one end of a socketpair)."""
        self.sock = sock
        self._reader = ReplyReader()
        return self

    @property
    def _s(self) -> socket.socket:
        if self.sock is None:
            raise FrontEndError("not connected")
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for q in self.queues.values():
            q.close()
        self.queues.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- raw I/O ------------------------------------------------------------------------
    def raw_send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes (with fds as SCM_RIGHTS on the first chunk) exactly as given."""
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        try:
            sent = self._s.sendmsg([view], anc if fds else [])
            while sent < len(view):
                view = view[sent:]
                sent = self._s.sendmsg([view])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise BackEndClosed(f"back end closed the connection while sending: {e}") from e

    def read_reply(self, timeout: float | None = None, what: str = "reply") -> Reply:
        """Read the next reply message from the back end."""
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while True:
            r = self._reader.next_reply()
            if r is not None:
                return self._attach_reply_fd(r)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} from the back end within {t}s")
            self._s.settimeout(left)
            try:
                chunk, fds, _flags, _addr = socket.recv_fds(self._s, 65536, 8)
                self._reply_fds += fds
            except TimeoutError:
                continue
            except ConnectionResetError as e:
                raise BackEndClosed(f"back end reset the connection waiting for {what}") from e
            finally:
                if self.sock is not None:
                    self.sock.settimeout(None)
            if not chunk:
                raise BackEndClosed(f"back end closed the connection waiting for {what}")
            self._reader.feed(chunk)

    def _attach_reply_fd(self, r: Reply) -> Reply:
        """GET_INFLIGHT_FD's reply owns the fd that came with it; any other fd is junk."""
        fds, self._reply_fds = self._reply_fds, []
        if isinstance(r, InflightReply) and fds:
            r = dataclasses.replace(r, fd=fds.pop(0))
        for fd in fds:
            os.close(fd)
        return r

    def is_closed_by_peer(self, timeout: float = 1.0) -> bool:
        """True if the back end closes the connection within ``timeout`` (reads discarded)."""
        deadline = time.monotonic() + timeout
        s = self._s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    return False
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        finally:
            if self.sock is not None:
                self.sock.settimeout(None)

    # --- messages -----------------------------------------------------------------------
    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & PF_REPLY_ACK)

    def request(self, msg: Any, timeout: float | None = None) -> Reply | None:
        """Send ``msg``; read its reply if it is a GET_* or has need_reply set."""
        data, fds = encode_message(msg)
        code = _HDR.unpack_from(data)[0]
        self.raw_send(data, fds)
        if not (isinstance(msg, _REPLYING) or msg.need_reply):
            return None
        reply = self.read_reply(timeout, what=f"reply to {type(msg).__name__}")
        if int(reply.request) != code:
            raise FrontEndError(
                f"reply for request {int(reply.request)} while waiting for "
                f"{type(msg).__name__} ({code})"
            )
        return reply

    def request_ack(self, msg: Any, timeout: float | None = None) -> Reply | None:
        """Like :meth:`request`, but sets need_reply when REPLY_ACK is negotiated and
        raises :class:`AckError` on a nonzero ack."""
        if self.reply_ack and not isinstance(msg, _REPLYING):
            msg = dataclasses.replace(msg, need_reply=True)
        reply = self.request(msg, timeout)
        if msg.need_reply and not isinstance(msg, _REPLYING):
            if not isinstance(reply, U64Reply):
                raise FrontEndError(f"expected a u64 ack for {type(msg).__name__}, got {reply!r}")
            if reply.value != 0:
                raise AckError(msg, reply.value)
        return reply

    def _u64(self, msg: Any) -> int:
        r = self.request(msg)
        if not isinstance(r, U64Reply):
            raise FrontEndError(f"expected a u64 reply to {type(msg).__name__}, got {r!r}")
        return int(r.value)

    def get_features(self) -> int:
        return self._u64(GetFeatures())

    def get_protocol_features(self) -> int:
        return self._u64(GetProtocolFeatures())

    def get_queue_num(self) -> int:
        return self._u64(GetQueueNum())

    def get_max_mem_slots(self) -> int:
        return self._u64(GetMaxMemSlots())

    def negotiate(self, features_wanted_mask: int = ALL_FEATURES) -> tuple[int, int]:
        """The QEMU handshake; returns (acked features, acked protocol features)."""
        self.offered_features = self.get_features()
        self.protocol_features = 0
        if self.offered_features & F_PROTOCOL_FEATURES:
            self.offered_protocol_features = self.get_protocol_features()
            pf = self.offered_protocol_features & FRONTEND_PROTOCOL_FEATURES
            self.request(SetProtocolFeatures(pf))
            self.protocol_features = pf
        self.request_ack(SetOwner())
        self.features = (self.offered_features & features_wanted_mask & ~F_LOG_ALL) | (
            self.offered_features & F_PROTOCOL_FEATURES
        )
        self.request_ack(SetFeatures(self.features))
        self.queue_num = self.get_queue_num() if self.protocol_features & PF_MQ else 1
        return self.features, self.protocol_features

    def set_features(self, features: int) -> None:
        self.features = features
        self.request_ack(SetFeatures(features))

    def get_config(self, size: int = 60, offset: int = 0, flags: int = 0) -> bytes:
        r = self.request(GetConfig(offset, size, flags, bytes(size)))
        if not isinstance(r, ConfigReply):
            raise FrontEndError(f"expected a config reply, got {r!r}")
        if r.size == 0 or not r.data:
            raise FrontEndError("back end refused GET_CONFIG (empty reply)")
        return bytes(r.data)

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request_ack(SetConfig(offset, len(data), flags, bytes(data)))

    def set_mem_table(self) -> None:
        regions = self.ram.regions()
        self.request_ack(SetMemTable(tuple(regions), tuple(self.ram.fd for _ in regions)))

    def add_mem_regions(self) -> None:
        """Describe the RAM with one ADD_MEM_REG per region (CONFIGURE_MEM_SLOTS)."""
        for r in self.ram.regions():
            self.request_ack(AddMemReg(r, self.ram.fd))

    def remove_mem_region(self, index: int) -> None:
        self.request_ack(RemMemReg(self.ram.regions()[index], None))

    def reset_device(self) -> None:
        self.request_ack(ResetDevice())

    # --- queues -------------------------------------------------------------------------
    def setup_queue(
        self,
        index: int,
        size: int = 128,
        event_idx: bool | None = None,
        start_idx: int = 0,
        *,
        region: int = 0,
        enable: bool = True,
        log: bool = False,
    ) -> DriverQueue:
        """Allocate a ring and hand it to the back end; event_idx defaults to negotiated."""
        if event_idx is None:
            event_idx = bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX))
        old = self.queues.pop(index, None)
        if old is not None:
            old.close()
        q = DriverQueue(self.ram, size, event_idx, region=region, start_idx=start_idx)
        self.queues[index] = q
        self.announce_queue(index, q, start_idx, enable=enable, log=log)
        return q

    def announce_queue(
        self, index: int, q: DriverQueue, base: int, *, enable: bool = True, log: bool = False
    ) -> None:
        """Describe an existing ring to the back end (what QEMU does for a running guest
        when it reconnects; after a back-end crash it sends the used index as base)."""
        ack = self.request_ack
        ack(SetVringNum(index, q.num))
        ack(SetVringBase(index, base & 0xFFFF))
        ack(
            SetVringAddr(
                index=index,
                flags=1 if log else 0,
                desc_user_addr=self.ram.uva_of(q.desc_gpa),
                used_user_addr=self.ram.uva_of(q.used_gpa),
                avail_user_addr=self.ram.uva_of(q.avail_gpa),
                log_guest_addr=0,
            )
        )
        ack(SetVringKick(index, q.kick_fd))
        ack(SetVringCall(index, q.call_fd))
        if enable and self.features & F_PROTOCOL_FEATURES:
            ack(SetVringEnable(index, True))

    def enable_queue(self, index: int, enable: bool = True) -> None:
        self.request_ack(SetVringEnable(index, enable))

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self.request_ack(SetVringErr(index, fd))

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightReply:
        """GET_INFLIGHT_FD: the caller owns the reply's fd (None when refused)."""
        r = self.request(GetInflightFd(num_queues, queue_size))
        if not isinstance(r, InflightReply):
            raise FrontEndError(f"expected an inflight reply, got {r!r}")
        return r

    def set_inflight_fd(self, region: InflightReply) -> None:
        """SET_INFLIGHT_FD with a region from get_inflight_fd (the fd stays the caller's)."""
        assert region.fd is not None
        self.request_ack(
            SetInflightFd(
                region.mmap_size,
                region.mmap_offset,
                region.num_queues,
                region.queue_size,
                region.fd,
            )
        )

    def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring; returns the back end's next avail index."""
        r = self.request(GetVringBase(index))
        if not isinstance(r, VringStateReply):
            raise FrontEndError(f"expected a vring state reply, got {r!r}")
        if int(r.index) != index:
            raise FrontEndError(f"GET_VRING_BASE({index}) answered for ring {r.index}")
        return int(r.num)


class FrontEndListener:
    """The front end as the server, as QEMU is with ``-chardev socket,server=on``: it
    listens on ``socket_path`` (created on :meth:`listen`, removed on :meth:`close`) and
    a back end in client mode connects to it. :meth:`accept` gives each connection as
    a :class:`FrontEnd`."""

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        self.socket_path = os.fspath(socket_path)
        self.sock: socket.socket | None = None
        #: connections accepted so far
        self.accepted = 0

    def listen(self, backlog: int = 1) -> FrontEndListener:
        """Bind and listen (a stale file is replaced); returns self."""
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(self.socket_path)
            s.listen(backlog)
        except BaseException:
            s.close()
            raise
        self.sock = s
        return self

    def accept_socket(self, timeout: float = 5.0) -> socket.socket:
        """The next connection's socket; TimeoutError if none comes within ``timeout``."""
        if self.sock is None:
            raise FrontEndError("not listening")
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise TimeoutError(
                f"no back end connected to {self.socket_path} within {timeout}s"
            ) from None
        conn.settimeout(None)
        self.accepted += 1
        return conn

    def accept(self, ram: GuestRam, timeout: float = 5.0) -> FrontEnd:
        """The next back end that connects, as a front end on ``ram``."""
        return FrontEnd(self.socket_path, ram).attach(self.accept_socket(timeout))

    def close(self, *, unlink: bool = True) -> None:
        """Stop listening (connections already accepted stay open); ``unlink``: remove
        the socket file, as a QEMU that quits does (one that is killed leaves it)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# =========================================================================================
# Guest buffers for the drivers
# =========================================================================================


class BufferPool:
    """Power-of-two size classes carved lazily out of one :class:`GuestRam` region."""

    MIN_CLASS = 64

    def __init__(self, ram: GuestRam, region: int = 0) -> None:
        self.ram = ram
        self.region = region
        self._free: dict[int, list[int]] = {}
        self.outstanding = 0

    def _cls(self, n: int) -> int:
        return max(self.MIN_CLASS, 1 << (max(n, 1) - 1).bit_length())

    def alloc(self, n: int) -> int:
        c = self._cls(n)
        lst = self._free.get(c)
        gpa = lst.pop() if lst else self.ram.alloc(c, min(c, PAGE_SIZE), self.region)
        self.outstanding += 1
        return gpa

    def free(self, gpa: int, n: int) -> None:
        self._free.setdefault(self._cls(n), []).append(gpa)
        self.outstanding -= 1
