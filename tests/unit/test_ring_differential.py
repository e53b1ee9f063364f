"""Differential test: the C walker (c_ext/ring.c, through vu_vq_pop) against the pure-Python
reference (vhost/ring_reference.py), on descriptor tables hypothesis builds in guest RAM.

Both must take the same decision for every chain: accept or refuse, the same error code,
head and detail, and for an accepted chain the same readable and writable buffers (the
C iovecs mapped back to guest addresses, the reference's buffers split at region ends)
and byte totals. Guest memory here: two GuestRam regions with a gap between them, plus a
small third region that starts exactly where region 0 ends, so buffers can run across a
region boundary (C splits them) and indirect tables can straddle one (refused).

``VHOST_FUZZ_EXAMPLES`` raises the example count (default 300, a few seconds).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.frontend import GuestRam, RamRegion
from vhost._native import ffi, lib
from vhost.memory import GuestMemory, Region
from vhost.ring_reference import (
    DESC_SIZE,
    MAX_CHAIN_IOV,
    MAX_QUEUE_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Chain,
    ErrorCode,
    RingError,
    RingView,
    avail_count,
    pop,
    region_splitter,
    walk,
)

EXAMPLES = int(os.environ.get("VHOST_FUZZ_EXAMPLES", "300"))
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
U64 = 1 << 64
U32 = 1 << 32
T = TypeVar("T")

# C records a meaningful detail for these; for INDIRECT_FEATURE/NESTED/NEXT and for a
# chain too long by count (R11) it leaves whatever an earlier step wrote (0 or a table
# length), so there only the code and head are compared.
DETAIL_COMPARED = {
    ErrorCode.AVAIL_IDX, ErrorCode.HEAD, ErrorCode.NEXT, ErrorCode.ADDR, ErrorCode.LOOP,
    ErrorCode.INDIRECT_LEN, ErrorCode.INDIRECT_ADDR, ErrorCode.DIRECTION,
    ErrorCode.TOO_MANY_IOV,
}

# --- the guest memory every example shares -------------------------------------------------

KiB = 1 << 10
PER_REGION = 256 * KiB
R0_GPA, R1_GPA = 0, 1 << 30  # GuestRam's layout for two regions
R2_GPA, R2_SIZE = PER_REGION, 0x1000  # gpa-adjacent to region 0; aliases region 1's first page
R2_UVA, R2_OFFSET = GuestRam.UVA_BASE + 0x100_0000, PER_REGION

DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000  # rings, in region 0
TABLE_SLOTS = (0x8000, 0x9000, 0xA000)  # where indirect tables usually go


@dataclass(frozen=True)
class Span:
    gpa: int
    size: int
    offset: int  # in the memfd

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def holds(self, gpa: int, n: int) -> bool:
        return self.gpa <= gpa and gpa + n <= self.end


R0 = Span(R0_GPA, PER_REGION, 0)
R1 = Span(R1_GPA, PER_REGION, PER_REGION)
R2 = Span(R2_GPA, R2_SIZE, R2_OFFSET)
SPANS = (R0, R1, R2)


class World:
    """The memfd, its GuestMemory and one C queue, reused by every example."""

    def __init__(self) -> None:
        self.ram = GuestRam(size=2 * PER_REGION, regions=2)
        assert [(r.gpa, r.size, r.mmap_offset) for r in self.ram.layout] == [
            (R0.gpa, R0.size, R0.offset), (R1.gpa, R1.size, R1.offset)]
        self.mem = GuestMemory()
        for r in self.ram.layout:
            self.mem.add(_as_region(r), self.ram.fd)
        self.mem.add(Region(R2_GPA, R2_SIZE, R2_UVA, R2_OFFSET), self.ram.fd)
        self.split = region_splitter([(s.gpa, s.size) for s in SPANS])
        self.hosts = [(self.mem.translate_gpa(s.gpa, s.size), s.gpa, s.size) for s in SPANS]
        self.vq = ffi.new("struct vu_vq *")
        self.vq.kick_fd = self.vq.call_fd = self.vq.err_fd = self.vq.stop_fd = -1
        self.chain = ffi.new("struct vu_chain *")
        self._zeros = bytes(self.ram.size)

    def close(self) -> None:
        self.mem.close()
        self.ram.close()

    # memory as the reference sees it: straight from the memfd, not through C
    def read_mem(self, gpa: int, n: int) -> bytes | None:
        for s in SPANS:
            if s.holds(gpa, n):
                return os.pread(self.ram.fd, n, s.offset + gpa - s.gpa)
        return None

    def write(self, gpa: int, data: bytes) -> bool:
        for s in SPANS:
            if s.holds(gpa, len(data)):
                os.pwrite(self.ram.fd, data, s.offset + gpa - s.gpa)
                return True
        return False

    def wipe(self) -> None:
        os.pwrite(self.ram.fd, self._zeros, 0)

    def gpa_of(self, host: int) -> int:
        for base, gpa, size in self.hosts:
            if base <= host < base + size:
                return gpa + host - base
        raise AssertionError(f"iovec base {host:#x} is not in guest memory")

    def c_iovs(self, first: int, count: int) -> list[tuple[int, int]]:
        iov = self.chain.iov
        return [(self.gpa_of(int(ffi.cast("uintptr_t", iov[i].iov_base))), int(iov[i].iov_len))
                for i in range(first, first + count)]

    def pieces(self, buffers: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for gpa, n in buffers:
            got, complete = self.split(gpa, n)
            assert complete
            out += got
        return out


def _as_region(r: RamRegion) -> Region:
    return Region(r.gpa, r.size, r.uva, r.mmap_offset)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()


# --- what hypothesis builds -----------------------------------------------------------------

Desc = tuple[int, int, int, int]  # addr, len, flags, next


@dataclass(frozen=True)
class Scenario:
    num: int
    indirect: bool  # VIRTIO_F_INDIRECT_DESC
    base: int  # last_avail_idx at set-up
    avail_ahead: int  # avail->idx - base
    heads: tuple[int, ...]  # avail ring entries from slot base % num on
    descs: tuple[Desc, ...]  # the descriptor table
    tables: tuple[tuple[int, tuple[Desc, ...]], ...]  # (gpa, entries) of indirect tables


def weighted(*options: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """one_of with weights (one_of itself draws each distinct branch about equally often)."""
    return _pick(tuple(s for w, s in options for _ in range(w)))


@st.composite
def _pick(draw: st.DrawFn, slots: tuple[st.SearchStrategy[T], ...]) -> T:
    return draw(draw(st.sampled_from(slots)))


def chance(percent: int) -> st.SearchStrategy[bool]:
    return st.integers(0, 99).map(lambda v: v < percent)


def near(points: Sequence[int], spread: int = 64) -> st.SearchStrategy[int]:
    return st.tuples(st.sampled_from(points), st.integers(-spread, spread)).map(
        lambda pd: min(max(pd[0] + pd[1], 0), U64 - 1))


BUFFER_ADDR = st.one_of(
    st.integers(R0.gpa, R0.end - 1),
    st.integers(R1.gpa, R1.end - 1),
    st.integers(R2.gpa, R2.end - 1),
    near([R0.end, R2.end, R1.gpa, R1.end]),  # region edges (R0.end is R2's start)
    st.integers(R2.end, R1.gpa - 1),  # the gap
    st.integers(U64 - U32 * 2, U64 - 1),  # where addr + len wraps
    st.integers(0, U64 - 1),
)
BUFFER_LEN = st.one_of(
    st.just(0),
    st.integers(1, 64),
    st.integers(1, 0x2000),
    st.integers(U32 - 64, U32 - 1),
    st.integers(0, U32 - 1),
)
GOOD_ADDR = st.one_of(st.integers(0x10000, R0.end - 0x100), st.integers(R1.gpa, R1.end - 0x100))
GOOD_LEN = st.integers(0, 0x100)


@functools.cache
def next_index(entries: int) -> st.SearchStrategy[int]:
    inside = st.integers(0, entries - 1)
    return weighted((6, inside), (1, st.integers(entries, entries + 2)),
                    (1, st.integers(0, 0xFFFF)))


Tables = tuple[tuple[int, tuple[Desc, ...]], ...]


@functools.lru_cache(maxsize=64)  # keyed by the tables of one example
def indirect_target(num: int, tables: Tables) -> st.SearchStrategy[tuple[int, int]]:
    odd_len = st.one_of(
        st.sampled_from([0, 8, 17, DESC_SIZE * (num + 1), U32 - DESC_SIZE]),
        st.integers(1, num + 2).map(lambda n: n * DESC_SIZE),
        st.integers(0, U32 - 1),
    )
    anywhere = st.tuples(BUFFER_ADDR, odd_len)
    if not tables:
        return anywhere
    return weighted((3, _to_a_table(num, tables, odd_len)), (1, anywhere))


@st.composite
def _to_a_table(
    draw: st.DrawFn, num: int, tables: Tables, odd_len: st.SearchStrategy[int]
) -> tuple[int, int]:
    gpa, entries = draw(st.sampled_from(tables))
    length = draw(weighted(
        (12, st.just(DESC_SIZE * len(entries))),
        (2, st.sampled_from([DESC_SIZE * num, DESC_SIZE * (num + 1)])),  # at the limit
        (3, odd_len),
    ))
    if draw(chance(10)):
        gpa += draw(st.integers(-DESC_SIZE, DESC_SIZE))
    return gpa, length


# Flags of a wild descriptor, weighted: mostly plain buffers with or without NEXT, some
# INDIRECT (with and without NEXT or WRITE), now and then bits nobody defined.
_FLAGS = ([NEXT] * 5 + [NEXT | WRITE] * 5 + [0] * 2 + [WRITE] * 2
          + [INDIRECT, INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT])
FLAGS = weighted((19, st.sampled_from(_FLAGS)), (1, st.integers(0, 0xFFFF)))
BUFFER = weighted((3, st.tuples(GOOD_ADDR, GOOD_LEN)), (1, st.tuples(BUFFER_ADDR, BUFFER_LEN)))


@st.composite
def wild_descriptor(
    draw: st.DrawFn, entries: int, num: int, tables: Tables
) -> Desc:
    flags = draw(FLAGS)
    target = indirect_target(num, tables) if flags & INDIRECT else BUFFER
    addr, length = draw(target)
    return addr, length, flags, draw(next_index(entries))


SHAPES = ("wild", "chain", "chain+table", "tables")


@st.composite
def descriptor_table(
    draw: st.DrawFn,
    shape: str,
    entries: int,
    num: int,
    tables: Tables,
) -> tuple[Desc, ...]:
    """``entries`` descriptors shaped as ``shape`` (one of SHAPES), then a few made wild:
    wild -- every field random; chain -- a well-formed chain 0 -> 1 -> ... -> entries-1;
    chain+table -- the same ending in an indirect descriptor; tables -- every descriptor
    an indirect one (the usual Linux layout)."""
    wild = wild_descriptor(entries, num, tables)
    if shape == "wild":
        return tuple(draw(st.lists(wild, min_size=entries, max_size=entries)))
    if shape == "tables" and tables:
        descs = [(*draw(indirect_target(num, tables)), INDIRECT | draw(st.sampled_from([0, WRITE])),
                  0) for _ in range(entries)]
    else:
        first_writable = draw(weighted((2, st.just(entries)), (1, st.just(0)),  # all R / all W
                                        (2, st.integers(0, entries))))
        descs = []
        for i in range(entries):
            last = i == entries - 1
            flags = (0 if last else NEXT) | (WRITE if i >= first_writable else 0)
            descs.append((draw(GOOD_ADDR), draw(GOOD_LEN), flags, 0 if last else i + 1))
        if shape == "chain+table" and tables:
            addr, length = draw(indirect_target(num, tables))
            descs[-1] = (addr, length, INDIRECT | draw(st.sampled_from([0, WRITE])), 0)
    for _ in range(draw(weighted((3, st.just(0)), (2, st.just(1)), (1, st.just(2))))):
        descs[draw(st.integers(0, entries - 1))] = draw(wild)
    return tuple(descs)


def table_place(k: int, entries: int) -> st.SearchStrategy[int]:
    size = DESC_SIZE * entries
    fits = [TABLE_SLOTS[k], R1.end - size] + ([R2.gpa] if size <= R2.size else [])
    misfits = [R0.end - DESC_SIZE,  # runs on into R2 (when longer than one entry)
               R1.end - size + DESC_SIZE, R2.end + 0x1000, R1.gpa - DESC_SIZE]
    return weighted((6, st.just(TABLE_SLOTS[k])), (2, st.sampled_from(fits)),
                    (1, st.integers(1, 15).map(lambda d: TABLE_SLOTS[k] + d)),
                    (2, st.sampled_from(misfits)))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    num = draw(st.sampled_from([1, 2, 4, 4, 8, 8, 16, 32]))
    shape = draw(st.sampled_from(SHAPES))
    event(f"shape: {shape}")
    tables: list[tuple[int, tuple[Desc, ...]]] = []
    for k in range(draw(weighted((1, st.just(0)), (4, st.integers(1, len(TABLE_SLOTS)))))):
        entries = draw(st.integers(1, min(num + 2, 12)))  # longer ones: by their length
        gpa = draw(table_place(k, entries))
        # entries of earlier tables may point at later ones: nested indirect
        table_shape = draw(weighted((3, st.just("chain")), (1, st.just("wild"))))
        tables.append((gpa, draw(descriptor_table(table_shape, entries, num, tuple(tables)))))
    descs = draw(descriptor_table(shape, num, num, tuple(tables)))
    inside = st.integers(0, num - 1)
    head = weighted((14, inside), (1, st.integers(num, num + 2)), (1, st.integers(0, 0xFFFF)))
    heads = tuple(draw(st.lists(head, min_size=1, max_size=min(num, 4))))
    ahead = len(heads) if draw(chance(90)) else draw(st.integers(0, 0xFFFF))
    return Scenario(
        num=num,
        indirect=draw(chance(85)),
        base=draw(st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFF0, 0xFFFF))),
        avail_ahead=ahead,
        heads=heads,
        descs=descs,
        tables=tuple(tables),
    )


def pack(descs: Sequence[Desc]) -> bytes:
    return b"".join(
        a.to_bytes(8, "little") + n.to_bytes(4, "little") + f.to_bytes(2, "little")
        + x.to_bytes(2, "little")
        for a, n, f, x in descs
    )


def load(w: World, s: Scenario) -> RingView:
    """Write the scenario into guest memory (tables first: the rings win where they meet)."""
    w.wipe()
    for gpa, entries in s.tables:
        w.write(gpa, pack(entries))  # a table outside one region is left unwritten
    assert w.write(DESC_GPA, pack(s.descs))
    avail = bytearray(4 + 2 * s.num + 2)
    avail[2:4] = ((s.base + s.avail_ahead) & 0xFFFF).to_bytes(2, "little")
    for i, h in enumerate(s.heads):
        slot = (s.base + i) % s.num
        avail[4 + 2 * slot : 6 + 2 * slot] = h.to_bytes(2, "little")
    assert w.write(AVAIL_GPA, bytes(avail))
    rc = lib.vu_vq_setup(w.vq, w.mem.handle, s.num, w.ram.uva_of(DESC_GPA),
                         w.ram.uva_of(AVAIL_GPA), w.ram.uva_of(USED_GPA), s.base, 0,
                         int(s.indirect))
    assert rc == 0
    return RingView(num=s.num, desc_gpa=DESC_GPA, avail_gpa=AVAIL_GPA, indirect=s.indirect)


# --- the comparison --------------------------------------------------------------------------


def assert_same(w: World, rc: int, ref: Chain | RingError) -> None:
    c = w.chain
    if isinstance(ref, RingError):
        assert rc == ref.code, f"C returned {rc}, reference {ref}"
        assert c.head == w.vq.err.head == ref.head
        assert w.vq.err.code == ref.code
        if ref.code in DETAIL_COMPARED:
            assert w.vq.err.detail == ref.detail, f"C detail {w.vq.err.detail:#x}, ref {ref}"
        return
    assert rc == 0, f"C refused with {rc} (detail {w.vq.err.detail:#x}), reference accepted {ref}"
    assert c.head == ref.head
    assert (c.out_bytes, c.in_bytes) == (ref.out_bytes, ref.in_bytes)
    assert c.n_out + c.n_in == ref.iov_count
    assert w.c_iovs(0, c.n_out) == w.pieces(ref.readable)
    assert w.c_iovs(c.n_out, c.n_in) == w.pieces(ref.writable)


def run_both(w: World, s: Scenario) -> list[str]:
    """Pop everything available from both; returns what happened, for the statistics."""
    ring = load(w, s)
    c_count = lib.vu_vq_avail_count(w.vq)
    ref_count = avail_count(w.read_mem, ring, s.base)
    if isinstance(ref_count, RingError):
        assert c_count == ref_count.code
        assert w.vq.broken == 1
        assert w.vq.err.detail == ref_count.detail
        return [ref_count.code.name]
    assert c_count == ref_count
    outcomes = []
    last = s.base
    for _ in range(ref_count):
        rc = lib.vu_vq_pop(w.vq, w.chain)
        ref = pop(w.read_mem, ring, last, split=w.split)
        last = (last + 1) & 0xFFFF
        assert w.vq.last_avail_idx == last
        assert_same(w, rc, ref)
        outcomes.append(ref.code.name if isinstance(ref, RingError) else "accepted")
    return outcomes


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(s=scenarios())
def test_c_and_reference_agree(world: World, s: Scenario) -> None:
    for outcome in run_both(world, s):
        event(outcome)


# --- the order of checks, pinned on both sides ------------------------------------------------

B = 0x10000  # a good buffer in region 0
TBL = TABLE_SLOTS[0]


def case(descs: Sequence[Desc], tables: Sequence[tuple[int, Sequence[Desc]]] = (),
         heads: Sequence[int] = (0,), *, num: int = 8, indirect: bool = True,
         ahead: int | None = None) -> Scenario:
    descs = list(descs) + [(0, 0, 0, 0)] * (num - len(descs))
    return Scenario(num, indirect, 0, len(heads) if ahead is None else ahead, tuple(heads),
                    tuple(descs), tuple((gpa, tuple(t)) for gpa, t in tables))


ORDER_CASES: dict[str, tuple[Scenario, list[str]]] = {
    "buffer count before direction": (case(
        [(B, 8, WRITE | NEXT, i + 1) for i in range(7)] + [(TBL, 32, INDIRECT, 0)],
        [(TBL, [(B, 8, WRITE | NEXT, 1), (B, 8, 0, 0)])]), ["CHAIN_TOO_LONG"]),
    "direction before address": (case(
        [(B, 8, WRITE | NEXT, 1), (1 << 63, 8, NEXT, 9)]), ["DIRECTION"]),
    "direction before the empty-buffer skip": (case(
        [(B, 8, WRITE | NEXT, 1), (1 << 63, 0, 0, 0)]), ["DIRECTION"]),
    "address before next": (case([(1 << 63, 8, NEXT, 9)]), ["ADDR"]),
    "next after the buffer was taken": (case([(B, 8, NEXT, 8)]), ["NEXT"]),
    "a revisit is checked again: direction before loop": (case(
        [(B, 8, NEXT, 1), (B, 8, WRITE | NEXT, 0)]), ["DIRECTION"]),
    "loop only after num reads": (case(
        [(B, 8, NEXT, 1), (B, 8, NEXT, 2), (B, 8, NEXT, 0)]), ["LOOP"]),
    "loop in a table behind a prefix is too long": (case(
        [(B, 8, NEXT, i + 1) for i in range(6)] + [(TBL, 64, INDIRECT, 0)],
        [(TBL, [(B, 8, NEXT, 0)] * 4)]), ["CHAIN_TOO_LONG"]),
    "feature before next, length and address": (case(
        [(1 << 63, 0, INDIRECT | NEXT, 9)], indirect=False), ["INDIRECT_FEATURE"]),
    "nested before next": (case(
        [(TBL, 16, INDIRECT, 0)], [(TBL, [(TBL, 17, INDIRECT | NEXT, 5)])]), ["INDIRECT_NESTED"]),
    "next flag before length": (case([(TBL, 17, INDIRECT | NEXT, 1)]), ["INDIRECT_NEXT"]),
    "length before table size": (case([(TBL, 16 * 9 + 1, INDIRECT, 0)]), ["INDIRECT_LEN"]),
    "table size before table address": (case(
        [(R2.end + 0x1000, 16 * 9, INDIRECT, 0)]), ["CHAIN_TOO_LONG"]),
    "table straddling two adjacent regions": (case(
        [(R0.end - 16, 32, INDIRECT, 0)]), ["INDIRECT_ADDR"]),
    "buffer straddling two adjacent regions": (case(
        [(R0.end - 16, 32, WRITE, 0)]), ["accepted"]),
    "bad head, then a good chain": (case([(B, 8, 0, 0)], heads=(8, 0)), ["HEAD", "accepted"]),
    "avail index a full ring ahead": (case([(B, 8, 0, 0)], heads=(0,) * 8, ahead=8),
                                      ["accepted"] * 8),
    "avail index too far ahead": (case([(B, 8, 0, 0)], ahead=9), ["AVAIL_IDX"]),
}


@pytest.mark.parametrize("name", list(ORDER_CASES))
def test_order_of_checks(world: World, name: str) -> None:
    scenario, expected = ORDER_CASES[name]
    assert run_both(world, scenario) == expected


# --- the same, at the places random rings rarely reach ----------------------------------------

PIECE = 0x100
ADJ_GPA = 1 << 30
ADJ_COUNT = 31


@pytest.fixture(scope="module")
def adjacent() -> Iterator[tuple[GuestRam, GuestMemory]]:
    """One 1 MiB RAM region for the rings plus 31 tiny regions, each starting where the
    previous one ends, so one descriptor can need 31 iovecs."""
    ram = GuestRam(size=1 << 20, regions=1)
    mem = GuestMemory()
    mem.add(_as_region(ram.layout[0]), ram.fd)
    for k in range(ADJ_COUNT):
        mem.add(Region(ADJ_GPA + k * PIECE, PIECE, GuestRam.UVA_BASE + 0x1000_0000 + k * PIECE,
                       0x8_0000 + k * PIECE), ram.fd)
    yield ram, mem
    mem.close()
    ram.close()


@pytest.mark.parametrize(
    "last_addr, last_len, expected",
    [
        (ADJ_GPA + PIECE // 2, PIECE, None),  # 2 pieces: exactly at the limit
        (ADJ_GPA + PIECE // 2, PIECE + PIECE // 2 + 1, ErrorCode.TOO_MANY_IOV),  # 3 pieces
        (ADJ_GPA + 29 * PIECE + 1, 2 * PIECE, ErrorCode.ADDR),  # 2 pieces, then unmapped
        (ADJ_GPA + 28 * PIECE + 1, 3 * PIECE, ErrorCode.TOO_MANY_IOV),  # 3, then unmapped
        (ADJ_GPA + ADJ_COUNT * PIECE, 1, ErrorCode.ADDR),  # unmapped from the start
        (U64 - 1, 2, ErrorCode.ADDR),  # wraps
    ],
)
def test_iovec_budget_against_unmapped_bytes(
    adjacent: tuple[GuestRam, GuestMemory], last_addr: int, last_len: int,
    expected: ErrorCode | None,
) -> None:
    """2046 iovecs used, 2 left: which of TOO_MANY_IOV and ADDR a last buffer gets."""
    ram, mem = adjacent
    num, full = 128, 66
    assert full * ADJ_COUNT + 2 == MAX_CHAIN_IOV == lib.VU_MAX_CHAIN_IOV
    desc, avail, used = 0x1000, 0x2000, 0x3000
    descs = [(ADJ_GPA, ADJ_COUNT * PIECE, NEXT, i + 1) for i in range(full)]
    descs += [(last_addr, last_len, 0, 0)] + [(0, 0, 0, 0)] * (num - full - 1)
    ram.write(desc, pack(descs))
    ram.write(avail, (0).to_bytes(2, "little") + (1).to_bytes(2, "little") + bytes(2 * num + 2))
    vq = ffi.new("struct vu_vq *")
    vq.kick_fd = vq.call_fd = vq.err_fd = vq.stop_fd = -1
    assert lib.vu_vq_setup(vq, mem.handle, num, ram.uva_of(desc), ram.uva_of(avail),
                           ram.uva_of(used), 0, 0, 1) == 0
    chain = ffi.new("struct vu_chain *")
    rc = lib.vu_vq_pop(vq, chain)

    spans = [(ram.layout[0].gpa, ram.layout[0].size)] + [
        (ADJ_GPA + k * PIECE, PIECE) for k in range(ADJ_COUNT)]

    def read_mem(gpa: int, n: int) -> bytes | None:
        return ram.read(gpa, n) if ram.layout[0].contains(gpa, n) else None

    ref = pop(read_mem, RingView(num, desc, avail, True), 0, split=region_splitter(spans))
    if expected is None:
        assert isinstance(ref, Chain) and rc == 0
        assert chain.n_out == ref.iov_count == MAX_CHAIN_IOV
    else:
        assert isinstance(ref, RingError) and ref.code == expected
        assert rc == expected and vq.err.detail == ref.detail == last_addr


# --- the reference on its own ---------------------------------------------------------------


def test_reference_limits_match_c() -> None:
    assert MAX_CHAIN_IOV == lib.VU_MAX_CHAIN_IOV
    assert MAX_QUEUE_SIZE == lib.VU_MAX_QUEUE_SIZE


@pytest.mark.parametrize("num", [0, 3, 2048])
def test_ring_view_refuses_what_setup_refuses(num: int) -> None:
    with pytest.raises(ValueError, match="power of 2"):
        RingView(num, 0, 0, True)


def test_region_splitter() -> None:
    split = region_splitter([(0x1000, 0x1000), (0x2000, 0x100), (0x4000, 0x1000)])
    assert split(0x1FF0, 0x20) == ([(0x1FF0, 0x10), (0x2000, 0x10)], True)
    assert split(0x1FF0, 0x200) == ([(0x1FF0, 0x10), (0x2000, 0x100)], False)
    assert split(0x3000, 1) == ([], False)
    assert split(0x4000, 0x1000) == ([(0x4000, 0x1000)], True)
    assert split(0x4000, 0) == ([], True)


def _memory(blobs: dict[int, bytes]) -> Callable[[int, int], bytes | None]:
    def read_mem(gpa: int, n: int) -> bytes | None:
        for start, data in blobs.items():
            if start <= gpa and gpa + n <= start + len(data):
                return data[gpa - start : gpa - start + n]
        return None

    return read_mem


def _walk(descs: Sequence[Desc], tables: dict[int, Sequence[Desc]] | None = None,
          **kw: Any) -> Chain | RingError:
    num = len(descs)
    blobs = {0x1000: pack(descs), 0x10_0000: bytes(0x1_0000)}
    blobs |= {gpa: pack(t) for gpa, t in (tables or {}).items()}
    return walk(_memory(blobs), RingView(num, 0x1000, 0x800, kw.pop("indirect", True)), 0, **kw)


def test_reference_accepts_a_plain_chain() -> None:
    got = _walk([(0x10_0000, 16, NEXT, 1), (0x10_0100, 0, NEXT, 2), (0x10_0200, 8, WRITE, 0),
                 (0, 0, 0, 0)])
    assert got == Chain(0, ((0x10_0000, 16),), ((0x10_0200, 8),), 2)
    assert isinstance(got, Chain) and (got.out_bytes, got.in_bytes) == (16, 8)


def test_reference_default_split_is_one_region() -> None:
    descs = [(0x10_0000 + 0x1_0000 - 8, 16, 0, 0)]  # runs off the end of the blob
    assert _walk(descs) == RingError(ErrorCode.ADDR, 0, 0x10_FFF8)
    assert _walk([(0x10_0000, 16, INDIRECT, 0)], indirect=False) == RingError(
        ErrorCode.INDIRECT_FEATURE, 0, 0)
