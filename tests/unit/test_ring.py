"""The C split-ring walker (c_ext/ring.c) driven directly, without threads, on the ring
fixture of tests/support/rings.py: guest RAM mapped into a GuestMemory, a DriverQueue (or
raw descriptors) as the driver, and vu_vq_* calls as the device. Every walker error code
in vu.h is reached and asserted exactly, with the head and detail it records."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.support.frontend import DESC_SIZE, GuestRam
from tests.support.rings import (
    ADJ_COUNT,
    ADJ_GPA,
    INDIRECT,
    NEXT,
    PIECE,
    WRITE,
    Ring,
    adjacent_regions,
)
from vhost._native import ffi, lib
from vhost.errors import CORE_ERRORS
from vhost.ring_reference import ErrorCode as E

U64 = 1 << 64


@pytest.fixture
def ring(make: Callable[..., Ring]) -> Ring:
    return make()


# --- the error codes themselves ------------------------------------------------------------


def test_error_codes_come_from_the_c_table() -> None:
    """Every code of the reference walker is a row of the core's C table, under the same
    name, with a text; the table's names are the module's constants."""
    rows = {row.name: row for row in CORE_ERRORS}
    for e in E:
        row = rows[f"VU_ERR_{e.name}"]
        assert row.code == e.value and row.text
    for row in CORE_ERRORS:
        assert getattr(lib, row.name) == row.code
        assert row.code < 0 and row.code > lib.VU_ERR_DEVICE_BASE  # the core's range


# --- walking good chains ------------------------------------------------------------------


def test_single_buffer(ring: Ring) -> None:
    b = ring.buf(100)
    head = ring.q.add_chain([(b, 100, False)])
    ring.q.publish()
    assert lib.vu_vq_avail_count(ring.vq) == 1
    assert ring.pop_ok() == ([(b, 100)], [])
    c = ring.chain
    assert (c.head, c.n_out, c.n_in, c.out_bytes, c.in_bytes) == (head, 1, 0, 100, 0)
    assert c.iov[0].iov_base == ffi.cast("void *", ring.mem.translate_gpa(b, 100))
    assert ring.vq.last_avail_idx == 1
    assert lib.vu_vq_avail_count(ring.vq) == 0


def test_chain_readable_then_writable(ring: Ring) -> None:
    bufs = [
        (ring.buf(16), 16, False),
        (ring.buf(512, 1), 512, False),
        (ring.buf(4096), 4096, True),
        (ring.buf(100, 1), 100, True),
        (ring.buf(1), 1, True),
    ]
    head = ring.q.add_chain(bufs)
    ring.q.publish()
    readable, writable = ring.pop_ok()
    assert readable == [(g, n) for g, n, w in bufs if not w]
    assert writable == [(g, n) for g, n, w in bufs if w]
    c = ring.chain
    assert (c.head, c.n_out, c.n_in, c.out_bytes, c.in_bytes) == (head, 2, 3, 528, 4197)


def test_only_writable_buffers(ring: Ring) -> None:
    a, b = ring.buf(64), ring.buf(64, 1)
    ring.q.add_chain([(a, 64, True), (b, 32, True)])
    ring.q.publish()
    assert ring.pop_ok() == ([], [(a, 64), (b, 32)])


def test_indirect_chain(ring: Ring) -> None:
    bufs = [(ring.buf(16), 16, False), (ring.buf(200, 1), 200, True), (ring.buf(1), 1, True)]
    head = ring.q.add_chain(bufs, indirect=True)
    ring.q.publish()
    assert ring.pop_ok() == ([(bufs[0][0], 16)], [(bufs[1][0], 200), (bufs[2][0], 1)])
    c = ring.chain
    assert (c.head, c.n_out, c.n_in, c.out_bytes, c.in_bytes) == (head, 1, 2, 16, 201)


def test_direct_descriptors_before_an_indirect_one(ring: Ring) -> None:
    a, b, c, d = ring.buf(10), ring.buf(20), ring.buf(30, 1), ring.buf(40)
    table = ring.table([(c, 30, NEXT, 1), (d, 40, WRITE, 0)])
    ring.descs(
        {
            5: (a, 10, NEXT, 2),
            2: (b, 20, NEXT, 7),
            7: (table, 2 * DESC_SIZE, INDIRECT, 0),
        }
    )
    ring.offer(5)
    assert ring.pop_ok() == ([(a, 10), (b, 20), (c, 30)], [(d, 40)])
    assert ring.chain.head == 5


def test_write_flag_on_the_indirect_descriptor_is_ignored(ring: Ring) -> None:
    # virtio 1.2 2.7.5.3.2: the device MUST ignore WRITE on the descriptor naming a table.
    a, b, c = ring.buf(10), ring.buf(20), ring.buf(30)
    table = ring.table([(b, 20, NEXT, 1), (c, 30, WRITE, 0)])
    ring.descs({0: (a, 10, NEXT, 1), 1: (table, 2 * DESC_SIZE, INDIRECT | WRITE, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 10), (b, 20)], [(c, 30)])


def test_zero_length_descriptors_are_skipped(ring: Ring) -> None:
    a, b = ring.buf(16), ring.buf(8)
    ring.descs(
        {
            0: (1 << 63, 0, NEXT, 1),  # nowhere, but empty: not even the address is looked at
            1: (a, 16, NEXT, 2),
            2: (ring.ram.layout[0].end + 0x1000, 0, WRITE | NEXT, 3),  # in the gap, empty
            3: (b, 8, WRITE | NEXT, 4),
            4: (0, 0, WRITE, 0),
        }
    )
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 16)], [(b, 8)])
    c = ring.chain
    assert (c.n_out, c.n_in, c.out_bytes, c.in_bytes) == (1, 1, 16, 8)


def test_chain_of_only_empty_descriptors(ring: Ring) -> None:
    ring.descs({0: (0, 0, NEXT, 1), 1: (0, 0, WRITE, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([], [])


def test_unknown_flag_bits_are_ignored(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs({0: (a, 16, 0xFFF8 | NEXT, 1), 1: (a, 16, 0x8000 | WRITE, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 16)], [(a, 16)])


def test_index_wraps_at_16_bits(make: Callable[..., Ring]) -> None:
    base = 65530
    ring = make(num=8, base=base)
    out, into = ring.buf(64), ring.buf(32, 1)
    for i in range(20):
        head = ring.q.add_chain([(out, 64, False), (into, 32, True)])
        ring.q.publish()
        assert lib.vu_vq_avail_count(ring.vq) == 1
        assert ring.pop_ok() == ([(out, 64)], [(into, 32)])
        assert ring.chain.head == head
        assert ring.vq.last_avail_idx == (base + i + 1) & 0xFFFF
        ring.push(head, 32)
        ring.flush()
        assert ring.q.get_used() == [(head, 32)]
    assert ring.q.used_idx() == ring.vq.used_idx == (base + 20) & 0xFFFF


def test_full_batch_across_the_wrap(make: Callable[..., Ring]) -> None:
    base = 65532
    ring = make(num=8, base=base)
    bufs = [ring.buf(16) for _ in range(8)]
    heads = [ring.q.add_chain([(b, 16, False)]) for b in bufs]
    ring.q.publish()
    assert ring.q.published_avail_idx() == 4
    assert lib.vu_vq_avail_count(ring.vq) == 8
    for head, b in zip(heads, bufs, strict=True):
        assert ring.pop_ok() == ([(b, 16)], [])
        assert ring.chain.head == head
    assert lib.vu_vq_avail_count(ring.vq) == 0
    for head in reversed(heads):
        ring.push(head, 0)
    ring.flush()
    assert ring.q.get_used() == [(h, 0) for h in reversed(heads)]


# --- queue set-up --------------------------------------------------------------------------


@pytest.mark.parametrize("num", [1, 2, 256, 1024])
def test_valid_queue_sizes(make: Callable[..., Ring], num: int) -> None:
    ring = make(num=num)
    b = ring.buf(16)
    heads = [ring.q.add_chain([(b, 16, k % 2 == 1)]) for k in range(num)]
    ring.q.publish()
    assert sorted(heads) == list(range(num))  # every descriptor, the last one included
    assert lib.vu_vq_avail_count(ring.vq) == num
    for head in heads:
        ring.pop_ok()
        assert ring.chain.head == head
    assert lib.vu_vq_avail_count(ring.vq) == 0


@pytest.mark.parametrize("num", [0, 3, 6, 1023, 1025, 2048, 1 << 31])
def test_invalid_queue_sizes(ring: Ring, num: int) -> None:
    assert ring.setup(num=num) == -15


@pytest.mark.parametrize("part, delta", [("desc", 8), ("desc", 2), ("avail", 1), ("used", 2)])
def test_misaligned_rings_are_refused(ring: Ring, part: str, delta: int) -> None:
    uva = ring.uva(getattr(ring.q, f"{part}_gpa")) + delta
    assert ring.setup_ring(part, uva) == -14
    assert ring.setup_ring(part, uva - delta) == 0


@pytest.mark.parametrize("part", ["desc", "avail", "used"])
@pytest.mark.parametrize("where", ["below", "above", "gpa", "across regions"])
def test_unmapped_rings_are_refused(ring: Ring, part: str, where: str) -> None:
    r0 = ring.ram.layout[0]
    uva = {
        "below": GuestRam.UVA_BASE - 0x1000,
        "above": GuestRam.UVA_BASE + ring.ram.size,
        "gpa": getattr(ring.q, f"{part}_gpa"),  # a guest address is not a front-end one
        "across regions": r0.uva + r0.size - 16,  # uva-contiguous, but two regions
    }[where]
    assert ring.setup_ring(part, uva) == -14


@pytest.mark.parametrize(
    "part, size",
    [("desc", 16 * 8), ("avail", 6 + 2 * 8), ("used", 6 + 8 * 8)],  # incl. used/avail_event
)
def test_ring_must_fit_before_the_region_end(ring: Ring, part: str, size: int) -> None:
    r1 = ring.ram.layout[1]
    align = {"desc": 16, "avail": 2, "used": 4}[part]
    end = r1.uva + r1.size
    fits = (end - size) // align * align
    assert ring.setup_ring(part, fits) == 0
    assert ring.setup_ring(part, fits + align) == -14


# --- every walker error ------------------------------------------------------------------


@pytest.mark.parametrize("head", [8, 9, 0x7FFF, 0xFFFF])
def test_head_out_of_range(ring: Ring, head: int) -> None:
    ring.offer(head)
    ring.refused(E.HEAD, head=head, detail=head)


def test_next_out_of_range(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs({0: (a, 16, NEXT, 1), 1: (a, 16, NEXT, 8)})
    ring.offer(0)
    ring.refused(E.NEXT, head=0, detail=8)


def test_next_without_the_flag_is_not_followed(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs({0: (a, 16, 0, 0xFFFF)})
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 16)], [])


@pytest.mark.parametrize("bad_next", [2, 5, 7, 0xFFFF])  # < num (8) is not enough in a table
def test_next_out_of_range_inside_indirect(ring: Ring, bad_next: int) -> None:
    a = ring.buf(16)
    table = ring.table([(a, 16, NEXT, 1), (a, 16, NEXT, bad_next)])
    ring.descs({3: (table, 2 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(3)
    ring.refused(E.NEXT, head=3, detail=bad_next)


ADDR_CASES = [
    "outside memory",
    "below region 1",
    "in the gap",
    "crossing region 0 end",
    "crossing region 1 end",
    "starting one past the end",
    "past 2**64",
    "past 2**64 by one",
    "ending at 2**64",
    "length 2**32-1",
]


def _addr_cases(ram: GuestRam) -> dict[str, tuple[int, int]]:
    r0, r1 = ram.layout
    return {
        "outside memory": (1 << 63, 16),
        "below region 1": (r1.gpa - 16, 8),
        "in the gap": (r0.end + 0x1000, 16),
        "crossing region 0 end": (r0.end - 8, 16),
        "crossing region 1 end": (r1.end - 1, 2),
        "starting one past the end": (r1.end, 1),
        "past 2**64": (U64 - 8, 16),
        "past 2**64 by one": (U64 - 0x1000, 0x1001),
        "ending at 2**64": (U64 - 16, 16),
        "length 2**32-1": (r0.gpa, 0xFFFF_FFFF),
    }


@pytest.mark.parametrize("case", ADDR_CASES)
@pytest.mark.parametrize("writable", [False, True])
def test_buffer_outside_guest_memory(ring: Ring, case: str, writable: bool) -> None:
    addr, length = _addr_cases(ring.ram)[case]
    good = ring.buf(16)
    flags = WRITE if writable else 0
    ring.descs({0: (good, 16, NEXT | flags, 1), 1: (addr, length, flags, 0)})
    ring.offer(0)
    ring.refused(E.ADDR, head=0, detail=addr)


def test_buffer_ending_at_region_end_is_fine(ring: Ring) -> None:
    r0, r1 = ring.ram.layout
    ring.descs({0: (r0.end - 16, 16, NEXT, 1), 1: (r1.gpa, r1.size, WRITE, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([(r0.end - 16, 16)], [(r1.gpa, r1.size)])


def test_loop_on_itself(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs({4: (a, 16, NEXT, 4)})
    ring.offer(4)
    ring.refused(E.LOOP, head=4, detail=4)


def test_loop_of_two(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs({0: (a, 16, NEXT, 1), 1: (a, 16, NEXT, 0)})
    ring.offer(0)
    # eight reads (the table size) are allowed; the ninth would be descriptor 0 again
    ring.refused(E.LOOP, head=0, detail=0)


def test_loop_back_to_the_head(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs({0: (a, 16, NEXT, 1), 1: (a, 16, NEXT, 2), 2: (a, 16, NEXT, 0)})
    ring.offer(0)
    ring.refused(E.LOOP, head=0, detail=2)  # reads 0,1,2,0,1,2,0,1 then 2 is one too many


def test_longest_chain_without_a_loop(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs({i: (a, 16, NEXT, i + 1) for i in range(7)} | {7: (a, 16, 0, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 16)] * 8, [])


def test_loop_inside_an_indirect_table(ring: Ring) -> None:
    a = ring.buf(16)
    table = ring.table([(a, 16, NEXT, 1), (a, 16, NEXT, 2), (a, 16, NEXT, 1)])
    ring.descs({6: (table, 3 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(6)
    ring.refused(E.LOOP, head=6, detail=1)  # reads 0,1,2,1 -- one more than the 3 entries


def test_indirect_table_longer_than_the_queue(ring: Ring) -> None:
    a = ring.buf(16)
    table = ring.table([(a, 16, 0, 0)] * 9)  # num + 1 entries, only the first one used
    ring.descs({0: (table, 9 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    ring.refused(E.CHAIN_TOO_LONG, head=0, detail=9 * DESC_SIZE)


def test_indirect_table_as_long_as_the_queue(ring: Ring) -> None:
    a = ring.buf(16)
    table = ring.table([(a, 16, NEXT, k + 1) for k in range(7)] + [(a, 16, WRITE, 0)])
    ring.descs({0: (table, 8 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 16)] * 7, [(a, 16)])


@pytest.mark.parametrize(
    "prefix, entries, ok", [(2, 6, True), (3, 6, False), (7, 2, False), (7, 1, True)]
)
def test_direct_prefix_and_indirect_table_together(
    ring: Ring, prefix: int, entries: int, ok: bool
) -> None:
    # The chain may hold num (8) buffers in all; the descriptor naming the table is not one.
    a = ring.buf(16)
    table = ring.table([(a, 16, NEXT, k + 1) for k in range(entries - 1)] + [(a, 16, 0, 0)])
    ring.descs(
        {i: (a, 16, NEXT, i + 1) for i in range(prefix)}
        | {prefix: (table, entries * DESC_SIZE, INDIRECT, 0)}
    )
    ring.offer(0)
    if ok:
        assert ring.pop_ok() == ([(a, 16)] * (prefix + entries), [])
    else:
        ring.refused(E.CHAIN_TOO_LONG, head=0)


def test_loop_in_indirect_table_behind_a_prefix_counts_as_too_long(ring: Ring) -> None:
    # The order of checks decides: the buffer count (num in all) runs out before the
    # table's own read budget (its 4 entries) does.
    a = ring.buf(16)
    table = ring.table([(a, 16, NEXT, 0)] * 4)
    ring.descs(
        {i: (a, 16, NEXT, i + 1) for i in range(6)} | {6: (table, 4 * DESC_SIZE, INDIRECT, 0)}
    )
    ring.offer(0)
    ring.refused(E.CHAIN_TOO_LONG, head=0)


def test_nested_indirect(ring: Ring) -> None:
    a = ring.buf(16)
    inner = ring.table([(a, 16, 0, 0)])
    outer = ring.table([(a, 16, NEXT, 1), (inner, DESC_SIZE, INDIRECT, 0)])
    ring.descs({0: (outer, 2 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    ring.refused(E.INDIRECT_NESTED, head=0)


@pytest.mark.parametrize("length", [0, 8, 17, 31, DESC_SIZE + 1])
def test_indirect_table_length(ring: Ring, length: int) -> None:
    table = ring.table([(ring.buf(16), 16, 0, 0)] * 2)
    ring.descs({0: (table, length, INDIRECT, 0)})
    ring.offer(0)
    ring.refused(E.INDIRECT_LEN, head=0, detail=length)


def test_indirect_table_outside_guest_memory(ring: Ring) -> None:
    r0, r1 = ring.ram.layout
    for addr, entries in [
        (r0.end + 0x1000, 1),
        (r0.end - DESC_SIZE, 2),
        (r1.end - 8, 1),
        (1 << 63, 4),
        (U64 - DESC_SIZE, 2),
    ]:
        ring.descs({0: (addr, entries * DESC_SIZE, INDIRECT, 0)})
        ring.offer(0)
        ring.refused(E.INDIRECT_ADDR, head=0, detail=addr)


def test_indirect_table_at_a_region_end_is_fine(ring: Ring) -> None:
    r1 = ring.ram.layout[1]
    a = ring.buf(16)
    table = r1.end - 2 * DESC_SIZE
    ring.ram.pack("<QIHHQIHH", table, a, 16, NEXT, 1, a, 16, WRITE, 0)
    ring.descs({0: (table, 2 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 16)], [(a, 16)])


def test_readable_after_writable(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs(
        {
            0: (a, 16, NEXT, 5),
            5: (a, 16, WRITE | NEXT, 2),
            2: (a, 16, NEXT, 3),
            3: (a, 16, WRITE, 0),
        }
    )
    ring.offer(0)
    ring.refused(E.DIRECTION, head=0, detail=2)


def test_empty_readable_after_writable_is_still_wrong(ring: Ring) -> None:
    a = ring.buf(16)
    ring.descs({0: (a, 16, WRITE | NEXT, 1), 1: (0, 0, 0, 0)})
    ring.offer(0)
    ring.refused(E.DIRECTION, head=0, detail=1)


def test_readable_after_writable_inside_indirect(ring: Ring) -> None:
    a = ring.buf(16)
    table = ring.table([(a, 16, WRITE | NEXT, 1), (a, 16, 0, 0)])
    ring.descs({0: (table, 2 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    ring.refused(E.DIRECTION, head=0, detail=1)


def test_readable_in_table_after_writable_prefix(ring: Ring) -> None:
    a = ring.buf(16)
    table = ring.table([(a, 16, 0, 0)])
    ring.descs({0: (a, 16, WRITE | NEXT, 1), 1: (table, DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    ring.refused(E.DIRECTION, head=0, detail=0)  # index 0 of the table


def test_indirect_with_next(ring: Ring) -> None:
    a = ring.buf(16)
    table = ring.table([(a, 16, 0, 0)])
    ring.descs({0: (table, DESC_SIZE, INDIRECT | NEXT, 1), 1: (a, 16, 0, 0)})
    ring.offer(0)
    ring.refused(E.INDIRECT_NEXT, head=0)


def test_indirect_without_the_feature(make: Callable[..., Ring]) -> None:
    ring = make(indirect=False)
    a = ring.buf(16)
    ring.q.add_chain([(a, 16, False), (a, 16, True)], indirect=True)
    ring.q.publish()
    ring.refused(E.INDIRECT_FEATURE, head=ring.chain.head)
    # direct chains are fine without the feature
    ring.q.add_chain([(a, 16, False)])
    ring.q.publish()
    assert ring.pop_ok() == ([(a, 16)], [])


def test_indirect_feature_is_checked_before_the_table(make: Callable[..., Ring]) -> None:
    ring = make(indirect=False)
    ring.descs({0: (0, 0, INDIRECT | NEXT, 1)})  # also bad length and bad NEXT
    ring.offer(0)
    ring.refused(E.INDIRECT_FEATURE, head=0)


@pytest.mark.parametrize("base", [0, 100, 65530, 65535])
def test_avail_index_too_far_ahead_breaks_the_queue(make: Callable[..., Ring], base: int) -> None:
    ring = make(num=8, base=base)
    ring.q.set_avail_idx(base + 8)
    assert lib.vu_vq_avail_count(ring.vq) == 8  # a full ring is fine
    assert not ring.vq.broken
    for bad in [base + 9, base + 0x8000, base - 1]:
        ring.q.set_avail_idx(bad)
        assert lib.vu_vq_avail_count(ring.vq) == E.AVAIL_IDX
        assert ring.vq.broken == 1
        assert ring.vq.err.code == E.AVAIL_IDX
        assert ring.vq.err.detail == bad & 0xFFFF
    assert ring.vq.last_avail_idx == base  # nothing was taken


# --- TOO_MANY_IOV and regions that meet in guest-physical space --------------------------


def test_buffer_across_adjacent_regions_is_split(make: Callable[..., Ring]) -> None:
    ring = make(regions=1, extra=adjacent_regions())
    ring.descs({0: (ADJ_GPA + PIECE - 0x10, 0x20, WRITE, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([], [(ADJ_GPA + PIECE - 0x10, 0x10), (ADJ_GPA + PIECE, 0x10)])
    assert (ring.chain.n_in, ring.chain.in_bytes) == (2, 0x20)


def test_indirect_table_across_adjacent_regions_is_refused(make: Callable[..., Ring]) -> None:
    ring = make(regions=1, extra=adjacent_regions())
    addr = ADJ_GPA + PIECE - DESC_SIZE
    ring.descs({0: (addr, 2 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    ring.refused(E.INDIRECT_ADDR, head=0, detail=addr)


def test_too_many_iovecs(make: Callable[..., Ring]) -> None:
    ring = make(num=128, regions=1, extra=adjacent_regions())
    span = ADJ_COUNT * PIECE  # one descriptor over all 31 regions: 31 iovecs
    full = 66  # 66 * 31 = 2046 iovecs
    assert full * ADJ_COUNT + 2 == lib.VU_MAX_CHAIN_IOV
    ring.descs({i: (ADJ_GPA, span, NEXT, i + 1) for i in range(full)})
    last = ADJ_GPA + PIECE // 2
    ring.descs({full: (last, PIECE, 0, 0)})  # 2 more: exactly the limit
    ring.offer(0)
    readable, _ = ring.pop_ok()
    assert len(readable) == ring.chain.n_out == lib.VU_MAX_CHAIN_IOV
    assert ring.chain.out_bytes == full * span + PIECE
    assert readable[-2:] == [(last, PIECE // 2), (ADJ_GPA + PIECE, PIECE // 2)]

    ring.descs({full: (last, PIECE // 2 + PIECE + 1, 0, 0)})  # 3 pieces: one too many
    ring.offer(0)
    ring.refused(E.TOO_MANY_IOV, head=0, detail=last)


def test_too_many_iovecs_in_an_indirect_table(make: Callable[..., Ring]) -> None:
    ring = make(num=128, regions=1, extra=adjacent_regions())
    table = ring.table(
        [(ADJ_GPA, ADJ_COUNT * PIECE, WRITE | NEXT, k + 1) for k in range(66)]
        + [(ADJ_GPA, 3 * PIECE, WRITE, 0)]
    )
    ring.descs({9: (table, 67 * DESC_SIZE, INDIRECT, 0)})
    ring.offer(9)
    ring.refused(E.TOO_MANY_IOV, head=9, detail=ADJ_GPA)


# --- the queue goes on after a bad chain ----------------------------------------------------

BadChain = Callable[[Ring], E]


def _bad_head(r: Ring) -> E:
    r.offer(200)
    return E.HEAD


def _bad_next(r: Ring) -> E:
    r.descs({0: (r.buf(8), 8, NEXT, 9)})
    r.offer(0)
    return E.NEXT


def _bad_addr(r: Ring) -> E:
    r.descs({0: (r.ram.layout[0].end - 4, 8, 0, 0)})
    r.offer(0)
    return E.ADDR


def _loop(r: Ring) -> E:
    r.descs({0: (r.buf(8), 8, NEXT, 0)})
    r.offer(0)
    return E.LOOP


def _direction(r: Ring) -> E:
    a = r.buf(8)
    r.descs({0: (a, 8, WRITE | NEXT, 1), 1: (a, 8, 0, 0)})
    r.offer(0)
    return E.DIRECTION


def _nested(r: Ring) -> E:
    t = r.table([(r.table([(r.buf(8), 8, 0, 0)]), DESC_SIZE, INDIRECT, 0)])
    r.descs({0: (t, DESC_SIZE, INDIRECT, 0)})
    r.offer(0)
    return E.INDIRECT_NESTED


def _indirect_len(r: Ring) -> E:
    r.descs({0: (r.buf(32), 17, INDIRECT, 0)})
    r.offer(0)
    return E.INDIRECT_LEN


def _too_long(r: Ring) -> E:
    r.descs({0: (r.table([(r.buf(8), 8, 0, 0)] * 9), 9 * DESC_SIZE, INDIRECT, 0)})
    r.offer(0)
    return E.CHAIN_TOO_LONG


def test_bad_head_breaks_the_ring(ring: Ring) -> None:
    """A head outside the table means the avail ring itself is garbage (Linux vhost and
    libvhost-user stop the queue too): nothing after it is taken."""
    code = _bad_head(ring)
    ring.descs({6: (ring.buf(40, 1), 40, 0, 0)})
    ring.offer(6)
    ring.refused(code)
    assert ring.vq.broken


@pytest.mark.parametrize(
    "bad", [_bad_next, _bad_addr, _loop, _direction, _nested, _indirect_len, _too_long]
)
def test_good_chain_after_a_bad_one(ring: Ring, bad: BadChain) -> None:
    code = bad(ring)
    good_out, good_in = ring.buf(40, 1), ring.buf(50)
    ring.descs({6: (good_out, 40, NEXT, 7), 7: (good_in, 50, WRITE, 0)})
    ring.offer(6)
    assert lib.vu_vq_avail_count(ring.vq) == 2
    ring.refused(code)
    assert lib.vu_vq_avail_count(ring.vq) == 1
    assert ring.pop_ok() == ([(good_out, 40)], [(good_in, 50)])
    c = ring.chain
    assert (c.head, c.n_out, c.n_in, c.out_bytes, c.in_bytes) == (6, 1, 1, 40, 50)
    assert not ring.vq.broken


# --- used ring --------------------------------------------------------------------------


@pytest.mark.parametrize("base", [0, 65534])
def test_push_and_flush(make: Callable[..., Ring], base: int) -> None:
    ring = make(num=4, base=base)
    ring.push(3, 77)
    assert ring.q.read_used_elem(base % 4) == (3, 77)
    assert ring.q.used_idx() == base  # not published yet
    assert ring.vq.used_idx == (base + 1) & 0xFFFF
    ring.flush()
    assert ring.q.used_idx() == (base + 1) & 0xFFFF
    ring.push(0, 1)
    ring.push(2, 0xFFFF_FFFF)
    assert ring.q.used_idx() == (base + 1) & 0xFFFF
    ring.flush()
    assert ring.q.used_idx() == (base + 3) & 0xFFFF
    assert [ring.q.read_used_elem((base + k) % 4) for k in range(3)] == [
        (3, 77),
        (0, 1),
        (2, 0xFFFF_FFFF),
    ]


def test_used_ring_position_wraps_with_the_ring(make: Callable[..., Ring]) -> None:
    ring = make(num=2, base=65535)
    for k in range(5):
        ring.push(k % 2, k)
        ring.flush()
        assert ring.q.read_used_elem((65535 + k) % 2) == (k % 2, k)
        assert ring.q.used_idx() == (65535 + k + 1) & 0xFFFF


# --- event idx ------------------------------------------------------------------------------


def need_event(event: int, new: int, old: int) -> bool:
    """The spec's rule, said differently: entry ``event`` was written in [old, new)."""
    return (event - old) & 0xFFFF < (new - old) & 0xFFFF


