"""Memory slots while a queue runs: ADD_MEM_REG up to every slot the daemon advertises
(GET_MAX_MEM_SLOTS, at least QEMU 7.2's 256) and REM_MEM_REG back down, over a real
socket to the real ``vhost-user-blk``, while a thread keeps verified I/O going on the
queue, with request buffers in the regions just added. One more region than the slots
is refused with a clear error, and the connection and the queue go on. Regions on
hugetlbfs (an MFD_HUGETLB memfd, as QEMU's hugepage RAM) must be in whole huge pages.

The session stops the queues around every change of the memory map (vhost/session.py,
``_change_memory``): 500-odd changes under I/O here, none of which may lose, repeat or
misplace a request.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.blk import (
    BLK_HDR,
    SECTOR_SIZE,
    STATUS_UNTOUCHED,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkDriver,
    BlkRequest,
    Guest,
    check_io_works,
    connect_guest,
    disk_read,
)
from tests.support.daemon import Daemon
from tests.support.frontend import AckError, KiB
from vhost.limits import MAX_MEM_SLOTS
from vhost.protocol import AddMemReg, MemoryRegion, RemMemReg

PAGE = 4096
BLOCK = 4 * KiB  # one I/O unit of the model
BLOCKS = 64  # the disk area the I/O thread writes: BLOCKS * BLOCK bytes from sector 0
SLOT_SIZE = 64 * KiB  # each added region: 16 pages of a memfd of its own kind
SLOT_GPA = 16 << 30  # added regions from here, a hole after each
SLOT_UVA = 1 << 45


@dataclass(frozen=True)
class Slot:
    index: int
    region: MemoryRegion


class SlotRam:
    """The memory of the added regions: one memfd, mmapped here, region k its k-th
    SLOT_SIZE bytes at gpa SLOT_GPA + 2k*SLOT_SIZE (no two regions are gpa-adjacent)."""

    def __init__(self, count: int) -> None:
        self.fd = os.memfd_create("test-mem-slots", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, count * SLOT_SIZE)
        self.mm = mmap.mmap(self.fd, count * SLOT_SIZE)

    def slot(self, k: int) -> Slot:
        return Slot(
            k,
            MemoryRegion(
                guest_phys_addr=SLOT_GPA + 2 * k * SLOT_SIZE,
                memory_size=SLOT_SIZE,
                userspace_addr=SLOT_UVA + k * SLOT_SIZE,
                mmap_offset=k * SLOT_SIZE,
            ),
        )

    def write(self, s: Slot, off: int, data: bytes) -> None:
        base = s.index * SLOT_SIZE + off
        self.mm[base : base + len(data)] = data

    def read(self, s: Slot, off: int, n: int) -> bytes:
        base = s.index * SLOT_SIZE + off
        return bytes(self.mm[base : base + n])

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


def submit_at(blk: BlkDriver, rtype: int, sector: int, gpa: int, n: int) -> BlkRequest:
    """A read or write whose data buffer is [gpa, gpa+n) wherever it lies in guest
    memory; header and status come from the driver's pool (freed on completion)."""
    pool = blk.pools[0]
    hdr = pool.alloc(BLK_HDR.size)
    blk.ram.write(hdr, BLK_HDR.pack(rtype, 0, sector))
    st = pool.alloc(1)
    blk.ram.write(st, bytes([STATUS_UNTOUCHED]))
    bufs = [(hdr, BLK_HDR.size, False), (gpa, n, rtype == VIRTIO_BLK_T_IN), (st, 1, True)]
    head = blk.queue.add_chain(bufs)
    req = BlkRequest(rtype, sector, head, st, [], [(pool, hdr, BLK_HDR.size), (pool, st, 1)])
    blk.inflight[head] = req
    return req


