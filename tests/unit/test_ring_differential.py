"""Differential test: the C walker (c_ext/ring.c) against the pure-Python reference
(vhost/ring_reference.py), on rings hypothesis builds in guest RAM.

Both must take the same decision for every chain: accept or refuse, the same error code,
head and detail, and for an accepted chain the same readable and writable buffers (the
C iovecs mapped back to guest addresses, the reference's buffers split at region ends)
and byte totals. Each example is one descriptor table (and indirect tables) driven
through several passes over the avail ring, with indices that cross the 16-bit wrap; a
pass goes through ``vu_vq_pop`` chain by chain, or through ``vu_vq_process`` with a
handler that checks each chain, and then both sides must agree on the used ring, the
broken flag, the signalling decision (event idx or NO_INTERRUPT) and what the device
writes to avail_event when it asks for the next kick.

Guest memory: two GuestRam regions with a gap between them, a small third region that
starts exactly where region 0 ends (buffers run across that edge: C splits them; tables
that straddle it are refused), and a fourth that ends exactly at 2**64.

Budget: ``VHOST_FUZZ_SECONDS`` if set (tests/unit/test_ring_sanitized.py sets it for its
child run), else ``--fuzz-minutes N`` (long mode), else CI_SECONDS; ``VHOST_FUZZ_EXAMPLES``
caps the examples as well. The run ends with a summary line, ``ring fuzz: N chains (...)``,
in the terminal summary, and as JSON in ``$VHOST_FUZZ_REPORT`` when that is set.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cffi  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhost._native
from tests.support.frontend import GuestRam, RamRegion
from vhost._native import ffi, lib
from vhost.memory import GuestMemory, Region
from vhost.ring_reference import (
    DESC_SIZE,
    MAX_CHAIN_IOV,
    MAX_QUEUE_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Chain,
    ErrorCode,
    RingError,
    RingView,
    avail_count,
    breaks_queue,
    need_event,
    pop,
    region_splitter,
    returned_entry,
    should_signal,
    walk,
)

CI_SECONDS = 4.0  # this file in the normal suite; the sanitized run has its own budget
EXAMPLES_PER_BATCH = 100  # between looks at the clock
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
NO_INTERRUPT = VRING_AVAIL_F_NO_INTERRUPT
U64 = 1 << 64
U32 = 1 << 32
U16 = 0xFFFF
T = TypeVar("T")


def budget_seconds(fuzz_minutes: float) -> float:
    if os.environ.get("VHOST_FUZZ_SECONDS"):
        return float(os.environ["VHOST_FUZZ_SECONDS"])
    return fuzz_minutes * 60 if fuzz_minutes > 0 else CI_SECONDS


def example_cap() -> int | None:
    cap = os.environ.get("VHOST_FUZZ_EXAMPLES")
    return int(cap) if cap else None


# --- the guest memory every example shares -------------------------------------------------

KiB = 1 << 10
PER_REGION = 256 * KiB
R0_GPA, R1_GPA = 0, 1 << 30  # GuestRam's layout for two regions
R2_GPA, R2_SIZE = PER_REGION, 0x1000  # gpa-adjacent to region 0; aliases region 1's first page
R2_UVA, R2_OFFSET = GuestRam.UVA_BASE + 0x100_0000, PER_REGION
R3_SIZE = 0x1000  # the last page of the guest-physical space; aliases region 1's third page
R3_GPA, R3_UVA, R3_OFFSET = U64 - R3_SIZE, GuestRam.UVA_BASE + 0x200_0000, PER_REGION + 0x2000

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
R3 = Span(R3_GPA, R3_SIZE, R3_OFFSET)
SPANS = (R0, R1, R2, R3)

# What the cffi module does not declare, called in ABI mode from the same loaded .so.
_ABI = cffi.FFI()
_ABI.cdef("""
typedef uint32_t (*vu_chain_handler)(void *ctx, void *vq, void *chain);
int vu_vq_process(void *vq, vu_chain_handler handler, void *ctx);
void vu_vq_request_kick_at(void *vq, uint16_t idx);
""")


def used_len(in_bytes: int) -> int:
    """What the test handler says it wrote into a chain: never 0 (a refused chain's length)."""
    return in_bytes % 0xFFFF_FFFF + 1


class World:
    """The memfd, its GuestMemory and one C queue, reused by every example."""

    def __init__(self) -> None:
        self.ram = GuestRam(size=2 * PER_REGION, regions=2)
        assert [(r.gpa, r.size, r.mmap_offset) for r in self.ram.layout] == [
            (R0.gpa, R0.size, R0.offset),
            (R1.gpa, R1.size, R1.offset),
        ]
        self.mem = GuestMemory()
        for r in self.ram.layout:
            self.mem.add(_as_region(r), self.ram.fd)
        self.mem.add(Region(R2_GPA, R2_SIZE, R2_UVA, R2_OFFSET), self.ram.fd)
        self.mem.add(Region(R3_GPA, R3_SIZE, R3_UVA, R3_OFFSET), self.ram.fd)
        self.split = region_splitter([(s.gpa, s.size) for s in SPANS])
        self.hosts = [(self.mem.translate_gpa(s.gpa, s.size), s.gpa, s.size) for s in SPANS]
        self.vq = ffi.new("struct vu_vq *")
        self.vq.kick_fd = self.vq.err_fd = self.vq.stop_fd = -1
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.vq.call_fd = self.call_fd  # so vu_vq_process counts its signals
        self.chain = ffi.new("struct vu_chain *")
        self._zeros = bytes(self.ram.size)
        self.abi = _ABI.dlopen(vhost._native.__file__)
        self.vq_abi = _ABI.cast("void *", int(ffi.cast("uintptr_t", self.vq)))
        self.handler = _ABI.callback("vu_chain_handler", self._handle)
        self.expected: list[Chain] = []  # what the handler is about to see, in order
        self.handled = 0
        self.handler_failure: Exception | None = None

    def close(self) -> None:
        self.mem.close()
        self.ram.close()
        os.close(self.call_fd)

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

    def read16(self, gpa: int) -> int:
        raw = self.read_mem(gpa, 2)
        assert raw is not None
        return int.from_bytes(raw, "little")

    def write16(self, gpa: int, value: int) -> None:
        assert self.write(gpa, (value & U16).to_bytes(2, "little"))

    def wipe(self) -> None:
        os.pwrite(self.ram.fd, self._zeros, 0)

    def gpa_of(self, host: int) -> int:
        for base, gpa, size in self.hosts:
            if base <= host < base + size:
                return gpa + host - base
        raise AssertionError(f"iovec base {host:#x} is not in guest memory")

    def c_iovs(self, chain: Any, first: int, count: int) -> list[tuple[int, int]]:
        iov = chain.iov
        return [
            (self.gpa_of(int(ffi.cast("uintptr_t", iov[i].iov_base))), int(iov[i].iov_len))
            for i in range(first, first + count)
        ]

    def pieces(self, buffers: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for gpa, n in buffers:
            got, complete = self.split(gpa, n)
            assert complete
            out += got
        return out

    # vu_vq_process's handler: checks each chain C hands it against the reference's
    def _handle(self, _ctx: Any, _vq: Any, chain: Any) -> int:
        try:
            c = ffi.cast("struct vu_chain *", int(_ABI.cast("uintptr_t", chain)))
            assert self.handled < len(self.expected), f"handler called for extra head {c.head}"
            assert_same_chain(self, c, self.expected[self.handled])
            self.handled += 1
            return used_len(int(c.in_bytes))
        except Exception as e:
            if self.handler_failure is None:
                self.handler_failure = e
            return 0

    def process(self) -> int:
        self.handled = 0
        self.handler_failure = None
        rc = int(self.abi.vu_vq_process(self.vq_abi, self.handler, _ABI.NULL))
        if self.handler_failure is not None:
            raise self.handler_failure
        assert self.handled == len(self.expected), "handler not called for every good chain"
        return rc

    def request_kick_at(self, idx: int) -> None:
        self.abi.vu_vq_request_kick_at(self.vq_abi, idx)


def _as_region(r: RamRegion) -> Region:
    return Region(r.gpa, r.size, r.uva, r.mmap_offset)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()


# --- counting ----------------------------------------------------------------------------


@dataclass
class FuzzStats:
    """What the fuzz runs of this session generated and how it came out."""

    chains: Counter[str] = field(default_factory=Counter)  # "accepted" or an error name
    passes: Counter[str] = field(default_factory=Counter)  # by driver: pop, process
    signals: Counter[str] = field(default_factory=Counter)  # decisions compared
    examples: int = 0
    distinct: int = 0  # chains that differ by table or head (repeats are walked at new indices)
    avail_idx: int = 0
    broken_queues: int = 0
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.examples += 1
        self.chains.update(outcome.chains)
        self.passes.update(outcome.passes)
        self.signals.update(outcome.signals)
        self.distinct += len(outcome.heads)
        self.avail_idx += outcome.avail_idx
        self.broken_queues += outcome.broken

    def summary(self) -> str:
        total = sum(self.chains.values())
        accepted = self.chains["accepted"]
        codes = ", ".join(
            f"{name} {n}" for name, n in self.chains.most_common() if name != "accepted"
        )
        return (
            f"ring fuzz: {total} chains ({accepted} accepted, {total - accepted} rejected"
            f" by code: {codes or 'none'}); {self.distinct} distinct (table, head),"
            f" {self.examples} examples, passes "
            f"{dict(self.passes)}, signal decisions {dict(self.signals)}, "
            f"{self.avail_idx} avail indexes refused, {self.broken_queues} queues broken,"
            f" {self.seconds:.1f} s;"
            f" C module {vhost._native.__file__}"
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "chains": dict(self.chains),
                "passes": dict(self.passes),
                "signals": dict(self.signals),
                "examples": self.examples,
                "distinct": self.distinct,
                "avail_idx": self.avail_idx,
                "broken_queues": self.broken_queues,
                "seconds": self.seconds,
                "native": vhost._native.__file__,
            }
        )


class _SummaryPlugin:
    def __init__(self, stats: FuzzStats) -> None:
        self.stats = stats

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.stats.examples:
            terminalreporter.write_line(self.stats.summary())


@pytest.fixture(scope="session")
def fuzz_stats(request: pytest.FixtureRequest) -> FuzzStats:
    stats = FuzzStats()
    request.config.pluginmanager.register(_SummaryPlugin(stats), "ring-fuzz-summary")
    return stats


# --- what hypothesis builds -----------------------------------------------------------------

Desc = tuple[int, int, int, int]  # addr, len, flags, next


@dataclass(frozen=True)
class Pass:
    """One look of the device at the avail ring, and what the driver did around it."""

    heads: tuple[int, ...]  # avail ring entries written from slot last_avail_idx % num on
    ahead: int  # avail->idx - last_avail_idx at the start
    driver: str  # "pop": vu_vq_pop chain by chain; "process": one vu_vq_process
    avail_flags: int
    used_event: tuple[bool, int]  # (relative to used->idx at the start?, value)
    late: int  # avail->idx moves this much further before the device asks for a kick
    kick_at: tuple[str, int]  # ("enable", 0): vu_vq_enable_notification;
    # ("relative", d) / ("absolute", i): vu_vq_request_kick_at(last_avail_idx + d / i)


@dataclass(frozen=True)
class Scenario:
    num: int
    indirect: bool  # VIRTIO_F_INDIRECT_DESC
    event_idx: bool  # VIRTIO_F_EVENT_IDX
    base: int  # last_avail_idx at set-up
    used_base: int  # used->idx at set-up
    used_flags: int  # used->flags as the driver left it (the device never writes it)
    avail_event: int  # what avail_event holds before the device writes it
    descs: tuple[Desc, ...]  # the descriptor table
    tables: tuple[tuple[int, tuple[Desc, ...]], ...]  # (gpa, entries) of indirect tables
    passes: tuple[Pass, ...]


# Strategies are built once (module level or functools.cache) and only drawn per example:
# building one costs far more than drawing it, and the long mode draws millions.


def _itself(s: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    return s


def weighted(*options: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """one_of with weights. The first option is the usual one: it is put at both ends of
    the list drawn from, where hypothesis draws more often than anywhere else, so the
    rare options stay rare."""
    (w0, usual), rest = options[0], options[1:]
    slots = (
        (usual,) * ((w0 + 1) // 2)
        + tuple(s for w, s in rest for _ in range(w))
        + (usual,) * (w0 // 2)
    )
    return st.sampled_from(slots).flatmap(_itself)


@functools.cache
def chance(percent: int) -> st.SearchStrategy[bool]:
    """True about ``percent`` % of the time (the true values are mid-range, away from the
    ends hypothesis favours)."""
    low = 50 - percent // 2
    return st.integers(0, 99).map(lambda v: low <= v < low + percent)


@functools.cache
def index_below(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n - 1)


def near(points: Sequence[int], spread: int = 64) -> st.SearchStrategy[int]:
    return st.tuples(st.sampled_from(points), st.integers(-spread, spread)).map(
        lambda pd: min(max(pd[0] + pd[1], 0), U64 - 1)
    )


BUFFER_ADDR = st.one_of(
    st.integers(R0.gpa, R0.end - 1),
    st.integers(R1.gpa, R1.end - 1),
    st.integers(R2.gpa, R2.end - 1),
    st.integers(R3.gpa, R3.end - 1),
    near([R0.end, R2.end, R1.gpa, R1.end, R3.gpa, U64]),  # region edges (R0.end is R2's start)
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
GOOD_ADDR = st.one_of(
    st.integers(0x10000, R0.end - 0x100),
    st.integers(R1.gpa, R1.end - 0x100),
    st.integers(R3.gpa, R3.end - 0x100),
)
GOOD_LEN = st.integers(0, 0x100)
# buffers that end at 2**64 (R3 is the last page), one byte short of it, one byte past it
AT_THE_TOP = st.tuples(st.integers(1, R3_SIZE + 0x100), st.integers(-1, 1)).map(
    lambda nd: (U64 - nd[0], nd[0] + nd[1])
)
# a buffer that begins just before the end of R0 and runs on into R2, or past R2's end
ACROSS_R0_R2 = st.tuples(st.integers(1, 0x40), st.integers(1, R2_SIZE + 0x40)).map(
    lambda bn: (R0.end - bn[0], bn[0] + bn[1])
)
BUFFER = weighted(
    (6, st.tuples(GOOD_ADDR, GOOD_LEN)),
    (2, st.tuples(BUFFER_ADDR, BUFFER_LEN)),
    (1, AT_THE_TOP),
    (1, ACROSS_R0_R2),
)
CHAIN_BUFFER = weighted((60, st.tuples(GOOD_ADDR, GOOD_LEN)), (1, AT_THE_TOP), (1, ACROSS_R0_R2))

# Flags of a wild descriptor, weighted: mostly plain buffers with or without NEXT, some
# INDIRECT (with and without NEXT or WRITE), now and then bits nobody defined.
_FLAGS = (
    [NEXT] * 5
    + [NEXT | WRITE] * 5
    + [0] * 2
    + [WRITE] * 2
    + [INDIRECT, INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT]
)
FLAGS = weighted((19, st.sampled_from(_FLAGS)), (1, st.integers(0, U16)))
TABLE_FLAGS = st.sampled_from([INDIRECT, INDIRECT | WRITE])


@functools.cache
def next_index(entries: int) -> st.SearchStrategy[int]:
    return weighted(
        (6, index_below(entries)), (1, st.integers(entries, entries + 2)), (1, st.integers(0, U16))
    )


@functools.cache
def odd_table_len(num: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 8, 17, DESC_SIZE * (num + 1), U32 - DESC_SIZE]),
        st.integers(1, num + 2).map(lambda n: n * DESC_SIZE),
        st.integers(0, U32 - 1),
    )


@functools.cache
def table_len(num: int, entries: int) -> st.SearchStrategy[int]:
    return weighted(
        (12, st.just(DESC_SIZE * entries)),
        (2, st.sampled_from([DESC_SIZE * num, DESC_SIZE * (num + 1)])),  # the limit
        (3, odd_table_len(num)),
    )


Tables = tuple[tuple[int, tuple[Desc, ...]], ...]


@functools.lru_cache(maxsize=64)  # keyed by the tables of one example
def indirect_target(num: int, tables: Tables) -> st.SearchStrategy[tuple[int, int]]:
    anywhere = st.tuples(BUFFER_ADDR, odd_table_len(num))
    if not tables:
        return anywhere
    return weighted((3, _to_a_table(num, st.sampled_from(tables))), (1, anywhere))


SHIFT = st.integers(-DESC_SIZE, DESC_SIZE)


@st.composite
def _to_a_table(
    draw: st.DrawFn, num: int, tables: st.SearchStrategy[tuple[int, tuple[Desc, ...]]]
) -> tuple[int, int]:
    gpa, entries = draw(tables)
    length = draw(table_len(num, len(entries)))
    if draw(chance(10)):
        gpa = min(gpa + draw(SHIFT), U64 - 1)  # R3 ends at 2**64
    return gpa, length


@st.composite
def wild_descriptor(draw: st.DrawFn, entries: int, num: int, tables: Tables) -> Desc:
    flags = draw(FLAGS)
    target = indirect_target(num, tables) if flags & INDIRECT else BUFFER
    addr, length = draw(target)
    return addr, length, flags, draw(next_index(entries))


SHAPES = ("wild", "chain", "chain+table", "tables")
SHAPE = weighted(
    (3, st.just("chain")), (1, st.just("wild")), (2, st.just("chain+table")), (2, st.just("tables"))
)
WILD_COUNT = weighted((3, st.just(0)), (2, st.just(1)), (1, st.just(2)))


@functools.cache
def first_writable(entries: int) -> st.SearchStrategy[int]:
    return weighted(
        (2, st.just(entries)),
        (1, st.just(0)),  # all readable / all writable
        (2, st.integers(0, entries)),
    )


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
        return tuple(draw(wild) for _ in range(entries))
    if shape == "tables" and tables:
        target = indirect_target(num, tables)
        descs = [(*draw(target), draw(TABLE_FLAGS), 0) for _ in range(entries)]
    else:
        writable_from = draw(first_writable(entries))
        descs = []
        for i in range(entries):
            last = i == entries - 1
            flags = (0 if last else NEXT) | (WRITE if i >= writable_from else 0)
            descs.append((*draw(CHAIN_BUFFER), flags, 0 if last else i + 1))
        if shape == "chain+table" and tables:
            descs[-1] = (*draw(indirect_target(num, tables)), draw(TABLE_FLAGS), 0)
    for _ in range(draw(WILD_COUNT)):
        descs[draw(index_below(entries))] = draw(wild)
    return tuple(descs)


@functools.cache
def table_place(k: int, entries: int) -> st.SearchStrategy[int]:
    size = DESC_SIZE * entries
    fits = [TABLE_SLOTS[k], R1.end - size] + (
        [R2.gpa, R3.gpa, R3.end - size] if size <= R2.size else []
    )
    misfits = [
        R0.end - DESC_SIZE,  # runs on into R2 (when longer than one entry)
        R1.end - size + DESC_SIZE,
        R2.end + 0x1000,
        R1.gpa - DESC_SIZE,
        R3.gpa - DESC_SIZE,
    ]
    return weighted(
        (6, st.just(TABLE_SLOTS[k])),
        (2, st.sampled_from(fits)),
        (1, st.integers(1, 15).map(lambda d: TABLE_SLOTS[k] + d)),
        (2, st.sampled_from(misfits)),
    )


NEAR_WRAP = st.one_of(
    st.integers(0, U16), st.integers(0xFF00, U16), st.just(U16), st.integers(0x7FF0, 0x8010)
)


@dataclass(frozen=True)
class PassParts:
    """The strategies a pass over a ring of ``num`` entries draws from."""

    num: int
    bad_heads: bool

    @functools.cached_property
    def head(self) -> st.SearchStrategy[int]:
        inside = index_below(self.num)
        if not self.bad_heads:
            return inside
        return weighted(
            (40, inside), (1, st.integers(self.num, self.num + 2)), (1, st.integers(0, U16))
        )

    @functools.cached_property
    def heads(self) -> st.SearchStrategy[list[int]]:
        return st.lists(self.head, min_size=1, max_size=self.num)

    @functools.cached_property
    def bad_head(self) -> st.SearchStrategy[int]:
        return st.integers(self.num, U16)

    @functools.cached_property
    def ahead(self) -> st.SearchStrategy[int | None]:  # None: as many as heads were written
        return weighted(
            (200, st.just(None)),
            (8, st.integers(0, self.num)),
            (1, st.integers(self.num + 1, self.num + 2)),
            (1, st.integers(0, U16)),
        )

    @functools.cached_property
    def used_event(self) -> st.SearchStrategy[tuple[bool, int]]:
        return weighted(
            (4, st.tuples(st.just(True), st.integers(-2, self.num + 2))),
            (1, st.tuples(st.just(False), st.integers(0, U16))),
        )

    @functools.cached_property
    def late(self) -> st.SearchStrategy[int]:
        return weighted(
            (60, st.just(0)), (20, st.integers(1, self.num)), (1, st.integers(self.num + 1, U16))
        )

    @functools.cached_property
    def kick_at(self) -> st.SearchStrategy[tuple[str, int]]:
        return weighted(
            (2, st.just(("enable", 0))),
            (2, st.tuples(st.just("relative"), st.integers(-2, self.num + 2))),
            (1, st.tuples(st.just("absolute"), st.integers(0, U16))),
        )


@functools.cache
def pass_parts(num: int, bad_heads: bool) -> PassParts:
    return PassParts(num, bad_heads)


HOW = weighted((4, st.just("sweep")), (2, st.just("list")), (1, st.just("one")))
DRIVER = st.sampled_from(("pop", "process"))
AVAIL_FLAGS = weighted((3, st.sampled_from([0, NO_INTERRUPT])), (1, st.integers(0, U16)))
PASS_COUNT = st.integers(1, 12)


@st.composite
def passes(draw: st.DrawFn, num: int, bad_heads: bool) -> Pass:
    parts = pass_parts(num, bad_heads)
    how = draw(HOW)
    if how == "sweep":  # every head of the table once, from a random start: cheap to draw
        start = draw(index_below(num))
        heads = tuple((start + i) % num for i in range(num))
        if bad_heads and draw(chance(30)):
            at = draw(index_below(num))
            heads = (*heads[:at], draw(parts.bad_head), *heads[at + 1 :])
    elif how == "list":
        heads = tuple(draw(parts.heads))
    else:
        heads = (draw(parts.head),)
    ahead = draw(parts.ahead)
    return Pass(
        heads=heads,
        ahead=len(heads) if ahead is None else ahead,
        driver=draw(DRIVER),
        avail_flags=draw(AVAIL_FLAGS),
        used_event=draw(parts.used_event),
        late=draw(parts.late),
        kick_at=draw(parts.kick_at),
    )


NUM = weighted((2, st.sampled_from([8, 16, 32])), (1, st.sampled_from([1, 2, 4])), (1, st.just(64)))
TABLE_COUNT = weighted((4, st.integers(1, len(TABLE_SLOTS))), (1, st.just(0)))
TABLE_SHAPE = weighted((3, st.just("chain")), (1, st.just("wild")))
USED_FLAGS = weighted((3, st.just(0)), (1, st.integers(0, U16)))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    num = draw(NUM)
    shape = draw(SHAPE)
    tables: list[tuple[int, tuple[Desc, ...]]] = []
    for k in range(draw(TABLE_COUNT)):
        entries = draw(st.integers(1, min(num + 2, 12)))  # longer ones: by their length
        gpa = draw(table_place(k, entries))
        # entries of later tables may point at earlier ones: nested indirect
        tables.append((gpa, draw(descriptor_table(draw(TABLE_SHAPE), entries, num, tuple(tables)))))
    descs = draw(descriptor_table(shape, num, num, tuple(tables)))
    bad_heads = draw(chance(10))  # a bad head breaks the queue: the later passes are lost
    one_pass = passes(num, bad_heads)
    return Scenario(
        num=num,
        indirect=draw(chance(85)),
        event_idx=draw(chance(60)),
        base=draw(NEAR_WRAP),
        used_base=draw(NEAR_WRAP),
        used_flags=draw(USED_FLAGS),
        avail_event=draw(st.integers(0, U16)),
        descs=descs,
        tables=tuple(tables),
        passes=tuple(draw(one_pass) for _ in range(draw(PASS_COUNT))),
    )


def pack(descs: Sequence[Desc]) -> bytes:
    return b"".join(
        a.to_bytes(8, "little")
        + n.to_bytes(4, "little")
        + f.to_bytes(2, "little")
        + x.to_bytes(2, "little")
        for a, n, f, x in descs
    )


def load(w: World, s: Scenario) -> RingView:
    """Write the scenario's tables and rings into guest memory (tables first: the rings win
    where they meet) and set the C queue up on them."""
    w.wipe()
    for gpa, entries in s.tables:
        w.write(gpa, pack(entries))  # a table outside one region is left unwritten
    assert w.write(DESC_GPA, pack(s.descs))
    w.write16(USED_GPA, s.used_flags)
    w.write16(USED_GPA + 2, s.used_base)
    w.write16(avail_event_gpa(s.num), s.avail_event)
    rc = lib.vu_vq_setup(
        w.vq,
        w.mem.handle,
        s.num,
        w.ram.uva_of(DESC_GPA),
        w.ram.uva_of(AVAIL_GPA),
        w.ram.uva_of(USED_GPA),
        s.base,
        int(s.event_idx),
        int(s.indirect),
    )
    assert rc == 0
    return RingView(num=s.num, desc_gpa=DESC_GPA, avail_gpa=AVAIL_GPA, indirect=s.indirect)


def used_event_gpa(num: int) -> int:
    return AVAIL_GPA + 4 + 2 * num


def avail_event_gpa(num: int) -> int:
    return USED_GPA + 4 + 8 * num


# --- the comparison --------------------------------------------------------------------------


def assert_same_chain(w: World, c: Any, ref: Chain) -> None:
    assert c.head == ref.head
    assert (c.out_bytes, c.in_bytes) == (ref.out_bytes, ref.in_bytes)
    assert c.n_out + c.n_in == ref.iov_count
    assert w.c_iovs(c, 0, c.n_out) == w.pieces(ref.readable)
    assert w.c_iovs(c, c.n_out, c.n_in) == w.pieces(ref.writable)


def assert_same_error(w: World, ref: RingError) -> None:
    err = w.vq.err
    assert err.code == ref.code, f"C recorded {err.code}, reference {ref}"
    assert err.head == ref.head, f"C recorded head {err.head}, reference {ref}"
    assert err.detail == ref.detail, f"C detail {err.detail:#x}, reference {ref}"


def assert_same(w: World, rc: int, ref: Chain | RingError) -> None:
    if isinstance(ref, RingError):
        assert rc == ref.code, f"C returned {rc}, reference {ref}"
        assert w.chain.head == ref.head
        assert_same_error(w, ref)
        return
    assert rc == 0, f"C refused with {rc} (detail {w.vq.err.detail:#x}), reference accepted {ref}"
    assert_same_chain(w, w.chain, ref)


@dataclass
class Device:
    """Where the queue stands by the reference's account, carried from pass to pass."""

    last_avail: int
    used: int
    avail_event: int
    signalled: int | None = None  # used index at the last signal decision
    broken: bool = False


@dataclass
class Outcome:
    chains: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    heads: set[int] = field(default_factory=set)  # heads walked: distinct chains of the table
    avail_idx: int = 0  # avail indexes refused (R1): no chain taken
    broken: int = 0


def name_of(result: Chain | RingError) -> str:
    return result.code.name if isinstance(result, RingError) else "accepted"


def run_pass(w: World, s: Scenario, ring: RingView, dev: Device, p: Pass, out: Outcome) -> None:
    """One pass over the avail ring by both sides, then the device asks for a kick."""
    num = s.num
    relative, value = p.used_event
    used_event = (dev.used + value) & U16 if relative else value
    for i, h in enumerate(p.heads):
        w.write16(AVAIL_GPA + 4 + 2 * ((dev.last_avail + i) % num), h)
    w.write16(AVAIL_GPA, p.avail_flags)
    w.write16(AVAIL_GPA + 2, dev.last_avail + p.ahead)
    w.write16(used_event_gpa(num), used_event)

    # The reference's pass (vu_vq_process's rules, U1..U4), before C's. C writes a used
    # entry after each chain, and a guest may have put an indirect table or a buffer there,
    # so the reference walks memory as it will be then: with the entries written so far.
    count = avail_count(w.read_mem, ring, dev.last_avail)
    results: list[Chain | RingError] = []
    entries: list[tuple[int, int]] = []
    used_ring = UsedRingOverlay(w, num)
    if not isinstance(count, RingError):
        for i in range(count):
            result = pop(used_ring.read_mem, ring, (dev.last_avail + i) & U16, split=w.split)
            results.append(result)
            entry = returned_entry(
                result, used_len(result.in_bytes) if isinstance(result, Chain) else 0
            )
            if entry is not None:
                used_ring.put((dev.used + len(entries)) % num, entry)
                entries.append(entry)
            if breaks_queue(result):
                break
    errors = [r for r in results if isinstance(r, RingError)]
    last_error = count if isinstance(count, RingError) else errors[-1] if errors else None
    took = len(results)
    old_used = dev.used
    stats_before = (
        w.vq.stats.chains,
        w.vq.stats.bad_chains,
        w.vq.stats.signals,
        w.vq.stats.batches,
    )

    if p.driver == "pop":
        signalled = c_pass_by_pop(w, count, results)
    else:
        w.expected = [r for r in results if isinstance(r, Chain)]
        rc = w.process()
        expected_rc = (
            count.code
            if isinstance(count, RingError)
            else errors[-1].code
            if errors and breaks_queue(errors[-1])
            else took
        )
        assert rc == expected_rc, f"vu_vq_process returned {rc}, expected {expected_rc}"
        if last_error is not None:
            assert_same_error(w, last_error)
        signalled = w.vq.stats.signals - stats_before[2]
        assert (
            w.vq.stats.chains - stats_before[0],
            w.vq.stats.bad_chains - stats_before[1],
            w.vq.stats.batches - stats_before[3],
        ) == (took, len(errors), int(took > 0))

    out.passes.append(p.driver)
    out.chains += [name_of(r) for r in results]
    out.heads.update(r.head for r in results)
    out.avail_idx += isinstance(count, RingError)
    dev.last_avail = (dev.last_avail + took) & U16
    dev.broken = isinstance(count, RingError) or any(breaks_queue(r) for r in results)
    assert w.vq.last_avail_idx == dev.last_avail
    assert bool(w.vq.broken) == dev.broken

    # U4 and E1/E2: published once per pass that took a slot, then one decision
    if took:
        dev.used = (dev.used + len(entries)) & U16
        expect = should_signal(
            event_idx=s.event_idx,
            avail_flags=p.avail_flags,
            used_event=used_event,
            new_used_idx=dev.used,
            signalled_used=dev.signalled,
        )
        dev.signalled = dev.used
        assert bool(signalled) == expect, (
            f"C signalled={bool(signalled)}, reference {expect} (event_idx={s.event_idx}, "
            f"flags={p.avail_flags:#x}, used_event={used_event}, used {old_used}->{dev.used})"
        )
        out.signals.append("signal" if expect else "quiet")
    else:
        assert not signalled
    assert w.read16(USED_GPA + 2) == dev.used
    assert w.vq.used_idx == dev.used
    for k, (head, length) in enumerate(entries):
        at = USED_GPA + 4 + 8 * ((old_used + k) % num)
        raw = w.read_mem(at, 8)
        assert raw is not None
        assert (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")) == (
            head,
            length,
        ), f"used entry {k} of the pass"
    assert w.read16(USED_GPA) == s.used_flags  # E3: never written

    if dev.broken:
        out.broken = 1
        return
    # E3: the device asks for the next kick (and the driver may just have added more)
    if p.late:
        w.write16(AVAIL_GPA + 2, dev.last_avail + p.late)
    kind, value = p.kick_at
    if kind == "enable":
        rc = lib.vu_vq_enable_notification(w.vq)
        if s.event_idx:
            dev.avail_event = dev.last_avail
        now = avail_count(w.read_mem, ring, dev.last_avail)
        if isinstance(now, RingError):
            assert rc == now.code
            assert_same_error(w, now)
            out.avail_idx += 1
            dev.broken = True
            out.broken = 1
        else:
            assert rc == now
        assert bool(w.vq.broken) == dev.broken
    else:
        idx = (dev.last_avail + value) & U16 if kind == "relative" else value
        w.request_kick_at(idx)
        if s.event_idx:
            dev.avail_event = idx
    assert w.read16(avail_event_gpa(num)) == dev.avail_event


class UsedRingOverlay:
    """Guest memory with the used ring entries of the pass so far written over it."""

    def __init__(self, w: World, num: int) -> None:
        self.w = w
        self.start = USED_GPA + 4
        self.ring = bytearray(8 * num)  # a copy of used->ring[], taken on the first put
        self.dirty = False

    def put(self, slot: int, entry: tuple[int, int]) -> None:
        if not self.dirty:
            raw = self.w.read_mem(self.start, len(self.ring))
            assert raw is not None
            self.ring[:] = raw
            self.dirty = True
        self.ring[8 * slot : 8 * slot + 8] = entry[0].to_bytes(4, "little") + entry[1].to_bytes(
            4, "little"
        )

    def read_mem(self, gpa: int, n: int) -> bytes | None:
        raw = self.w.read_mem(gpa, n)
        end = self.start + len(self.ring)
        if raw is None or not self.dirty or gpa + n <= self.start or gpa >= end:
            return raw  # (R0, where the rings are, has no alias in the other regions)
        lo, hi = max(gpa, self.start), min(gpa + n, end)
        patched = bytearray(raw)
        patched[lo - gpa : hi - gpa] = self.ring[lo - self.start : hi - self.start]
        return bytes(patched)


def c_pass_by_pop(w: World, count: int | RingError, results: list[Chain | RingError]) -> int:
    """The pass through vu_vq_pop, chain by chain, returning each as vu_vq_process would;
    returns vu_vq_should_signal's decision (0 when no slot was taken)."""
    c_count = lib.vu_vq_avail_count(w.vq)
    if isinstance(count, RingError):
        assert c_count == count.code
        assert_same_error(w, count)
        return 0
    assert c_count == count
    for ref in results:
        rc = lib.vu_vq_pop(w.vq, w.chain)
        assert_same(w, rc, ref)
        if rc == 0:
            lib.vu_vq_push(w.vq, w.chain.head, used_len(int(w.chain.in_bytes)))
        elif rc != ErrorCode.HEAD:
            lib.vu_vq_push(w.vq, w.chain.head, 0)
    if not results:
        return 0
    lib.vu_vq_flush_used(w.vq)
    return int(lib.vu_vq_should_signal(w.vq))


def run_scenario(w: World, s: Scenario) -> Outcome:
    ring = load(w, s)
    dev = Device(last_avail=s.base, used=s.used_base, avail_event=s.avail_event)
    out = Outcome()
    for p in s.passes:
        run_pass(w, s, ring, dev, p, out)
        if dev.broken:
            break
    return out


def run_both(w: World, s: Scenario) -> list[str]:
    out = run_scenario(w, s)
    return out.chains + ["AVAIL_IDX"] * out.avail_idx


# --- the fuzz run -----------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_BATCH,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


def test_c_and_reference_agree(world: World, fuzz_stats: FuzzStats, fuzz_minutes: float) -> None:
    """Runs by the clock: batches of EXAMPLES_PER_BATCH examples until the budget is spent."""

    @FUZZ_SETTINGS
    @given(s=scenarios())
    def batch(s: Scenario) -> None:
        outcome = run_scenario(world, s)
        fuzz_stats.add(outcome)

    started = time.monotonic()
    deadline = started + budget_seconds(fuzz_minutes)
    cap = example_cap()
    try:
        while True:
            batch()
            if time.monotonic() >= deadline or (cap is not None and fuzz_stats.examples >= cap):
                break
    finally:
        fuzz_stats.seconds += time.monotonic() - started
        if os.environ.get("VHOST_FUZZ_REPORT"):
            with open(os.environ["VHOST_FUZZ_REPORT"], "w") as f:
                f.write(fuzz_stats.to_json())
    if fuzz_stats.examples >= EXAMPLES_PER_BATCH:
        assert fuzz_stats.chains["accepted"] > 0, "the generator no longer builds good chains"


def test_the_expected_c_module_is_loaded() -> None:
    """Under tests/unit/test_ring_sanitized.py: this run really uses the sanitized build."""
    expected = os.environ.get("VHOST_SANITIZED_NATIVE")
    if not expected:
        pytest.skip("not a sanitized run")
    assert vhost._native.__file__ == expected


# --- the order of checks, pinned on both sides ------------------------------------------------

B = 0x10000  # a good buffer in region 0
TBL = TABLE_SLOTS[0]


def case(
    descs: Sequence[Desc],
    tables: Sequence[tuple[int, Sequence[Desc]]] = (),
    heads: Sequence[int] = (0,),
    *,
    num: int = 8,
    indirect: bool = True,
    ahead: int | None = None,
    base: int = 0,
    driver: str = "pop",
) -> Scenario:
    descs = list(descs) + [(0, 0, 0, 0)] * (num - len(descs))
    one = Pass(
        tuple(heads), len(heads) if ahead is None else ahead, driver, 0, (True, 0), 0, ("enable", 0)
    )
    return Scenario(
        num,
        indirect,
        False,
        base,
        0,
        0,
        0,
        tuple(descs),
        tuple((gpa, tuple(t)) for gpa, t in tables),
        (one,),
    )


ORDER_CASES: dict[str, tuple[Scenario, list[str]]] = {
    "buffer count before direction": (
        case(
            [(B, 8, WRITE | NEXT, i + 1) for i in range(7)] + [(TBL, 32, INDIRECT, 0)],
            [(TBL, [(B, 8, WRITE | NEXT, 1), (B, 8, 0, 0)])],
        ),
        ["CHAIN_TOO_LONG"],
    ),
    "direction before address": (
        case([(B, 8, WRITE | NEXT, 1), (1 << 63, 8, NEXT, 9)]),
        ["DIRECTION"],
    ),
    "direction before the empty-buffer skip": (
        case([(B, 8, WRITE | NEXT, 1), (1 << 63, 0, 0, 0)]),
        ["DIRECTION"],
    ),
    "address before next": (case([(1 << 63, 8, NEXT, 9)]), ["ADDR"]),
    "next after the buffer was taken": (case([(B, 8, NEXT, 8)]), ["NEXT"]),
    "a revisit is checked again: direction before loop": (
        case([(B, 8, NEXT, 1), (B, 8, WRITE | NEXT, 0)]),
        ["DIRECTION"],
    ),
    "loop only after num reads": (
        case([(B, 8, NEXT, 1), (B, 8, NEXT, 2), (B, 8, NEXT, 0)]),
        ["LOOP"],
    ),
    "loop in a table behind a prefix is too long": (
        case(
            [(B, 8, NEXT, i + 1) for i in range(6)] + [(TBL, 64, INDIRECT, 0)],
            [(TBL, [(B, 8, NEXT, 0)] * 4)],
        ),
        ["CHAIN_TOO_LONG"],
    ),
    "feature before next, length and address": (
        case([(1 << 63, 0, INDIRECT | NEXT, 9)], indirect=False),
        ["INDIRECT_FEATURE"],
    ),
    "nested before next": (
        case([(TBL, 16, INDIRECT, 0)], [(TBL, [(TBL, 17, INDIRECT | NEXT, 5)])]),
        ["INDIRECT_NESTED"],
    ),
    "nested indirect pointing at a good table": (
        case(
            [(TBL, 16, INDIRECT, 0)],
            [(TBL, [(TABLE_SLOTS[1], 16, INDIRECT, 0)]), (TABLE_SLOTS[1], [(B, 8, 0, 0)])],
        ),
        ["INDIRECT_NESTED"],
    ),
    "next flag before length": (case([(TBL, 17, INDIRECT | NEXT, 1)]), ["INDIRECT_NEXT"]),
    "length before table size": (case([(TBL, 16 * 9 + 1, INDIRECT, 0)]), ["INDIRECT_LEN"]),
    "table size before table address": (
        case([(R2.end + 0x1000, 16 * 9, INDIRECT, 0)]),
        ["CHAIN_TOO_LONG"],
    ),
    "table straddling two adjacent regions": (
        case([(R0.end - 16, 32, INDIRECT, 0)]),
        ["INDIRECT_ADDR"],
    ),
    "table in the last page of the address space": (
        case(
            [(U64 - 32, 32, INDIRECT, 0)], [(U64 - 32, [(B, 8, NEXT, 1), (U64 - 8, 8, WRITE, 0)])]
        ),
        ["accepted"],
    ),
    # used->ring[0] becomes (3, 1) before head 1 is walked: the table's one entry then reads
    # (addr 0, len 3, NEXT, next 0), a loop; read before that write, it was an empty buffer
    "a table over the used ring is read after the entries written before it": (
        case(
            [(0, 0, 0, 0), (USED_GPA - 4, 16, INDIRECT, 0), (0, 0, 0, 0), (B, 8, 0, 0)],
            heads=(3, 1),
        ),
        ["accepted", "LOOP"],
    ),
    "buffer straddling two adjacent regions": (case([(R0.end - 16, 32, WRITE, 0)]), ["accepted"]),
    "buffer ending exactly at 2**64": (case([(U64 - 16, 16, 0, 0)]), ["accepted"]),
    "buffer one byte past 2**64": (case([(U64 - 16, 17, 0, 0)]), ["ADDR"]),
    "buffer whose length wraps the address space": (case([(U64 - 8, U32 - 1, 0, 0)]), ["ADDR"]),
    "bad head breaks the queue: nothing after it is taken": (
        case([(B, 8, 0, 0)], heads=(8, 0)),
        ["HEAD"],
    ),
    "a good chain, then a bad head": (
        case([(B, 8, 0, 0)], heads=(0, 0xFFFF, 0)),
        ["accepted", "HEAD"],
    ),
    "a bad head through vu_vq_process: what came before is published": (
        case([(B, 8, WRITE, 0), (B, 8, NEXT, 9)], heads=(0, 1, 9, 0), driver="process"),
        ["accepted", "NEXT", "HEAD"],
    ),
    "avail index a full ring ahead": (
        case([(B, 8, 0, 0)], heads=(0,) * 8, ahead=8),
        ["accepted"] * 8,
    ),
    "avail index too far ahead": (case([(B, 8, 0, 0)], ahead=9), ["AVAIL_IDX"]),
    "indices across the 16-bit wrap": (
        case([(B, 8, 0, 0), (B, 8, WRITE, 0)], heads=(0, 1, 0, 1), base=0xFFFE),
        ["accepted"] * 4,
    ),
    "a full ring across the 16-bit wrap, through vu_vq_process": (
        case([(B, 8, 0, 0)], heads=(0,) * 8, base=0xFFFB, driver="process"),
        ["accepted"] * 8,
    ),
}


@pytest.mark.parametrize("name", list(ORDER_CASES))
def test_order_of_checks(world: World, name: str) -> None:
    scenario, expected = ORDER_CASES[name]
    assert run_both(world, scenario) == expected


@pytest.mark.parametrize("driver", ["pop", "process"])
def test_a_bad_head_breaks_the_queue(world: World, driver: str) -> None:
    """R2: HEAD, the slot counted as taken, the queue broken, the next chain left alone."""
    s = case([(B, 8, 0, 0)], heads=(0, 8, 0), driver=driver)
    out = run_scenario(world, s)
    assert out.chains == ["accepted", "HEAD"] and out.broken == 1
    assert world.vq.broken == 1 and world.vq.last_avail_idx == 2
    assert world.vq.err.code == ErrorCode.HEAD and world.vq.err.detail == 8
    assert world.read16(USED_GPA + 2) == 1  # only the first chain went back


# --- signalling: vu_need_event against the spec's interval ------------------------------------

EDGES = sorted(
    {0, 1, 2, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFD, 0xFFFE, 0xFFFF}
    | {(0xFFFF + d) & U16 for d in range(-3, 4)}
    | {d for d in range(5)}
)


def test_need_event_on_the_edges() -> None:
    for event_idx in EDGES:
        for new in EDGES:
            for old in EDGES:
                assert bool(lib.vu_need_event(event_idx, new, old)) == need_event(
                    event_idx, new, old
                ), (event_idx, new, old)


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, U16), st.integers(0, U16), st.integers(0, U16))
def test_need_event_anywhere(event_idx: int, new: int, old: int) -> None:
    assert bool(lib.vu_need_event(event_idx, new, old)) == need_event(event_idx, new, old)
    # and the reference against the spec's own expression (vring_need_event)
    assert need_event(event_idx, new, old) == ((new - event_idx - 1) & U16 < (new - old) & U16)


def test_first_decision_after_setup_signals(world: World) -> None:
    """E2's set-up rule, then a decision that does not cross used_event stays quiet."""
    s = Scenario(
        8,
        True,
        True,
        0,
        0x10,
        0,
        0,
        tuple([(B, 8, 0, 0)] * 8),
        (),
        (
            Pass((0, 1), 2, "process", 0, (False, 0x200), 0, ("enable", 0)),
            Pass((2,), 1, "pop", 0, (False, 0x200), 0, ("relative", 3)),
            Pass((3,), 1, "process", 0, (True, 0), 0, ("enable", 0)),
        ),
    )
    out = run_scenario(world, s)
    assert out.signals == ["signal", "quiet", "signal"]


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
        mem.add(
            Region(
                ADJ_GPA + k * PIECE,
                PIECE,
                GuestRam.UVA_BASE + 0x1000_0000 + k * PIECE,
                0x8_0000 + k * PIECE,
            ),
            ram.fd,
        )
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
    adjacent: tuple[GuestRam, GuestMemory],
    last_addr: int,
    last_len: int,
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
    assert (
        lib.vu_vq_setup(
            vq, mem.handle, num, ram.uva_of(desc), ram.uva_of(avail), ram.uva_of(used), 0, 0, 1
        )
        == 0
    )
    chain = ffi.new("struct vu_chain *")
    rc = lib.vu_vq_pop(vq, chain)

    spans = [(ram.layout[0].gpa, ram.layout[0].size)] + [
        (ADJ_GPA + k * PIECE, PIECE) for k in range(ADJ_COUNT)
    ]

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


def _walk(
    descs: Sequence[Desc], tables: dict[int, Sequence[Desc]] | None = None, **kw: Any
) -> Chain | RingError:
    num = len(descs)
    blobs = {0x1000: pack(descs), 0x10_0000: bytes(0x1_0000)}
    blobs |= {gpa: pack(t) for gpa, t in (tables or {}).items()}
    return walk(_memory(blobs), RingView(num, 0x1000, 0x800, kw.pop("indirect", True)), 0, **kw)


def test_reference_accepts_a_plain_chain() -> None:
    got = _walk(
        [(0x10_0000, 16, NEXT, 1), (0x10_0100, 0, NEXT, 2), (0x10_0200, 8, WRITE, 0), (0, 0, 0, 0)]
    )
    assert got == Chain(0, ((0x10_0000, 16),), ((0x10_0200, 8),), 2)
    assert isinstance(got, Chain) and (got.out_bytes, got.in_bytes) == (16, 8)


def test_reference_default_split_is_one_region() -> None:
    descs = [(0x10_0000 + 0x1_0000 - 8, 16, 0, 0)]  # runs off the end of the blob
    assert _walk(descs) == RingError(ErrorCode.ADDR, 0, 0x10_FFF8)
    assert _walk([(0x10_0000, 16, INDIRECT, 0)], indirect=False) == RingError(
        ErrorCode.INDIRECT_FEATURE, 0, 0
    )
