"""Message generators shared by the protocol fuzzers: well-formed vhost-user requests
in any order, mutated frames, and the fds they carry.

Both fuzzers draw from the same generators through a :class:`Source`: the state
machine (test_protocol_state_machine.py) with hypothesis draws, so failures shrink; the
socket fuzzer (test_socket_fuzz.py) with a seeded ``random.Random``, so it is fast and a
run is reproducible from its seed.

What a generator knows of the back end is a :class:`Target`: the front end's guest RAM
(regions, ring areas it may point rings at) and the device's features and queue count,
so that a good share of messages are *valid* and get the back end into deep states
(memory mapped, rings started), where mutated messages then do the most damage.

Fds: eventfds, pipes and sockets (the front end keeps the other end), the RAM memfd,
a memfd of one page (regions over it reach past the end of the file), a regular file
and /dev/null (readable forever: refused as notifiers). The RAM memfd is truncated to
:data:`MEMFD_SIZE`, so regions of any size that fit the address space map over it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from hypothesis import strategies as st

from tests.support.frontend import GuestRam
from vhost import protocol as p

T = TypeVar("T")

#: Size of the RAM memfd (sparse): as much as the address space (47 bits) can map, so
#: that huge regions over it are accepted and mapped, not refused for the file size.
MEMFD_SIZE: Final = 1 << 47
RING_SIZE: Final = 256  # ring areas are laid out for this many entries
HEADER: Final = struct.Struct("<III")

INTERESTING_U32: Final = (
    0,
    1,
    2,
    3,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x101,
    0x3FF,
    0x400,
    0x401,
    0xFFF,
    0x1000,
    0x1001,
    0xFFFF,
    0x10000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
)
INTERESTING_U64: Final = (
    *INTERESTING_U32,
    1 << 32,
    (1 << 32) + 1,
    1 << 46,
    1 << 47,
    (1 << 47) - 4096,
    1 << 48,
    1 << 63,
    (1 << 64) - 4096,
    (1 << 64) - 1,
    (1 << 64) - 2,
)


class Source(Protocol):
    """Where the generators' choices come from."""

    def between(self, lo: int, hi: int) -> int: ...
    def pick(self, seq: Sequence[T]) -> T: ...
    def bytes(self, n: int) -> bytes: ...
    def chance(self, percent: int) -> bool: ...


