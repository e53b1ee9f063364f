"""GuestMemory and the C memory map under it (c_ext/memory.c): region bookkeeping and
bounds-checked translation of guest-physical and front-end-virtual addresses."""

from __future__ import annotations

import mmap
import os
import random
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
ERR_REGION_ALIGN = -26


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
    assert MAX_REGIONS >= 256  # QEMU 7.2's x86 limit: one slot per hot-plugged DIMM
    for k in range(MAX_REGIONS):
        empty.add(Region(k * 0x2000, 0x1000, 0x7000_0000 + k * 0x2000, 0), memfd)
    with pytest.raises(GuestMemoryError, match="no free slot"):
        empty.add(Region(0x100_0000, 0x1000, 0x9000_0000, 0), memfd)
    rc = lib.vu_mem_add(empty.handle, 0x100_0000, 0x1000, 0x9000_0000, 0, memfd)
    assert rc == ERR_REGION_FULL
    assert empty.translate_gpa((MAX_REGIONS - 1) * 0x2000, 0x1000)  # the last is usable


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


# --- the sorted map: hundreds of regions, added and removed in any order -----------------

PAGE = 4096
MODEL_PAGES = 256  # file pages the model's regions map; each page starts with its offset


@pytest.fixture
def marked_memfd() -> Iterator[int]:
    """A memfd whose every page starts with its own file offset (8 bytes)."""
    fd = os.memfd_create("test-memory-marked", os.MFD_CLOEXEC)
    os.ftruncate(fd, MODEL_PAGES * PAGE)
    for k in range(MODEL_PAGES):
        os.pwrite(fd, (k * PAGE).to_bytes(8, "little"), k * PAGE)
    yield fd
    os.close(fd)


def _host(mem: GuestMemory, fn: Any, addr: int, n: int) -> int | None:
    ptr = fn(mem.handle, addr, n)
    return None if ptr == ffi.NULL else int(ffi.cast("uintptr_t", ptr))


def _word(host: int) -> int:
    return int.from_bytes(ffi.buffer(ffi.cast("char *", host), 8)[:], "little")


