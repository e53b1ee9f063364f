"""GuestMemory and the C memory map under it (c_ext/memory.c): region bookkeeping and
bounds-checked translation of guest-physical and front-end-virtual addresses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, cast

import pytest

from tests.support.frontend import GuestRam, RamRegion
from vhost._native import ffi, lib
from vhost.memory import MAX_REGIONS, GuestMemory, GuestMemoryError, Region

KiB = 1 << 10
ERR_ADDR = -4
ERR_TOO_MANY_IOV = -11
ERR_REGION_OVERLAP = -16
ERR_REGION_FULL = -17
ERR_REGION_BAD = -18
ERR_REGION_NOT_FOUND = -19
ERR_MMAP = -20


def as_region(r: RamRegion) -> Region:
    return Region(
        guest_phys_addr=r.gpa, memory_size=r.size, userspace_addr=r.uva, mmap_offset=r.mmap_offset
    )


def nregions(mem: GuestMemory) -> int:
    return int(cast(Any, mem.handle).nregions)


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    with GuestRam(size=2 * 64 * KiB, regions=2) as r:
        yield r


@pytest.fixture
def mem(ram: GuestRam) -> Iterator[GuestMemory]:
    m = GuestMemory()
    for r in ram.layout:
        m.add(as_region(r), ram.fd)
    yield m
    m.close()


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-memory", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * KiB)
    yield fd
    os.close(fd)


@pytest.fixture
def empty() -> Iterator[GuestMemory]:
    m = GuestMemory()
    yield m
    m.close()


# --- translation at the edges -----------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1])
def test_first_and_last_byte_of_a_region(ram: GuestRam, mem: GuestMemory, k: int) -> None:
    r = ram.layout[k]
    host = mem.translate_gpa(r.gpa, 1)
    assert mem.translate_gpa(r.end - 1, 1) == host + r.size - 1
    assert mem.translate_gpa(r.gpa, r.size) == host  # the whole region is one range


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("case", ["one past the end", "crossing the end", "longer than region"])
def test_ranges_leaving_a_region_are_refused(
    ram: GuestRam, mem: GuestMemory, k: int, case: str
) -> None:
    r = ram.layout[k]
    gpa, n = {
        "one past the end": (r.end, 1),
        "crossing the end": (r.end - 4, 8),
        "longer than region": (r.gpa, r.size + 1),
    }[case]
    with pytest.raises(GuestMemoryError, match="not in guest memory"):
        mem.translate_gpa(gpa, n)


def test_range_spanning_the_gap_is_refused(ram: GuestRam, mem: GuestMemory) -> None:
    r0, r1 = ram.layout
    assert r0.end < r1.gpa  # GuestRam leaves a hole between regions
    with pytest.raises(GuestMemoryError):
        mem.translate_gpa(r0.gpa, r1.end - r0.gpa)
    with pytest.raises(GuestMemoryError):
        mem.translate_gpa(r0.end + 4096, 1)  # inside the gap
    with pytest.raises(GuestMemoryError):
        mem.translate_gpa(r1.gpa - 1, 2)  # runs from the gap into region 1


def test_zero_length_range_needs_a_valid_start(ram: GuestRam, mem: GuestMemory) -> None:
    r = ram.layout[0]
    host = mem.translate_gpa(r.gpa, 1)
    assert mem.translate_gpa(r.gpa, 0) == host
    assert mem.translate_gpa(r.end - 1, 0) == host + r.size - 1
    with pytest.raises(GuestMemoryError):
        mem.translate_gpa(r.end, 0)
    with pytest.raises(GuestMemoryError):
        mem.translate_gpa(ram.layout[1].gpa - 1, 0)


def test_huge_lengths_do_not_wrap(ram: GuestRam, mem: GuestMemory) -> None:
    r = ram.layout[0]
    for gpa, n in [(r.gpa + 1, 2**64 - 1), (r.gpa, 2**64 - 1), (2**64 - 1, 1), (2**64 - 1, 2)]:
        with pytest.raises(GuestMemoryError):
            mem.translate_gpa(gpa, n)
    assert lib.vu_gpa_to_host(mem.handle, r.end - 1, 2**64 - 1) == ffi.NULL
    for gpa, n in [(-1, 1), (0, -1), (2**64, 1), (0, 2**64)]:
        with pytest.raises(GuestMemoryError, match="out of range"):
            mem.translate_gpa(gpa, n)


@pytest.mark.parametrize("k", [0, 1])
def test_uva_and_gpa_translate_to_the_same_place(ram: GuestRam, mem: GuestMemory, k: int) -> None:
    r = ram.layout[k]
    for off, n in [(0, 1), (1, 7), (r.size - 1, 1), (0, r.size)]:
        assert mem.translate_uva(r.uva + off, n) == mem.translate_gpa(r.gpa + off, n)
    with pytest.raises(GuestMemoryError, match="front-end virtual"):
        mem.translate_uva(r.uva + r.size - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.translate_uva(r.gpa, 1)  # a gpa is not a uva
    with pytest.raises(GuestMemoryError):
        mem.translate_gpa(r.uva, 1)  # nor the other way round


def test_uva_ranges_of_two_regions_do_not_merge(ram: GuestRam, mem: GuestMemory) -> None:
    r0, r1 = ram.layout
    assert r0.uva + r0.size == r1.uva  # contiguous in the front end's address space
    with pytest.raises(GuestMemoryError):
        mem.translate_uva(r1.uva - 8, 16)


# --- data goes where it should ------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1])
def test_writes_through_guest_memory_reach_the_memfd(
    ram: GuestRam, mem: GuestMemory, k: int
) -> None:
    r = ram.layout[k]
    data = bytes(range(256)) * 3
    mem.write(r.gpa + 100, data)
    assert ram.read(r.gpa + 100, len(data)) == data
    assert os.pread(ram.fd, len(data), r.mmap_offset + 100) == data
    ram.write(r.end - 5, b"tail!")
    assert mem.read(r.end - 5, 5) == b"tail!"
    host = mem.translate_gpa(r.end - 5, 5)
    assert ffi.buffer(ffi.cast("char *", host), 5)[:] == b"tail!"


# --- region bookkeeping -----------------------------------------------------------------


@pytest.mark.parametrize(
    "gpa, size",
    [
        (0x10000, 0x1000),  # identical
        (0x10800, 0x1000),  # starts inside
        (0x0F800, 0x1000),  # ends inside
        (0x0F000, 0x3000),  # contains it
        (0x10400, 0x0100),  # inside it
        (0x10FFF, 1),  # its last byte
    ],
)
def test_overlapping_regions_are_refused(
    empty: GuestMemory, memfd: int, gpa: int, size: int
) -> None:
    empty.add(Region(0x10000, 0x1000, 0x7000_0000, 0), memfd)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        empty.add(Region(gpa, size, 0x8000_0000, 0), memfd)
    assert lib.vu_mem_add(empty.handle, gpa, size, 0x8000_0000, 0, memfd) == ERR_REGION_OVERLAP
    assert len(empty.regions) == 1
    assert nregions(empty) == 1


def test_adjacent_regions_are_accepted(empty: GuestMemory, memfd: int) -> None:
    empty.add(Region(0x10000, 0x1000, 0x7000_0000, 0), memfd)
    empty.add(Region(0x11000, 0x1000, 0x7000_1000, 0x1000), memfd)
    empty.add(Region(0x0F000, 0x1000, 0x7000_2000, 0x2000), memfd)
    assert nregions(empty) == 3


def test_region_table_holds_exactly_max_regions(empty: GuestMemory, memfd: int) -> None:
    assert MAX_REGIONS == 32
    for k in range(MAX_REGIONS):
        empty.add(Region(k * 0x2000, 0x1000, 0x7000_0000 + k * 0x2000, 0), memfd)
    with pytest.raises(GuestMemoryError, match="no free slot"):
        empty.add(Region(0x100_0000, 0x1000, 0x9000_0000, 0), memfd)
    rc = lib.vu_mem_add(empty.handle, 0x100_0000, 0x1000, 0x9000_0000, 0, memfd)
    assert rc == ERR_REGION_FULL
    assert empty.translate_gpa(31 * 0x2000, 0x1000)  # the 32nd is usable


@pytest.mark.parametrize(
    "gpa, size, uva, offset",
    [
        (0x10000, 0, 0x7000_0000, 0),  # zero size
        (2**64 - 0x1000, 0x2000, 0x7000_0000, 0),  # gpa range wraps
        (0x10000, 0x2000, 2**64 - 0x1000, 0),  # uva range wraps
        (0x10000, 0x2000, 0x7000_0000, 2**64 - 0x1000),  # file range wraps
    ],
)
def test_bad_regions_are_refused(
    empty: GuestMemory, memfd: int, gpa: int, size: int, uva: int, offset: int
) -> None:
    with pytest.raises(GuestMemoryError, match="zero size or wraps"):
        empty.add(Region(gpa, size, uva, offset), memfd)
    assert lib.vu_mem_add(empty.handle, gpa, size, uva, offset, memfd) == ERR_REGION_BAD
    assert nregions(empty) == 0


def test_region_ending_at_top_of_address_space_is_accepted(empty: GuestMemory, memfd: int) -> None:
    empty.add(Region(2**64 - 0x1000, 0x1000, 0x7000_0000, 0), memfd)
    assert empty.translate_gpa(2**64 - 1, 1) == empty.translate_gpa(2**64 - 0x1000, 1) + 0xFFF
    with pytest.raises(GuestMemoryError):
        empty.translate_gpa(2**64 - 1, 2)


def test_mmap_failure_is_reported(empty: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="mmap"):
        empty.add(Region(0, 0x1000, 0x7000_0000, 0), -1)
    assert lib.vu_mem_add(empty.handle, 0, 0x1000, 0x7000_0000, 0, -1) == ERR_MMAP
    assert nregions(empty) == 0


def test_remove_then_translate_fails(ram: GuestRam, mem: GuestMemory) -> None:
    r0, r1 = ram.layout
    mem.remove(as_region(r1))
    with pytest.raises(GuestMemoryError):
        mem.translate_gpa(r1.gpa, 1)
    with pytest.raises(GuestMemoryError):
        mem.translate_uva(r1.uva, 1)
    assert mem.regions == [as_region(r0)]
    ram.write(r0.gpa + 8, b"still here")
    assert mem.read(r0.gpa + 8, 10) == b"still here"
    with pytest.raises(GuestMemoryError, match="does not match"):
        mem.remove(as_region(r1))
    assert lib.vu_mem_remove(mem.handle, r1.gpa, r1.size, r1.uva) == ERR_REGION_NOT_FOUND


def test_remove_needs_an_exact_match(ram: GuestRam, mem: GuestMemory) -> None:
    r0 = ram.layout[0]
    for gpa, size, uva in [(r0.gpa, r0.size - 1, r0.uva), (r0.gpa, r0.size, r0.uva + 1)]:
        assert lib.vu_mem_remove(mem.handle, gpa, size, uva) == ERR_REGION_NOT_FOUND
    assert nregions(mem) == 2


def test_remove_keeps_the_other_regions_right(empty: GuestMemory, memfd: int) -> None:
    regions = [Region(k * 0x10000, 0x1000, 0x7000_0000 + k * 0x1000, k * 0x1000) for k in range(4)]
    for k, r in enumerate(regions):
        empty.add(r, memfd)
        os.pwrite(memfd, bytes([0x10 + k]) * 0x1000, r.mmap_offset)
    empty.remove(regions[0])  # the last entry moves into the hole
    empty.remove(regions[2])
    assert empty.regions == [regions[1], regions[3]]
    for k in (1, 3):
        assert empty.read(regions[k].guest_phys_addr, 0x1000) == bytes([0x10 + k]) * 0x1000
        assert empty.translate_uva(regions[k].userspace_addr, 1) == empty.translate_gpa(
            regions[k].guest_phys_addr, 1
        )
    for k in (0, 2):
        with pytest.raises(GuestMemoryError):
            empty.translate_gpa(regions[k].guest_phys_addr, 1)


def test_clear_unmaps_everything(ram: GuestRam, mem: GuestMemory) -> None:
    mem.clear()
    assert mem.regions == [] and nregions(mem) == 0
    with pytest.raises(GuestMemoryError):
        mem.translate_gpa(0, 1)


# --- vu_gpa_to_iov: one range, several regions ---------------------------------------------

A_GPA, A_SIZE, A_OFF = 0x10000, 0x1000, 0x3000
B_GPA, B_SIZE, B_OFF = 0x11000, 0x2000, 0x0000  # adjacent to A in gpa, before it in the file


@pytest.fixture
def adjacent(empty: GuestMemory, memfd: int) -> GuestMemory:
    empty.add(Region(A_GPA, A_SIZE, 0x7000_0000, A_OFF), memfd)
    empty.add(Region(B_GPA, B_SIZE, 0x7100_0000, B_OFF), memfd)
    os.pwrite(memfd, b"A" * A_SIZE, A_OFF)
    os.pwrite(memfd, b"B" * B_SIZE, B_OFF)
    return empty


def to_iov(mem: GuestMemory, gpa: int, n: int, max_iov: int = 8) -> int | list[tuple[int, int]]:
    iov = ffi.new("struct iovec[]", max(max_iov, 1))
    rc = lib.vu_gpa_to_iov(mem.handle, gpa, n, iov, max_iov)
    if rc < 0:
        return int(rc)
    return [(int(ffi.cast("uintptr_t", iov[i].iov_base)), int(iov[i].iov_len)) for i in range(rc)]


def iov_bytes(iovs: list[tuple[int, int]]) -> bytes:
    return b"".join(ffi.buffer(ffi.cast("char *", base), n)[:] for base, n in iovs)


def test_gpa_to_iov_splits_where_regions_meet(adjacent: GuestMemory) -> None:
    iovs = to_iov(adjacent, B_GPA - 0x10, 0x20)
    assert iovs == [
        (adjacent.translate_gpa(B_GPA - 0x10, 0x10), 0x10),
        (adjacent.translate_gpa(B_GPA, 0x10), 0x10),
    ]
    assert isinstance(iovs, list) and iov_bytes(iovs) == b"A" * 0x10 + b"B" * 0x10
    # translate_gpa itself wants one region
    with pytest.raises(GuestMemoryError):
        adjacent.translate_gpa(B_GPA - 0x10, 0x20)


def test_gpa_to_iov_whole_span(adjacent: GuestMemory) -> None:
    iovs = to_iov(adjacent, A_GPA, A_SIZE + B_SIZE)
    assert iovs == [
        (adjacent.translate_gpa(A_GPA, A_SIZE), A_SIZE),
        (adjacent.translate_gpa(B_GPA, B_SIZE), B_SIZE),
    ]
    assert to_iov(adjacent, A_GPA + 5, 10) == [(adjacent.translate_gpa(A_GPA + 5, 10), 10)]


@pytest.mark.parametrize(
    "gpa, n, max_iov, expected",
    [
        (B_GPA - 0x10, 0x20, 1, ERR_TOO_MANY_IOV),  # needs two pieces, room for one
        (A_GPA, A_SIZE, 0, ERR_TOO_MANY_IOV),
        (A_GPA + 8, A_SIZE + B_SIZE, 8, ERR_ADDR),  # runs off the end of B
        (A_GPA - 1, 2, 8, ERR_ADDR),  # starts before A
        (B_GPA + B_SIZE, 1, 8, ERR_ADDR),
        (2**64 - 0x10, 0x20, 8, ERR_ADDR),  # wraps
        (A_GPA, 0, 8, []),  # nothing to map
        (0, 0, 8, []),  # not even a valid start needed
    ],
)
def test_gpa_to_iov_refusals(
    adjacent: GuestMemory, gpa: int, n: int, max_iov: int, expected: int | list[tuple[int, int]]
) -> None:
    assert to_iov(adjacent, gpa, n, max_iov) == expected


def test_gpa_to_iov_unmapped_piece_wins_over_full_iov(adjacent: GuestMemory) -> None:
    # One iovec of room, and the second piece would be unmapped: the unmapped byte is
    # found first (find_region runs before the count check).
    assert to_iov(adjacent, B_GPA + B_SIZE - 1, 2, 1) == ERR_ADDR