class RandomSource:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def between(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, seq: Sequence[T]) -> T:
        return seq[self.rng.randrange(len(seq))]

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def chance(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent


class DrawSource:
    """Choices drawn from a hypothesis ``st.data()`` object (so examples shrink)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def between(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def pick(self, seq: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(seq))

    def bytes(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))

    def chance(self, percent: int) -> bool:
        # Shrinks towards "no": the simplest example takes the plain branch.
        return self.data.draw(st.integers(0, 99)) >= 100 - percent


def u32(src: Source) -> int:
    return src.pick(INTERESTING_U32) if src.chance(60) else src.between(0, 0xFFFF_FFFF)


def u64(src: Source) -> int:
    return src.pick(INTERESTING_U64) if src.chance(60) else src.between(0, (1 << 64) - 1)


# --- what the generators aim at -----------------------------------------------------------


@dataclass(frozen=True)
class RingArea:
    """Room in guest RAM for one split ring of up to RING_SIZE entries (front-end virtual)."""

    desc: int
    avail: int
    used: int


@dataclass
class Target:
    ram: GuestRam
    num_queues: int
    features: int  # what GET_FEATURES offers
    protocol_features: int
    rings: tuple[RingArea, ...]

    @classmethod
    def build(cls, ram: GuestRam, num_queues: int, features: int, protocol_features: int) -> Target:
        areas = []
        for k in range(num_queues + 1):  # one spare: a ring another queue may share
            region = k % len(ram.layout)
            desc = ram.alloc(16 * RING_SIZE, 4096, region)
            avail = ram.alloc(6 + 2 * RING_SIZE, 2, region)
            used = ram.alloc(6 + 8 * RING_SIZE, 4096, region)
            areas.append(RingArea(ram.uva_of(desc), ram.uva_of(avail), ram.uva_of(used)))
        return cls(ram, num_queues, features, protocol_features, tuple(areas))

    def regions(self) -> list[p.MemoryRegion]:
        return self.ram.regions()


# --- fds ------------------------------------------------------------------------------------

#: fds a message may carry, and the mix for notifiers (kick, call, err) and memory.
FD_KINDS: Final = (
    "eventfd",
    "eventfd",
    "pipe",
    "socket",
    "memfd",
    "small_memfd",
    "file",
    "devnull",
)
KICK_KINDS: Final = (
    "eventfd",
    "eventfd",
    "eventfd",
    "eventfd",
    "pipe",
    "socket",
    "file",
    "devnull",
)
MEM_KINDS: Final = ("eventfd", "pipe", "small_memfd", "small_memfd", "file", "devnull")


class FdFactory:
    """Makes the fds a frame carries. ``make`` returns the fd to hand over (ownership goes
    with it); the front end's own ends (an eventfd to kick through, a pipe's write end,
    a socket's peer) are kept, the oldest closed beyond ``keep``."""

    def __init__(self, memfd: int, keep: int = 16) -> None:
        self.memfd = memfd
        self.keep = keep
        self.kept: deque[int] = deque()
        self.made = 0

    def make(self, kind: str) -> int:
        self.made += 1
        if kind == "memfd":
            return os.dup(self.memfd)
        if kind == "small_memfd":
            fd = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096)
            return fd
        if kind == "file":  # a regular file (read-write: it could be mapped)
            fd = os.memfd_create("fuzz-file", os.MFD_CLOEXEC)
            os.write(fd, b"not an eventfd")
            return fd
        if kind == "devnull":
            return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        if kind == "eventfd":
            mine = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            theirs = os.dup(mine)
        elif kind == "pipe":
            theirs, mine = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        elif kind == "socket":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs, mine = a.detach(), b.detach()
            os.set_inheritable(theirs, False)
        else:
            raise ValueError(f"unknown fd kind {kind!r}")
        self.kept.append(mine)
        while len(self.kept) > self.keep:
            os.close(self.kept.popleft())
        return theirs

    def poke(self, src: Source) -> None:
        """Make one of the kept fds readable on the other side (a kick, if it is one)."""
        if not self.kept:
            return
        fd = src.pick(list(self.kept))
        with contextlib.suppress(OSError):  # a full pipe or socket, a closed peer
            os.write(fd, struct.pack("<Q", 1))

    def close(self) -> None:
        while self.kept:
            os.close(self.kept.popleft())


# --- frames ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """Bytes to send and the kinds of fds to send with them."""

    data: bytes
    fds: tuple[str, ...]
    label: str  # "SET_MEM_TABLE", "bitflip", ... (for the summary counts)


def request_code(msg: p.Message) -> int:
    """The request code a decoded message came with (re-encoding it says)."""
    data, _fds = p.encode_message(msg)
    return int(HEADER.unpack_from(data)[0])


def frame_of(msg: p.Message, kinds: Sequence[str], label: str = "") -> Frame:
    data, fds = p.encode_message(msg)
    if len(fds) != len(kinds):
        raise ValueError(f"{msg!r}: {len(fds)} fds but kinds {kinds}")
    name = p.request_name(int(HEADER.unpack_from(data)[0])).split("(")[0]
    return Frame(data, tuple(kinds), label or name)


def queue_index(src: Source, t: Target, *, vring_fd: bool = False) -> int:
    if src.chance(85):
        return src.between(0, t.num_queues - 1)
    index = src.pick((t.num_queues, t.num_queues + 1, 0xFF, 0x100, 0xFFFF_FFFF, u32(src)))
    return index & p.VRING_INDEX_MASK if vring_fd else index


