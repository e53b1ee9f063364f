"""A pure-Python reference of the split virtqueue walk, device side: the rules, in order.

Job: say, one check at a time, what makes a chain acceptable, what the device then
writes back (used ring, avail_event) and when it signals, and be the oracle that
``tests/unit/test_ring_differential.py`` runs against the C walker. It mirrors
``c_ext/ring.c`` (``vu_vq_avail_count``, ``pop_chain``, ``walk_chain``, ``add_buffer``,
``vu_vq_process``, ``vu_vq_should_signal``, ``vu_vq_enable_notification``) and
``vu_gpa_to_iov`` in ``c_ext/memory.c``, and reports the same negative codes as
``c_ext/vu.h``. Boundary: it reads guest memory only through the callables it is given,
writes nothing, keeps no state (the caller carries last_avail_idx and the last signalled
used index), and nothing on the data path imports it.

The rules (section numbers of virtio 1.2, titles in brackets so they can be grepped;
"ours" marks a bound of this back end rather than a spec MUST):

R1  avail->idx is at most the queue size ahead of last_avail_idx -- 2.7.13 [Supplying Buffers
    to The Device: the ring cannot wrap] -- else AVAIL_IDX, and the whole queue is broken.
R2  a head read from avail->ring[last_avail_idx % num] is < num -- 2.7.6 [The Virtqueue
    Available Ring] -- else HEAD, and the whole queue is broken, as with R1 (the ring is
    garbage, and there is no valid id to return the slot with; Linux vhost and
    libvhost-user stop the queue too). The slot still counts as taken: last_avail_idx
    moves past it. A chain refused by any later rule only loses its own slot (U2).
R3  at most n descriptors are read from a table of n entries; needing one more means the
    chain loops -- 2.7.5.2 [Descriptor Table, driver: loops are forbidden] -- else LOOP.
R4  INDIRECT only if VIRTIO_F_INDIRECT_DESC was negotiated -- 2.7.5.3.1 -- INDIRECT_FEATURE.
R5  no INDIRECT inside an indirect table -- 2.7.5.3.1 [Indirect Descriptors] -- INDIRECT_NESTED.
R6  INDIRECT and NEXT are never set together -- 2.7.5.3.1 -- INDIRECT_NEXT.
R7  an indirect table is a whole number of 16-byte descriptors, at least one -- 2.7.5.3
    [Indirect Descriptors: desc[len / 16]] -- INDIRECT_LEN.
R8  an indirect table has at most num entries -- ours, stricter than 2.7.5.3.1, which bounds
    the chain and not the table -- CHAIN_TOO_LONG.
R9  an indirect table lies inside one guest memory region -- ours: it is read through one
    mapping -- INDIRECT_ADDR.
R10 the WRITE flag of the descriptor that points at a table is ignored -- 2.7.5.3.2.
R11 a chain holds at most num buffer descriptors, direct and indirect together (the
    descriptor pointing at the table is not counted) -- 2.7.5.3.1 -- CHAIN_TOO_LONG.
R12 device-readable buffers come before device-writable ones -- 2.7.4.2 [Message Framing,
    driver] -- DIRECTION. Zero-length buffers are not exempt.
R13 a zero-length buffer carries nothing: it gets no address check and no iovec -- ours.
R14 every byte of a buffer is guest memory and the range does not wrap past 2**64; it may
    run on into a region adjacent in guest-physical space -- 2.7.5 [addr is guest-physical]
    -- ADDR.
R15 a chain needs at most MAX_CHAIN_IOV iovecs, one per region a buffer touches -- 2.7.4.1
    [Message Framing, device: MAY limit descriptors per chain] -- TOO_MANY_IOV.
R16 next indexes the table it is in: < num in the descriptor table, < len/16 in an
    indirect one -- 2.7.5, 2.7.5.3 -- NEXT.
R17 the chain ends at the first buffer descriptor without NEXT; after an indirect table the
    walk never returns to the descriptor table (R6) -- 2.7.5.3.

Order of checks. A descriptor that breaks several rules reports only the first one, so the
order is part of the contract and follows ring.c exactly: R3 before a descriptor is read;
for an indirect descriptor R4, R5, R6, R7, R8, R9; for a buffer R11, R12, then R13/R14/R15
(inside R14/R15: a wrapping range is ADDR at once; otherwise the pieces before the first
byte outside guest memory are counted, more than the iovecs left is TOO_MANY_IOV, and only
then an unmapped byte is ADDR), and R16 last, after the buffer was taken. Consequences
worth knowing: a loop in an indirect table behind a direct prefix can end in
CHAIN_TOO_LONG (R11) before R3 fires; a revisited descriptor is checked again each time,
so DIRECTION, ADDR or TOO_MANY_IOV can win over LOOP.

After the walk (one pass of ``vu_vq_process``: every chain available at its start):

U1  an accepted chain goes to the used ring as (head, bytes the device wrote) -- 2.7.8
    [The Virtqueue Used Ring].
U2  a chain refused by R3..R17 goes back as (head, 0), so the driver gets its buffers
    back; the queue goes on -- ours.
U3  a bad head (R2) ends the pass: what was done before it is still published, nothing
    after it is taken -- ours. A bad avail index (R1) ends it before anything is taken.
U4  used->idx is published once per pass that took at least one slot, after its entries
    -- 2.7.13 [Receiving Used Buffers From The Device]; then the device decides E1/E2.
E1  without VIRTIO_F_EVENT_IDX: signal unless avail->flags has VRING_AVAIL_F_NO_INTERRUPT
    -- 2.7.7 [Used Buffer Notification Suppression].
E2  with it: signal when used->idx moved from old to new across the driver's used_event,
    i.e. used_event is in [old, new) modulo 2**16 (vring_need_event) -- 2.7.7; old is the
    used index at the previous signal decision, and the first decision after set-up
    always signals (ours, as Linux vhost's signalled_used_valid). Every decision moves
    old to new, whether it signalled or not.
E3  with VIRTIO_F_EVENT_IDX, asking for a kick writes avail_event (after used->ring[num])
    -- 2.7.10 [Available Buffer Notification Suppression]: ``vu_vq_enable_notification``
    writes last_avail_idx and then counts what is available again (R1 applies);
    ``vu_vq_request_kick_at`` writes the index it is given. Without the feature
    avail_event is never written. used->flags is never written (ours: event idx or
    nothing).

``detail`` in a :class:`RingError` is the offending value: the avail index (AVAIL_IDX), the
head (HEAD), the bad next index (NEXT), the descriptor index about to be read again
(LOOP), the buffer or table address (ADDR, TOO_MANY_IOV, INDIRECT_ADDR), the table length
in bytes (INDIRECT_LEN, and CHAIN_TOO_LONG by R8), the index of the descriptor at fault
in its table (DIRECTION, INDIRECT_FEATURE/NESTED/NEXT), and the buffer count that broke
the limit, num + 1 (CHAIN_TOO_LONG by R11). ring.c records the same, and the differential
test compares every one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from vhost._native import lib

__all__ = [
    "DESC_SIZE",
    "MAX_CHAIN_IOV",
    "MAX_QUEUE_SIZE",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "Chain",
    "Descriptor",
    "ErrorCode",
    "ReadMem",
    "RingError",
    "RingView",
    "Split",
    "avail_count",
    "breaks_queue",
    "need_event",
    "pop",
    "region_splitter",
    "returned_entry",
    "should_signal",
    "walk",
]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
DESC_SIZE = 16
MAX_QUEUE_SIZE: int = lib.VU_MAX_QUEUE_SIZE
MAX_CHAIN_IOV: int = lib.VU_MAX_CHAIN_IOV
_U16 = 0xFFFF
_ADDRESS_SPACE = 1 << 64
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next (virtio 1.x is little endian)

#: read_mem(gpa, length): the bytes of [gpa, gpa+length) if they lie inside one region, else None
ReadMem: TypeAlias = Callable[[int, int], bytes | None]
#: split(gpa, length) for a range that does not wrap: the (gpa, length) pieces, one per region,
#: of its longest mapped prefix, and whether that prefix is the whole range
Split: TypeAlias = Callable[[int, int], tuple[list[tuple[int, int]], bool]]


class ErrorCode(IntEnum):
    """The walker's error codes: the rows of ``VU_ERRORS`` in vu.h, by the same names (less
    the ``VU_ERR_`` prefix), their numbers read from the compiled module."""

    AVAIL_IDX = lib.VU_ERR_AVAIL_IDX
    HEAD = lib.VU_ERR_HEAD
    NEXT = lib.VU_ERR_NEXT
    ADDR = lib.VU_ERR_ADDR
    LOOP = lib.VU_ERR_LOOP
    CHAIN_TOO_LONG = lib.VU_ERR_CHAIN_TOO_LONG
    INDIRECT_NESTED = lib.VU_ERR_INDIRECT_NESTED
    INDIRECT_LEN = lib.VU_ERR_INDIRECT_LEN
    INDIRECT_ADDR = lib.VU_ERR_INDIRECT_ADDR
    DIRECTION = lib.VU_ERR_DIRECTION
    TOO_MANY_IOV = lib.VU_ERR_TOO_MANY_IOV
    INDIRECT_NEXT = lib.VU_ERR_INDIRECT_NEXT
    INDIRECT_FEATURE = lib.VU_ERR_INDIRECT_FEATURE


@dataclass(frozen=True)
class RingError:
    """Why a chain (or the avail index) was refused."""

    code: ErrorCode
    head: int
    detail: int

    def __str__(self) -> str:
        return f"{self.code.name} (head {self.head}, detail {self.detail:#x})"


@dataclass(frozen=True)
class Chain:
    """A chain that passed every rule: its buffers as the driver wrote them (not yet split
    where a buffer runs from one region into the next), zero-length ones left out."""

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]
    iov_count: int  # iovecs the C walker needs for it (pieces after region splitting)

    @property
    def out_bytes(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def in_bytes(self) -> int:
        return sum(n for _, n in self.writable)


@dataclass(frozen=True)
class RingView:
    """Where a split ring lives and what was negotiated for it: what a walk needs to know.

    ``vu_vq_setup`` has already refused bad sizes and ring addresses; so does this class
    for the size, and :func:`walk` treats an unreadable descriptor table as a set-up bug.
    """

    num: int  # queue size
    desc_gpa: int  # descriptor table
    avail_gpa: int  # available ring
    indirect: bool  # VIRTIO_F_INDIRECT_DESC negotiated

    def __post_init__(self) -> None:
        # virtio 1.2 2.7: "Queue Size value is always a power of 2"; the maximum is ours.
        if not 1 <= self.num <= MAX_QUEUE_SIZE or self.num & (self.num - 1):
            raise ValueError(f"queue size {self.num} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")


@dataclass(frozen=True)
class Descriptor:
    addr: int
    len: int
    flags: int
    next: int

    @classmethod
    def from_table(cls, table: bytes, index: int) -> Descriptor:
        addr, length, flags, nxt = _DESC.unpack_from(table, index * DESC_SIZE)
        return cls(addr, length, flags, nxt)

    @property
    def indirect(self) -> bool:
        return bool(self.flags & VRING_DESC_F_INDIRECT)

    @property
    def writable(self) -> bool:
        return bool(self.flags & VRING_DESC_F_WRITE)

    @property
    def has_next(self) -> bool:
        return bool(self.flags & VRING_DESC_F_NEXT)


def region_splitter(regions: Sequence[tuple[int, int]]) -> Split:
    """A :data:`Split` over regions given as (gpa, size), as vu_gpa_to_iov walks them."""

    def region_at(gpa: int) -> tuple[int, int] | None:
        for start, size in regions:
            if start <= gpa < start + size:
                return start, size
        return None

    def split(gpa: int, length: int) -> tuple[list[tuple[int, int]], bool]:
        pieces: list[tuple[int, int]] = []
        while length > 0:
            region = region_at(gpa)
            if region is None:
                return pieces, False
            start, size = region
            piece = min(start + size - gpa, length)
            pieces.append((gpa, piece))
            gpa += piece
            length -= piece
        return pieces, True

    return split


def _split_one_region(read_mem: ReadMem) -> Split:
    """The default Split: a buffer must lie inside one region. Right for memory with no
    two regions adjacent in guest-physical space; it reads the buffer to find out, and
    at the very end of the iovec budget it cannot tell TOO_MANY_IOV from ADDR (R15)."""

    def split(gpa: int, length: int) -> tuple[list[tuple[int, int]], bool]:
        if read_mem(gpa, length) is None:
            return [], False
        return [(gpa, length)], True

    return split


def avail_count(read_mem: ReadMem, ring: RingView, last_avail_idx: int) -> int | RingError:
    """Chains the driver made available and the device has not taken yet (R1)."""
    raw = read_mem(ring.avail_gpa + 2, 2)
    if raw is None:
        raise ValueError(f"avail ring at {ring.avail_gpa:#x} is not in guest memory")
    idx = int.from_bytes(raw, "little")
    pending = (idx - last_avail_idx) & _U16
    if pending > ring.num:
        return RingError(ErrorCode.AVAIL_IDX, 0, idx)
    return pending


def pop(
    read_mem: ReadMem, ring: RingView, last_avail_idx: int, *, split: Split | None = None
) -> Chain | RingError:
    """Take the chain in avail slot ``last_avail_idx % num`` (the caller checked with
    :func:`avail_count` that there is one). Whatever the result, the next slot to take is
    ``last_avail_idx + 1``: a bad chain still consumes its slot, so it cannot wedge the
    queue; but after HEAD (R2) there is no next slot to take, the queue is broken."""
    slot = last_avail_idx % ring.num
    raw = read_mem(ring.avail_gpa + 4 + 2 * slot, 2)
    if raw is None:
        raise ValueError(f"avail ring at {ring.avail_gpa:#x} is not in guest memory")
    head = int.from_bytes(raw, "little")
    if head >= ring.num:  # R2: and the queue is broken
        return RingError(ErrorCode.HEAD, head, head)
    return walk(read_mem, ring, head, split=split)


def walk(
    read_mem: ReadMem, ring: RingView, head: int, *, split: Split | None = None
) -> Chain | RingError:
    """Walk and check the chain starting at descriptor ``head`` (already < num).

    ``split`` tells how a buffer lies across regions (see :func:`region_splitter`); without
    it every buffer has to fit in one region, as read_mem sees them.
    """
    pieces_of = split if split is not None else _split_one_region(read_mem)
    table = read_mem(ring.desc_gpa, DESC_SIZE * ring.num)
    if table is None:
        raise ValueError(f"descriptor table at {ring.desc_gpa:#x} is not in guest memory")
    entries = ring.num  # of the table being walked
    reads_left = ring.num  # R3: at most `entries` reads from one table
    in_indirect = False
    seen_writable = False
    buffers = 0
    iovs = 0
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    index = head

    def fail(code: ErrorCode, detail: int) -> RingError:
        return RingError(code, head, detail)

    while True:
        if reads_left == 0:
            return fail(ErrorCode.LOOP, index)  # R3
        reads_left -= 1
        d = Descriptor.from_table(table, index)

        if d.indirect:
            if not ring.indirect:
                return fail(ErrorCode.INDIRECT_FEATURE, index)  # R4
            if in_indirect:
                return fail(ErrorCode.INDIRECT_NESTED, index)  # R5
            if d.has_next:
                return fail(ErrorCode.INDIRECT_NEXT, index)  # R6
            if d.len == 0 or d.len % DESC_SIZE:
                return fail(ErrorCode.INDIRECT_LEN, d.len)  # R7
            if d.len // DESC_SIZE > ring.num:
                return fail(ErrorCode.CHAIN_TOO_LONG, d.len)  # R8
            indirect_table = read_mem(d.addr, d.len)
            if indirect_table is None:
                return fail(ErrorCode.INDIRECT_ADDR, d.addr)  # R9
            # R10: d.writable is not looked at. R17: no way back to the descriptor table.
            table, entries, reads_left = indirect_table, d.len // DESC_SIZE, d.len // DESC_SIZE
            in_indirect = True
            index = 0
            continue

        buffers += 1
        if buffers > ring.num:
            return fail(ErrorCode.CHAIN_TOO_LONG, buffers)  # R11
        if d.writable:
            seen_writable = True
        elif seen_writable:
            return fail(ErrorCode.DIRECTION, index)  # R12
        if d.len:  # R13
            if d.addr + d.len > _ADDRESS_SPACE:
                return fail(ErrorCode.ADDR, d.addr)  # R14: wraps
            pieces, complete = pieces_of(d.addr, d.len)
            if iovs + len(pieces) > MAX_CHAIN_IOV:
                return fail(ErrorCode.TOO_MANY_IOV, d.addr)  # R15
            if not complete:
                return fail(ErrorCode.ADDR, d.addr)  # R14
            iovs += len(pieces)
            (writable if d.writable else readable).append((d.addr, d.len))
        if not d.has_next:
            return Chain(head, tuple(readable), tuple(writable), iovs)  # R17
        index = d.next
        if index >= entries:
            return fail(ErrorCode.NEXT, index)  # R16


def breaks_queue(result: Chain | RingError | int) -> bool:
    """Whether a result of :func:`avail_count` or :func:`pop` leaves the queue broken (R1, R2)."""
    return isinstance(result, RingError) and result.code in (ErrorCode.AVAIL_IDX, ErrorCode.HEAD)


def returned_entry(result: Chain | RingError, written: int) -> tuple[int, int] | None:
    """The used ring entry (id, len) for a popped chain the device wrote ``written`` bytes
    into (U1, U2), or None for a bad head, which cannot be returned (U3)."""
    if isinstance(result, Chain):
        return result.head, written
    if result.code == ErrorCode.HEAD:
        return None
    return result.head, 0


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """E2: did the index move from ``old_idx`` to ``new_idx`` across ``event_idx``? That is,
    is event_idx one of old, old+1, ..., new-1 (mod 2**16)? Written as that interval test,
    not as the spec's vring_need_event expression, so the two can check each other."""
    return (event_idx - old_idx) & _U16 < (new_idx - old_idx) & _U16


def should_signal(
    *,
    event_idx: bool,
    avail_flags: int,
    used_event: int,
    new_used_idx: int,
    signalled_used: int | None,
) -> bool:
    """E1/E2: whether to signal the driver after publishing used->idx = ``new_used_idx``.
    ``signalled_used`` is the used index at the previous decision (None: none since set-up);
    the caller sets it to ``new_used_idx`` afterwards, whatever this returns."""
    if not event_idx:
        return not avail_flags & VRING_AVAIL_F_NO_INTERRUPT
    if signalled_used is None:
        return True
    return need_event(used_event, new_used_idx, signalled_used)