@pytest.mark.parametrize(
    "event, new, old, expected",
    [
        (0, 1, 0, True),  # the entry at 0 was just written
        (1, 1, 0, False),  # not yet
        (0, 2, 1, False),  # crossed earlier, not in this batch
        (5, 10, 0, True),
        (9, 10, 0, True),
        (10, 10, 0, False),
        (0, 0, 0, False),  # nothing new
        (65535, 0, 65535, True),  # across the wrap
        (65534, 1, 65535, False),
        (0, 1, 65535, True),
        (65535, 2, 65530, True),
        (3, 2, 65530, False),
        (100, 100, 100, False),
        (0x8000, 0x8001, 0, True),
    ],
)
def test_need_event_table(event: int, new: int, old: int, expected: bool) -> None:
    assert bool(lib.vu_need_event(event, new, old)) is expected
    assert need_event(event, new, old) is expected


def test_need_event_matches_the_rule() -> None:
    rng = random.Random(20240601)
    edges = [0, 1, 2, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF]
    triples = [(e, n, o) for e in edges for n in edges for o in edges]
    triples += [
        (rng.randrange(65536), rng.randrange(65536), rng.randrange(65536)) for _ in range(20000)
    ]
    for old in (0, 65530):  # small steps, as a device makes them
        for step in range(8):
            triples += [(e & 0xFFFF, (old + step) & 0xFFFF, old) for e in range(old - 3, old + 12)]
    for e, n, o in triples:
        assert bool(lib.vu_need_event(e, n, o)) is need_event(e, n, o), (e, n, o)