def region(src: Source, t: Target) -> p.MemoryRegion:
    """A region the parser accepts (size > 0, no 64-bit wrap), often one of the RAM's."""
    regions = t.regions()
    if src.chance(70):
        return src.pick(regions)
    real = src.pick(regions)
    how = src.pick(("shift_gpa", "shift_uva", "grow", "shrink", "random", "random"))
    if how == "shift_gpa":
        return p.MemoryRegion(
            real.guest_phys_addr + src.pick((1, 4096, 1 << 30)),
            real.memory_size,
            real.userspace_addr,
            real.mmap_offset,
        )
    if how == "shift_uva":
        return p.MemoryRegion(
            real.guest_phys_addr,
            real.memory_size,
            real.userspace_addr + src.pick((1, 4096, 1 << 30)),
            real.mmap_offset,
        )
    if how == "grow":
        return p.MemoryRegion(
            real.guest_phys_addr,
            real.memory_size * src.pick((2, 16, 4096)),
            real.userspace_addr,
            real.mmap_offset,
        )
    if how == "shrink":
        return p.MemoryRegion(
            real.guest_phys_addr,
            src.between(1, real.memory_size),
            real.userspace_addr,
            real.mmap_offset,
        )
    size = src.pick((1, 4096, 1 << 20, 1 << 40, 1 << 47, 1 << 62, u64(src)))
    size = max(1, size)
    limit = (1 << 64) - size  # start + size must stay below 2**64
    offset = src.between(0, limit - 1) if src.chance(30) else min(src.pick((0, 4096)), limit - 1)
    return p.MemoryRegion(src.between(0, limit - 1), size, src.between(0, limit - 1), offset)


def mem_fd_kind(src: Source) -> str:
    return "memfd" if src.chance(85) else src.pick(MEM_KINDS)


def ring_addresses(src: Source, t: Target, index: int) -> tuple[int, int, int]:
    """(desc, avail, used) front-end virtual addresses: mostly the ring area of `index`."""
    area = t.rings[index % len(t.rings)] if src.chance(90) else src.pick(t.rings)
    desc, avail, used = area.desc, area.avail, area.used
    if src.chance(75):
        return desc, avail, used
    how = src.pick(("misalign", "outside", "region_end", "random", "swap"))
    if how == "misalign":
        return desc + src.pick((1, 2, 8)), avail + src.pick((0, 1)), used + src.pick((0, 2))
    if how == "outside":
        return desc + (1 << 40), avail, used
    if how == "region_end":
        last = t.regions()[-1]
        end = last.userspace_addr + last.memory_size
        return end - 16, end - 8, end - 4
    if how == "swap":
        return used, desc, avail
    return u64(src), u64(src), u64(src)


def ring_size(src: Source) -> int:
    if src.chance(70):
        return src.pick((1, 2, 16, 64, 128, 256))
    return src.pick((0, 3, 100, 512, 1024, 1025, 2048, 0x8000, 0xFFFF, 0x10000, u32(src)))


def features(src: Source, t: Target) -> int:
    offered = t.features | p.VHOST_USER_F_PROTOCOL_FEATURES
    return src.pick(
        (
            offered,
            offered,
            t.features,
            offered & u64(src),
            u64(src),
            offered | (1 << src.between(0, 63)),
        )
    )


def protocol_features(src: Source, t: Target) -> int:
    return src.pick(
        (
            t.protocol_features,
            t.protocol_features,
            0,
            t.protocol_features & u64(src),
            u64(src),
            t.protocol_features | (1 << src.between(0, 63)),
        )
    )


MESSAGE_KINDS: Final = (
    "GET_FEATURES",
    "SET_FEATURES",
    "SET_OWNER",
    "RESET_OWNER",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "GET_MAX_MEM_SLOTS",
    "RESET_DEVICE",
    "SET_MEM_TABLE",
    "SET_MEM_TABLE",
    "ADD_MEM_REG",
    "REM_MEM_REG",
    "SET_VRING_NUM",
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_ADDR",
    "GET_VRING_BASE",
    "GET_VRING_BASE",
    "SET_VRING_KICK",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
    "SET_VRING_ERR",
    "SET_VRING_ENABLE",
    "SET_VRING_ENABLE",
    "GET_CONFIG",
    "SET_CONFIG",
    "GET_INFLIGHT_FD",
    "SET_INFLIGHT_FD",
    "UNKNOWN",
)