def _collide(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


def _check_against_model(mem: GuestMemory, model: list[Region], rng: random.Random) -> None:
    """Every translation the model predicts, at every region's edges and in the gaps."""
    assert nregions(mem) == len(model)
    for r in model:
        size = r.memory_size
        # the region's own pages: each page's marker is its file offset
        for d in sorted({0, size - PAGE, rng.randrange(0, size, PAGE)}):
            host = _host(mem, lib.vu_gpa_to_host, r.guest_phys_addr + d, PAGE)
            assert host is not None and _word(host) == r.mmap_offset + d, (r, d)
            assert _host(mem, lib.vu_uva_to_host, r.userspace_addr + d, PAGE) == host
        assert _host(mem, lib.vu_gpa_to_host, r.guest_phys_addr, size) is not None
        assert _host(mem, lib.vu_gpa_to_host, r.guest_phys_addr + size - 1, 1) is not None

    def in_model(addr: int, by_uva: bool) -> Region | None:
        for r in model:
            start = r.userspace_addr if by_uva else r.guest_phys_addr
            if start <= addr < start + r.memory_size:
                return r
        return None

    # the bytes just outside each region, and random ones, in both address spaces
    for by_uva, fn, base in ((False, lib.vu_gpa_to_host, 0), (True, lib.vu_uva_to_host, UVA0)):
        probes = [base + rng.randrange(0, 80 * PAGE) for _ in range(20)]
        for r in model:
            start = r.userspace_addr if by_uva else r.guest_phys_addr
            probes += [start - 1, start + r.memory_size]
        for addr in probes:
            if 0 <= addr < 2**64:
                expect = in_model(addr, by_uva) is not None
                assert (_host(mem, fn, addr, 1) is not None) == expect, (hex(addr), by_uva)


UVA0 = 0x7E00_0000_0000  # the model's uvas are UVA0 + a small offset


@pytest.mark.parametrize("seed", range(12))
def test_random_adds_and_removes_agree_with_a_model(marked_memfd: int, seed: int) -> None:
    """Regions drawn from a small space (so that overlaps in gpa, in uva or both are
    common) are added and removed in random order; the map refuses exactly the
    overlapping ones and every translation afterwards is the model's."""
    rng = random.Random(seed)
    mem = GuestMemory()
    model: list[Region] = []
    try:
        for _step in range(300):
            if model and rng.random() < 0.3:
                victim = rng.choice(model)
                mem.remove(victim)
                model.remove(victim)
            else:
                pages = rng.randint(1, 4)
                r = Region(
                    guest_phys_addr=rng.randrange(0, 64) * PAGE,
                    memory_size=pages * PAGE,
                    userspace_addr=UVA0 + rng.randrange(0, 64) * PAGE,
                    mmap_offset=rng.randrange(0, MODEL_PAGES - pages + 1) * PAGE,
                )
                clash = any(
                    _collide(r.guest_phys_addr, r.memory_size, m.guest_phys_addr, m.memory_size)
                    or _collide(r.userspace_addr, r.memory_size, m.userspace_addr, m.memory_size)
                    for m in model
                )
                rc = lib.vu_mem_add(
                    mem.handle,
                    r.guest_phys_addr,
                    r.memory_size,
                    r.userspace_addr,
                    r.mmap_offset,
                    marked_memfd,
                )
                assert rc == (ERR_REGION_OVERLAP if clash else 0), (r, model)
                if rc == 0:
                    lib.vu_mem_remove(
                        mem.handle, r.guest_phys_addr, r.memory_size, r.userspace_addr
                    )
                    mem.add(r, marked_memfd)  # through the wrapper, for its bookkeeping
                    model.append(r)
            _check_against_model(mem, model, rng)
            # a region not in the map, or one field off, is not found
            if model:
                m = rng.choice(model)
                assert (
                    lib.vu_mem_remove(
                        mem.handle, m.guest_phys_addr, m.memory_size + PAGE, m.userspace_addr
                    )
                    == ERR_REGION_NOT_FOUND
                )
    finally:
        mem.close()


def test_full_table_of_adjacent_regions_in_shuffled_order(marked_memfd: int) -> None:
    """MAX_REGIONS one-page regions back to back in gpa, added in random order, with
    uvas in another random order: one range over all of them is MAX_REGIONS iovecs in
    gpa order, and each one-page lookup lands on its own page."""
    n = MAX_REGIONS
    rng = random.Random(7)
    file_page = list(range(n))
    rng.shuffle(file_page)
    uva_slot = list(range(n))
    rng.shuffle(uva_slot)
    regions = [
        Region(
            guest_phys_addr=(1 << 32) + k * PAGE,
            memory_size=PAGE,
            userspace_addr=UVA0 + 2 * uva_slot[k] * PAGE,  # a hole between uvas
            mmap_offset=(file_page[k] % MODEL_PAGES) * PAGE,
        )
        for k in range(n)
    ]
    order = list(range(n))
    rng.shuffle(order)
    mem = GuestMemory()
    try:
        for k in order:
            mem.add(regions[k], marked_memfd)
        iov = ffi.new("struct iovec[]", n + 1)
        assert lib.vu_gpa_to_iov(mem.handle, 1 << 32, n * PAGE, iov, n) == n
        for k in range(n):
            assert int(iov[k].iov_len) == PAGE
            host = int(ffi.cast("uintptr_t", iov[k].iov_base))
            assert _word(host) == regions[k].mmap_offset
            assert host == mem.translate_gpa(regions[k].guest_phys_addr, PAGE)
            assert host == mem.translate_uva(regions[k].userspace_addr, PAGE)
        # one byte short of room, and one byte past the last region
        assert lib.vu_gpa_to_iov(mem.handle, 1 << 32, n * PAGE, iov, n - 1) == ERR_TOO_MANY_IOV
        assert lib.vu_gpa_to_iov(mem.handle, 1 << 32, n * PAGE + 1, iov, n + 1) == ERR_ADDR
        # a hole in the middle splits the span
        mem.remove(regions[n // 2])
        assert lib.vu_gpa_to_iov(mem.handle, 1 << 32, n * PAGE, iov, n) == ERR_ADDR
        assert lib.vu_gpa_to_iov(mem.handle, 1 << 32, (n // 2) * PAGE, iov, n) == n // 2
        with pytest.raises(GuestMemoryError):
            mem.translate_uva(regions[n // 2].userspace_addr, 1)
        for k in (0, n // 2 - 1, n // 2 + 1, n - 1):
            assert _word(mem.translate_gpa(regions[k].guest_phys_addr, PAGE)) == (
                regions[k].mmap_offset
            )
    finally:
        mem.close()


# --- hugetlbfs: huge-page aligned offsets and sizes only ------------------------------------


def _free_huge_pages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


HUGE_DIR = "/dev/hugepages"


def _hugetlbfs_mounted() -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1:3] == [HUGE_DIR, "hugetlbfs"] for line in f)


@pytest.fixture(params=["memfd", "hugetlbfs-file"])
def huge_fd(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[int, int]]:
    """(fd, huge page size) of a 4-huge-page file: an MFD_HUGETLB memfd, or a file on
    the hugetlbfs mount (as QEMU's mem-path=/dev/hugepages makes). Its pages are
    reserved by a mapping of our own, as QEMU's are, so that no touch can SIGBUS."""
    if _free_huge_pages() < 4:
        pytest.skip("needs 4 free huge pages (scripts/setup-dpdk reserves them)")
    if request.param == "memfd":
        fd = os.memfd_create("test-huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    else:
        if not _hugetlbfs_mounted():
            pytest.skip(f"no hugetlbfs mounted at {HUGE_DIR}")
        path = f"{HUGE_DIR}/vhost-test-memory-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
    huge = os.fstatvfs(fd).f_bsize
    try:
        os.ftruncate(fd, 4 * huge)
        with mmap.mmap(fd, 4 * huge) as own:  # reserves the pages (no MAP_NORESERVE)
            for k in range(4):
                own[k * huge : k * huge + 8] = (k * huge).to_bytes(8, "little")
            yield fd, huge
    finally:
        os.close(fd)


def _maps_of(fd: int) -> int:
    st = os.fstat(fd)
    with open("/proc/self/maps") as f:
        return sum(
            1
            for line in f
            if len(fields := line.split()) >= 5
            and fields[4] == str(st.st_ino)
            and fields[3] != "00:00"
        )


def test_huge_page_aligned_regions_are_mapped(empty: GuestMemory, huge_fd: tuple[int, int]) -> None:
    fd, huge = huge_fd
    before = _maps_of(fd)
    a = Region(0, 2 * huge, 0x7000_0000_0000, 0)
    b = Region(1 << 32, huge, 0x7000_4000_0000, 3 * huge)  # offset 3 huge pages in
    empty.add(a, fd)
    empty.add(b, fd)
    assert _maps_of(fd) == before + 2
    for r in (a, b):
        for d in range(0, r.memory_size, huge):
            assert _word(empty.translate_gpa(r.guest_phys_addr + d, 8)) == r.mmap_offset + d
    empty.write((1 << 32) + huge - 5, b"tail!")
    assert os.pread(fd, 5, 4 * huge - 5) == b"tail!"
    empty.remove(b)
    empty.remove(a)
    assert _maps_of(fd) == before  # munmap of whole huge pages works (nothing leaks)


@pytest.mark.parametrize(
    "what, offset, size",
    [
        ("offset a small page in", PAGE, "huge"),
        ("offset half a huge page in", "half", "huge"),
        ("size a small page short", 0, "huge-page"),
        ("size a small page over", 0, "huge+page"),
        ("size one small page", "huge", PAGE),
    ],
)
def test_misaligned_hugetlbfs_regions_are_refused(
    empty: GuestMemory, huge_fd: tuple[int, int], what: str, offset: Any, size: Any
) -> None:
    fd, huge = huge_fd
    values = {"huge": huge, "half": huge // 2, "huge-page": huge - PAGE, "huge+page": huge + PAGE}
    off, n = values.get(offset, offset), values.get(size, size)
    before = _maps_of(fd)
    region = Region(1 << 30, n, 0x7000_0000_0000, off)
    with pytest.raises(
        GuestMemoryError,
        match=rf"is on hugetlbfs but its mmap_offset or size is not a multiple of the huge "
        rf"page size \({huge >> 20} MiB\)",
    ):
        empty.add(region, fd)
    assert lib.vu_mem_add(empty.handle, 1 << 30, n, 0x7000_0000_0000, off, fd) == ERR_REGION_ALIGN
    assert nregions(empty) == 0 and empty.regions == []
    assert _maps_of(fd) == before  # nothing mapped
    empty.add(Region(1 << 30, huge, 0x7000_0000_0000, huge), fd)  # the map goes on


def test_small_page_files_need_no_alignment(empty: GuestMemory, memfd: int) -> None:
    """memfd and tmpfs files: any offset, any size (memory.c maps from file offset 0)."""
    empty.add(Region(0x10000, 123, 0x7000_0000, 0x1001), memfd)
    os.pwrite(memfd, b"x", 0x1001 + 122)
    assert empty.read(0x10000 + 122, 1) == b"x"