def test_no_event_idx_honours_no_interrupt(ring: Ring) -> None:
    ring.q.set_used_event(1000)  # ignored without event idx
    ring.push(0, 0)
    ring.flush()
    assert lib.vu_vq_should_signal(ring.vq) == 1
    ring.q.set_no_interrupt(True)
    ring.push(1, 0)
    ring.flush()
    assert lib.vu_vq_should_signal(ring.vq) == 0
    ring.q.set_no_interrupt(False)
    ring.push(2, 0)
    ring.flush()
    assert lib.vu_vq_should_signal(ring.vq) == 1


@pytest.mark.parametrize("base", [0, 65530])
def test_event_idx_signals_exactly_when_used_event_is_crossed(
    make: Callable[..., Ring], base: int
) -> None:
    ring = make(num=8, base=base, event_idx=True)
    ring.q.set_used_event((base - 100) & 0xFFFF)  # far away: still, the first time signals
    ring.q.set_no_interrupt(True)  # and the flag is ignored with event idx
    ring.push(0, 0)
    ring.flush()
    assert lib.vu_vq_should_signal(ring.vq) == 1
    used = (base + 1) & 0xFFFF
    event = (base + 6) & 0xFFFF  # "tell me after you wrote the entry at index base+6"
    ring.q.set_used_event(event)
    for _ in range(10):
        ring.push(0, 0)
        ring.flush()
        used = (used + 1) & 0xFFFF
        assert lib.vu_vq_should_signal(ring.vq) == (used == (event + 1) & 0xFFFF), used
    assert lib.vu_vq_should_signal(ring.vq) == 0  # nothing new since