#: Requests this codec passes through as Unknown, and codes nobody defines.
UNKNOWN_CODES: Final = (
    0,
    6,
    7,
    14,
    19,
    20,
    21,
    22,
    23,
    26,
    27,
    28,
    29,
    30,
    33,
    35,
    39,
    40,
    41,
    42,
    100,
    255,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
)


def valid_message(src: Source, t: Target) -> tuple[p.Message, tuple[str, ...]]:
    """A request that encodes (so the parser accepts it), with the kinds of its fds.
    Its *values* may still be ones the session must refuse."""
    kind = src.pick(MESSAGE_KINDS)
    need = src.chance(50)
    simple: dict[str, Callable[..., p.Message]] = {
        "GET_FEATURES": p.GetFeatures,
        "SET_OWNER": p.SetOwner,
        "RESET_OWNER": p.ResetOwner,
        "GET_PROTOCOL_FEATURES": p.GetProtocolFeatures,
        "GET_QUEUE_NUM": p.GetQueueNum,
        "GET_MAX_MEM_SLOTS": p.GetMaxMemSlots,
        "RESET_DEVICE": p.ResetDevice,
    }
    if kind in simple:
        return simple[kind](need_reply=need), ()
    if kind == "SET_FEATURES":
        return p.SetFeatures(features(src, t), need), ()
    if kind == "SET_PROTOCOL_FEATURES":
        return p.SetProtocolFeatures(protocol_features(src, t), need), ()
    if kind == "SET_MEM_TABLE":
        every = len(t.regions())
        n = src.pick((every, every, 1, src.between(1, p.MEM_TABLE_MAX_REGIONS)))
        regions = tuple(region(src, t) for _ in range(n))
        kinds = tuple(mem_fd_kind(src) for _ in range(n))
        return p.SetMemTable(regions, tuple(range(n)), need), kinds
    if kind == "ADD_MEM_REG":
        return p.AddMemReg(region(src, t), 0, need), (mem_fd_kind(src),)
    if kind == "REM_MEM_REG":
        with_fd = src.chance(20)
        return (
            p.RemMemReg(region(src, t), 0 if with_fd else None, need),
            (mem_fd_kind(src),) if with_fd else (),
        )
    if kind in ("SET_VRING_NUM", "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_ENABLE"):
        index = queue_index(src, t)
        if kind == "SET_VRING_NUM":
            return p.SetVringNum(index, ring_size(src), need), ()
        if kind == "SET_VRING_BASE":
            base = src.pick((0, 0, 1, 0xFFFF, src.between(0, 0xFFFF), 0x10000, u32(src)))
            return p.SetVringBase(index, base, need), ()
        if kind == "GET_VRING_BASE":
            return p.GetVringBase(index, need), ()
        return p.SetVringEnable(index, src.chance(75), need), ()
    if kind == "SET_VRING_ADDR":
        index = queue_index(src, t)
        desc, avail, used = ring_addresses(src, t, index)
        flags = 0 if src.chance(90) else src.pick((1, u32(src)))
        log = 0 if src.chance(90) else u64(src)
        return p.SetVringAddr(index, flags, desc, used, avail, log, need), ()
    if kind in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
        index = queue_index(src, t, vring_fd=True)
        makers: dict[str, Callable[..., p.Message]] = {
            "SET_VRING_KICK": p.SetVringKick,
            "SET_VRING_CALL": p.SetVringCall,
            "SET_VRING_ERR": p.SetVringErr,
        }
        make = makers[kind]
        if src.chance(10):
            return make(index, None, need), ()
        fd_kind = src.pick(KICK_KINDS) if kind == "SET_VRING_KICK" else src.pick(FD_KINDS)
        return make(index, 0, need), (fd_kind,)
    if kind in ("GET_CONFIG", "SET_CONFIG"):
        offset = src.pick((0, 0, 8, 20, 34, 59, 60, 255, 256, u32(src)))
        size = src.pick((0, 1, 4, 8, 60, 60, src.between(0, p.MAX_CONFIG_SIZE), p.MAX_CONFIG_SIZE))
        flags = src.pick((0, 0, 1, u32(src)))
        if kind == "GET_CONFIG":
            return p.GetConfig(offset, size, flags, bytes(size), need), ()
        return p.SetConfig(offset, size, flags, src.bytes(size), need), ()
    if kind in ("GET_INFLIGHT_FD", "SET_INFLIGHT_FD"):
        num_queues = src.pick((1, t.num_queues, t.num_queues, 0, t.num_queues + 1, 0xFFFF))
        queue_size = ring_size(src) & 0xFFFF
        if kind == "GET_INFLIGHT_FD":
            return p.GetInflightFd(num_queues, queue_size, need), ()
        fits = inflight_size(num_queues, queue_size)
        size = src.pick((fits, fits, fits + 4096, max(0, fits - 1), 0, 4096, u64(src)))
        offset = src.pick((0, 0, 4096, 1 << 20, 1, u64(src)))
        kind_ = mem_fd_kind(src)
        return p.SetInflightFd(size, offset, num_queues, queue_size, 0, need), (kind_,)
    assert kind == "UNKNOWN"
    code = src.pick(UNKNOWN_CODES) if src.chance(80) else u32(src)
    payload = src.bytes(src.pick((0, 8, 16, src.between(0, 64))))
    nfds = src.pick((0, 0, 1, src.between(0, p.MAX_FDS_PER_MESSAGE)))
    kinds = tuple(src.pick(FD_KINDS) for _ in range(nfds))
    return p.Unknown(code, 0, payload, tuple(range(nfds)), need), kinds