class IoThread:
    """Verified I/O on one queue until stopped: batches of writes and reads over
    BLOCKS blocks, some through the driver's own buffers, some with their data buffer
    in an added region (the newest one, and one at random). Every read is checked
    against a model of the disk; the first mismatch or failure ends the thread."""

    def __init__(self, g: Guest, ram: SlotRam, seed: int) -> None:
        self.g, self.ram = g, ram
        self.rng = random.Random(seed)
        self.model = [bytes(BLOCK)] * BLOCKS
        self.usable: list[Slot] = []  # added and acked; guarded by lock
        self.lock = threading.Lock()  # held for a whole batch
        self.stop = threading.Event()
        self.batches = 0
        self.requests = 0
        self.in_slot: dict[int, int] = {}  # slot index -> completed requests using it
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="slot-io", daemon=True)

    def start(self) -> None:
        for k in range(BLOCKS):  # the model starts from what is on disk
            self.model[k] = disk_read(self.g.daemon, k * BLOCK, BLOCK)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    self._batch()
                self.batches += 1
        except BaseException as e:
            self.error = e

    def _batch(self) -> None:
        blk, rng = self.g.blk, self.rng
        slots = self.usable[-1:] + ([rng.choice(self.usable)] if self.usable else [])
        blocks = rng.sample(range(BLOCKS), 2 + 2 * len(slots))
        # buffers in a slot never overlap within a batch (both picks may be one slot)
        places = iter(rng.sample(range(SLOT_SIZE // (2 * BLOCK)), 2 * len(slots)))

        def place() -> int:
            return next(places) * 2 * BLOCK + rng.randrange(0, BLOCK, 512)

        reqs: list[tuple[BlkRequest, int, bytes | None, Slot | None]] = []
        # writes through the pool, then writes from the added regions' memory
        for k in blocks[:2]:
            data = rng.randbytes(BLOCK)
            reqs.append((blk.submit_write(k * BLOCK // SECTOR_SIZE, data), k, data, None))
        for s, k in zip(slots, blocks[2:], strict=False):
            data = rng.randbytes(BLOCK)
            off = place()
            self.ram.write(s, off, data)
            gpa = s.region.guest_phys_addr + off
            reqs.append(
                (submit_at(blk, VIRTIO_BLK_T_OUT, k * BLOCK // SECTOR_SIZE, gpa, BLOCK), k, data, s)
            )
        done = blk.kick_and_wait([r for r, *_ in reqs], timeout=10.0)
        for (_r, k, data, s), c in zip(reqs, done, strict=True):
            assert c.status == VIRTIO_BLK_S_OK, (k, s, c)
            assert data is not None
            self.model[k] = data
            if s is not None:
                self.in_slot[s.index] = self.in_slot.get(s.index, 0) + 1
        # reads into the added regions' memory, and through the pool
        reads: list[tuple[BlkRequest, int, Slot | None, int]] = []
        for s in slots:
            k = rng.randrange(BLOCKS)
            off = place()
            self.ram.write(s, off, b"\xa5" * BLOCK)  # poison: the device must overwrite
            gpa = s.region.guest_phys_addr + off
            reads.append(
                (submit_at(blk, VIRTIO_BLK_T_IN, k * BLOCK // SECTOR_SIZE, gpa, BLOCK), k, s, off)
            )
        k = rng.randrange(BLOCKS)
        reads.append((blk.submit_read(k * BLOCK // SECTOR_SIZE, BLOCK), k, None, 0))
        done = blk.kick_and_wait([r for r, *_ in reads], timeout=10.0)
        for (_r, k, s, off), c in zip(reads, done, strict=True):
            assert c.status == VIRTIO_BLK_S_OK, (k, s, c)
            got = c.data if s is None else self.ram.read(s, off, BLOCK)
            assert got == self.model[k], f"block {k} read back wrong (buffer in {s})"
            if s is not None:
                self.in_slot[s.index] = self.in_slot.get(s.index, 0) + 1
        self.requests += len(reqs) + len(reads)

    def add(self, s: Slot) -> None:
        with self.lock:
            self.usable.append(s)

    def forget(self, s: Slot) -> None:
        """After this returns no request uses ``s`` (none is in flight either)."""
        with self.lock:
            self.usable.remove(s)

    def wait_for(self, what: str, cond: object, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():  # type: ignore[operator]
            self.check()
            assert time.monotonic() < deadline, f"I/O thread: {what} not seen in {timeout}s"
            time.sleep(0.005)

    def more_batches(self, n: int = 3) -> None:
        start = self.batches
        self.wait_for(f"{n} more batches", lambda: self.batches >= start + n)

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"I/O thread failed: {self.error!r}") from self.error
        assert self.thread.is_alive() or self.stop.is_set(), "I/O thread died"

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.check()
        assert not self.thread.is_alive()


@pytest.fixture
def slot_guest(daemon: Daemon) -> Iterator[Guest]:
    with connect_guest(daemon, add_mem_reg=True) as g:
        yield g


def test_slots_fill_up_and_empty_under_io(daemon: Daemon) -> None:
    idle = daemon.resources()
    with connect_guest(daemon, add_mem_reg=True) as g:
        _fill_and_empty(g, daemon)
    daemon.wait_disconnects(1)
    assert daemon.settled_resources(idle) == idle  # every mapping and fd released


def _fill_and_empty(g: Guest, daemon: Daemon) -> None:
    slots = g.fe.get_max_mem_slots()
    assert slots == MAX_MEM_SLOTS >= 256  # QEMU 7.2's x86 limit
    used = len(g.ram.regions())  # the guest RAM's own regions take slots too
    extra = slots - used
    ram = SlotRam(extra + 1)
    io = IoThread(g, ram, seed=13)
    maps_before = daemon.memfd_maps()
    try:
        io.start()
        io.more_batches()
        added: list[Slot] = []
        for k in range(extra):
            s = ram.slot(k)
            g.fe.request_ack(AddMemReg(s.region, ram.fd))
            added.append(s)
            io.add(s)
            if k % 32 == 0 or k == extra - 1:  # a request used the region just added
                io.wait_for(f"a request in slot {k}", lambda k=k: io.in_slot.get(k, 0) > 0)
        assert daemon.memfd_maps() == maps_before + extra

        # one past the slots: refused, clearly, and nothing changes
        past = ram.slot(extra)
        with pytest.raises(AckError):
            g.fe.request_ack(AddMemReg(past.region, ram.fd))
        daemon.wait_log(f"failed: region gpa={past.region.guest_phys_addr:#x}")
        (line,) = daemon.log_lines("no free slot")
        assert f"(at most {slots} regions)" in line, line
        assert daemon.memfd_maps() == maps_before + extra
        io.more_batches()  # the queue goes on, buffers in every region
        check_io_works(g, daemon, sector=BLOCKS * BLOCK // SECTOR_SIZE + 8)

        # and back down, in random order, I/O going on in what is left
        order = list(added)
        random.Random(5).shuffle(order)
        for n, s in enumerate(order):
            io.forget(s)
            g.fe.request_ack(RemMemReg(s.region, None))
            if n % 32 == 0:
                io.more_batches(1)
        with pytest.raises(AckError):  # gone
            g.fe.request_ack(RemMemReg(order[0].region, None))
        assert daemon.memfd_maps() == maps_before
        # the freed slots take regions again (the last one refused above, say)
        g.fe.request_ack(AddMemReg(past.region, ram.fd))
        io.add(past)
        io.wait_for("a request in the re-added slot", lambda: io.in_slot.get(past.index, 0) > 0)
        io.finish()
    finally:
        io.stop.set()
        io.thread.join(timeout=30)
        ram.close()
    print(
        f"\n{extra} regions added and removed under I/O: {io.batches} batches, "
        f"{io.requests} requests, {sum(io.in_slot.values())} with buffers in "
        f"{len(io.in_slot)} added regions"
    )
    assert len(io.in_slot) >= extra // 32  # buffers in fresh regions throughout
    for k in range(BLOCKS):  # the disk holds what the model says
        assert disk_read(daemon, k * BLOCK, BLOCK) == io.model[k], f"block {k}"
    for k in range(0, BLOCKS, 7):
        assert g.blk.read(k * BLOCK // SECTOR_SIZE, BLOCK) == io.model[k]


# --- hugetlbfs regions over the socket ------------------------------------------------------


def _free_huge_pages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def test_hugetlb_regions_must_be_whole_huge_pages(slot_guest: Guest, daemon: Daemon) -> None:
    """An MFD_HUGETLB memfd (QEMU's memory-backend-memfd,hugetlb=on; mem-path files on
    hugetlbfs are the same to the daemon): misaligned offset or size refused with the
    reason in the log, the queue unharmed; aligned, I/O runs through it."""
    if _free_huge_pages() < 2:
        pytest.skip("needs 2 free huge pages (scripts/setup-dpdk reserves them)")
    g = slot_guest
    fd = os.memfd_create("test-mem-slots-huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    huge = os.fstatvfs(fd).f_bsize
    try:
        os.ftruncate(fd, 2 * huge)
        with mmap.mmap(fd, 2 * huge) as mm:  # reserves the pages, as QEMU's mapping does
            gpa = 32 << 30
            for off, size in [(PAGE, huge), (0, huge - PAGE), (0, huge + PAGE)]:
                bad = MemoryRegion(gpa, size, SLOT_UVA, off)
                with pytest.raises(AckError):
                    g.fe.request_ack(AddMemReg(bad, fd))
                daemon.wait_log(
                    f"region gpa={gpa:#x} size={size:#x} uva={SLOT_UVA:#x} offset={off:#x} "
                    f"is on hugetlbfs but its mmap_offset or size is not a multiple of the "
                    f"huge page size ({huge >> 20} MiB)"
                )
                check_io_works(g, daemon)
            good = MemoryRegion(gpa, huge, SLOT_UVA, huge)  # the file's second huge page
            g.fe.request_ack(AddMemReg(good, fd))
            data = random.Random(3).randbytes(64 * KiB)
            mm[huge + 4096 : huge + 4096 + len(data)] = data
            req = submit_at(g.blk, VIRTIO_BLK_T_OUT, 2048, gpa + 4096, len(data))
            assert g.blk.kick_and_wait([req])[0].status == VIRTIO_BLK_S_OK
            assert disk_read(daemon, 2048 * SECTOR_SIZE, len(data)) == data
            mm[2 * huge - 64 * KiB : 2 * huge] = bytes(64 * KiB)  # the device must fill it
            req = submit_at(g.blk, VIRTIO_BLK_T_IN, 2048, gpa + huge - 64 * KiB, 64 * KiB)
            assert g.blk.kick_and_wait([req])[0].status == VIRTIO_BLK_S_OK
            assert mm[2 * huge - 64 * KiB : 2 * huge] == data
            g.fe.request_ack(RemMemReg(good, None))
    finally:
        os.close(fd)
    check_io_works(g, daemon)