def test_event_idx_crossed_inside_a_batch(make: Callable[..., Ring]) -> None:
    ring = make(num=8, base=65534, event_idx=True)
    ring.push(0, 0)
    ring.flush()
    assert lib.vu_vq_should_signal(ring.vq) == 1  # first: always
    ring.q.set_used_event(0)  # entry 65535 -> 0 -> 1 written below: 0 is inside
    for _ in range(3):
        ring.push(0, 0)
    ring.flush()
    assert lib.vu_vq_should_signal(ring.vq) == 1
    ring.q.set_used_event(0)  # already passed
    for _ in range(3):
        ring.push(0, 0)
    ring.flush()
    assert lib.vu_vq_should_signal(ring.vq) == 0


def test_event_idx_first_signal_after_setup_again(ring: Ring) -> None:
    assert ring.setup(event_idx=True) == 0
    ring.q.set_used_event(500)
    ring.push(0, 0)
    assert lib.vu_vq_should_signal(ring.vq) == 1
    ring.push(0, 0)
    assert lib.vu_vq_should_signal(ring.vq) == 0
    assert ring.setup(event_idx=True) == 0  # a restarted queue may have missed a call
    ring.push(0, 0)
    assert lib.vu_vq_should_signal(ring.vq) == 1


@pytest.mark.parametrize("base", [0, 65534])
def test_enable_notification_with_event_idx(make: Callable[..., Ring], base: int) -> None:
    ring = make(num=8, base=base, event_idx=True)
    a = ring.buf(8)
    for _ in range(2):
        ring.q.add_chain([(a, 8, False)])
    ring.q.publish()
    ring.pop_ok()
    ring.pop_ok()
    assert lib.vu_vq_enable_notification(ring.vq) == 0
    assert ring.q.avail_event() == (base + 2) & 0xFFFF == ring.vq.last_avail_idx
    for _ in range(3):
        ring.q.add_chain([(a, 8, False)])
    ring.q.publish()
    assert lib.vu_vq_enable_notification(ring.vq) == 3
    assert ring.q.avail_event() == (base + 2) & 0xFFFF
    assert ring.q.need_kick((base + 4) & 0xFFFF) is False  # the driver kicked long before
    ring.pop_ok()
    assert lib.vu_vq_enable_notification(ring.vq) == 2
    assert ring.q.avail_event() == (base + 3) & 0xFFFF
    ring.q.set_avail_idx(base + 3 + 9)
    assert lib.vu_vq_enable_notification(ring.vq) == E.AVAIL_IDX
    assert ring.vq.broken == 1