def inflight_size(num_queues: int, queue_size: int) -> int:
    """Bytes an inflight region needs (vhost-user.rst: QueueRegionSplit, 64-byte aligned
    per queue), for shapes the back end accepts; 0 for the others."""
    if not 1 <= queue_size <= 1024 or queue_size & (queue_size - 1):
        return 0
    per_queue = 8 + 2 + 2 + 2 + 2 + queue_size * 16  # features, version, desc_num,
    return -(-per_queue // 64) * 64 * num_queues  # last_batch_head, used_idx, descs


def valid_frame(src: Source, t: Target) -> Frame:
    msg, kinds = valid_message(src, t)
    return frame_of(msg, kinds)


def setup_frames(
    t: Target, queues: Sequence[int] = (0,), *, need_reply: bool = True, num: int = RING_SIZE
) -> list[Frame]:
    """The handshake QEMU does, memory table and rings on the ring areas, started."""
    msgs: list[tuple[p.Message, tuple[str, ...]]] = [
        (p.GetFeatures(), ()),
        (p.GetProtocolFeatures(), ()),
        (p.SetProtocolFeatures(t.protocol_features), ()),
        (p.SetOwner(need_reply), ()),
        (p.SetFeatures(t.features | p.VHOST_USER_F_PROTOCOL_FEATURES, need_reply), ()),
        (p.GetQueueNum(), ()),
        (
            p.SetMemTable(tuple(t.regions()), tuple(range(len(t.regions()))), need_reply),
            ("memfd",) * len(t.regions()),
        ),
    ]
    for i in queues:
        area = t.rings[i]
        msgs += [
            (p.SetVringNum(i, num, need_reply), ()),
            (p.SetVringBase(i, 0, need_reply), ()),
            (p.SetVringAddr(i, 0, area.desc, area.used, area.avail, 0, need_reply), ()),
            (p.SetVringKick(i, 0, need_reply), ("eventfd",)),
            (p.SetVringCall(i, 0, need_reply), ("eventfd",)),
            (p.SetVringEnable(i, True, need_reply), ()),
        ]
    return [frame_of(m, k, "setup") for m, k in msgs]


# --- mutations ------------------------------------------------------------------------------

MUTATIONS: Final = (
    "bitflip",
    "bitflip",
    "truncate",
    "extend",
    "size",
    "request",
    "request",
    "reply_flag",
    "version",
    "fds",
    "fds",
    "splice",
    "reply_as_request",
    "garbage",
    "need_reply",
    "reserved_flags",
    "header_only",
)


def _header(data: bytes) -> tuple[int, int, int]:
    padded = data[:12].ljust(12, b"\0")
    return HEADER.unpack(padded)


def _with_header(data: bytes, request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request & 0xFFFF_FFFF, flags & 0xFFFF_FFFF, size & 0xFFFF_FFFF) + data[12:]


def random_fd_kinds(src: Source) -> tuple[str, ...]:
    n = src.pick(
        (
            0,
            1,
            1,
            2,
            src.between(0, p.MAX_FDS_PER_MESSAGE),
            src.between(p.MAX_FDS_PER_MESSAGE, p.MAX_FDS_PER_MESSAGE + 2),
        )
    )
    return tuple(src.pick(FD_KINDS) for _ in range(n))


def random_reply_bytes(src: Source) -> bytes:
    """A reply, as the back end would send it (REPLY flag set)."""
    code = src.pick(list(p.Request))
    size = src.between(0, 16)
    candidates: list[p.Reply] = [
        p.U64Reply(code, u64(src)),
        p.VringStateReply(code, u32(src), u32(src)),
        p.ConfigReply(code, u32(src), size, u32(src), src.bytes(size)),
    ]
    for reply in candidates:  # the one that fits this request code
        try:
            return p.encode_reply(reply)
        except ValueError:
            continue
    return HEADER.pack(code, p.VERSION | p.FLAG_REPLY, 8) + src.bytes(8)


def mutate(src: Source, base: Frame, t: Target) -> Frame:
    how = src.pick(MUTATIONS)
    data, kinds = base.data, base.fds
    request, flags, size = _header(data)
    if how == "bitflip":
        buf = bytearray(data or b"\0")
        for _ in range(src.between(1, 4)):
            bit = src.between(0, len(buf) * 8 - 1)
            buf[bit // 8] ^= 1 << (bit % 8)
        data = bytes(buf)
    elif how == "truncate":
        data = data[: src.between(0, max(0, len(data) - 1))]
    elif how == "extend":
        data += src.bytes(src.pick((1, 4, 12, src.between(1, 64))))
    elif how == "size":
        new = src.pick(
            (
                0,
                max(0, size - 1),
                size + 1,
                size + 8,
                p.MAX_PAYLOAD_SIZE,
                p.MAX_PAYLOAD_SIZE + 1,
                0xFFFF_FFFF,
                u32(src),
            )
        )
        data = _with_header(data, request, flags, new)
    elif how == "request":
        new = src.pick(UNKNOWN_CODES) if src.chance(50) else src.pick(list(p.Request))
        data = _with_header(data, new, flags, size)
    elif how == "reply_flag":
        data = _with_header(data, request, flags | p.FLAG_REPLY, size)
    elif how == "version":
        data = _with_header(data, request, (flags & ~3) | src.pick((0, 2, 3)), size)
    elif how == "need_reply":
        data = _with_header(data, request, flags ^ p.FLAG_NEED_REPLY, size)
    elif how == "reserved_flags":
        data = _with_header(data, request, flags | (u32(src) & ~0xF), size)
    elif how == "fds":
        kinds = random_fd_kinds(src)
    elif how == "splice":
        other = valid_frame(src, t)
        data = data[:12] + other.data[12:]
        kinds = other.fds if src.chance(50) else kinds
    elif how == "reply_as_request":
        data = random_reply_bytes(src)
    elif how == "garbage":
        data = src.bytes(src.between(1, 100))
        kinds = random_fd_kinds(src) if src.chance(30) else ()
    elif how == "header_only":
        data = data[:12]
    return Frame(data, kinds, how)


def any_frame(src: Source, t: Target, mutated_percent: int = 40) -> Frame:
    """A valid frame, or (mutated_percent of the time) a mutated one."""
    frame = valid_frame(src, t)
    if src.chance(mutated_percent):
        frame = mutate(src, frame, t)
    return frame


def error_kind(exc: BaseException) -> str:
    """An error text with its values taken out, to count errors by kind."""
    text = str(exc)
    text = re.sub(r"\b[A-Z_]+\(\d+\)|request \d+", "REQ", text)
    text = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", text)
    return text[:70]