def test_enable_notification_without_event_idx(ring: Ring) -> None:
    ring.ram.write_u16(ring.q.used_gpa + 4 + 8 * ring.num, 0xBEEF)
    assert lib.vu_vq_enable_notification(ring.vq) == 0
    a = ring.buf(8)
    ring.q.add_chain([(a, 8, False)])
    ring.q.publish()
    assert lib.vu_vq_enable_notification(ring.vq) == 1
    assert ring.q.avail_event() == 0xBEEF  # not written without the feature
    assert ring.q.used_flags() == 0  # and notifications never disabled


# --- giving chains back (vu_vq_discard) ---------------------------------------------------


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "inflight"])
def test_discard_gives_the_newest_chains_back(make: Callable[..., Ring], tracked: bool) -> None:
    """Discarding n chains moves last_avail_idx back by n, so the next pops take the same
    heads again; with inflight tracking their marks are cleared (they never started),
    while the chain taken before them stays marked."""
    ring = make(num=8)
    b = ring.buf(16)
    heads = [ring.q.add_chain([(b, 16, True)]) for _ in range(3)]
    ring.q.publish()
    region = None
    if tracked:
        size = int(lib.vu_inflight_queue_size(ring.num))
        raw = ffi.new("char[]", size)
        assert lib.vu_vq_set_inflight(ring.vq, raw, size) == 0
        region = ffi.cast("struct vu_inflight_split *", raw)
    for _ in heads:
        ring.pop_ok()
    chains_before = ring.vq.stats.chains
    lib.vu_vq_discard(ring.vq, 0)  # nothing: nothing moves
    assert ring.vq.last_avail_idx == 3
    lib.vu_vq_discard(ring.vq, 2)
    assert ring.vq.last_avail_idx == 1
    assert ring.vq.stats.chains == chains_before - 2
    if region is not None:
        assert [region.desc[h].inflight for h in heads] == [1, 0, 0]
    for head in heads[1:]:
        ring.pop_ok()
        assert ring.chain.head == head
    if region is not None:
        assert [region.desc[h].inflight for h in heads] == [1, 1, 1]
