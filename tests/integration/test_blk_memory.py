"""The vhost-user-blk memory table over a real socket: buffers and rings in any region,
eight regions, SET_MEM_TABLE again while queues run (old mappings go), the memory slots
of CONFIGURE_MEM_SLOTS (ADD_MEM_REG, REM_MEM_REG, GET_MAX_MEM_SLOTS; full slots refused
and released), and regions that meet in guest-physical space (one buffer across them).
What the daemon maps is checked in /proc as well as through I/O.
"""

from __future__ import annotations

import os

import pytest

from tests.support.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_OUT,
    BlkDriver,
    Guest,
    check_io_works,
    connect_guest,
    disk_read,
    pattern,
    raw_buffer,
    raw_chain,
    raw_header,
)
from tests.support.daemon import Daemon
from tests.support.frontend import (
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    AckError,
    FrontEnd,
    GuestRam,
    KiB,
    MiB,
)
from vhost.protocol import (
    AddMemReg,
    MemoryRegion,
)

SECTOR = SECTOR_SIZE
shared = pytest.mark.shared_daemon  # see conftest: the module's daemon, not a fresh one
PAGE = 4096
N, W = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
# Short names: chains are written one descriptor list per line.
_hdr, _buf, _direct = raw_header, raw_buffer, raw_chain


# =========================================================================================
# Memory regions
# =========================================================================================


@shared
def test_buffers_in_second_memory_region(guest: Guest, daemon: Daemon) -> None:
    blk = BlkDriver(guest.queue, buf_regions=(1,))
    data = pattern(3, 8 * KiB)
    req = blk.submit_write(40, data, segs=3)
    assert all(guest.ram.region_of(gpa).gpa >= 1 << 30 for _p, gpa, _n in req.allocs)
    assert blk.kick_and_wait([req])[0].status == VIRTIO_BLK_S_OK
    assert disk_read(daemon, 40 * SECTOR, len(data)) == data
    mixed = BlkDriver(guest.queue, buf_regions=(0, 1))  # alternates regions per buffer
    assert mixed.read(40, len(data), segs=4) == data
    assert mixed.read(40, len(data), segs=4, indirect=True) == data


@shared
def test_eight_memory_regions(daemon: Daemon) -> None:
    with connect_guest(daemon, regions=8, buf_regions=range(8)) as g:
        data = pattern(30, 16 * KiB)
        assert g.blk.write(500, data, segs=8) == VIRTIO_BLK_S_OK  # one segment per region
        assert disk_read(daemon, 500 * SECTOR, len(data)) == data
        assert g.blk.read(500, len(data), segs=8, indirect=True) == data
        assert daemon.memfd_maps() >= 8


@shared
def test_rings_in_second_memory_region(daemon: Daemon) -> None:
    with connect_guest(daemon, queues=0) as g:
        q = g.fe.setup_queue(0, 64, region=1)
        blk = BlkDriver(q, buf_regions=(0, 1))
        data = pattern(4, 4 * KiB)
        assert blk.write(8, data, segs=2) == VIRTIO_BLK_S_OK
        assert disk_read(daemon, 8 * SECTOR, len(data)) == data
        assert blk.read(8, len(data), segs=3) == data


@shared
def test_set_mem_table_again_while_running(daemon: Daemon) -> None:
    """QEMU resends the table on memory hot-plug: queues go on, old maps go away."""
    with connect_guest(daemon, buf_regions=(0, 1)) as g:
        maps = daemon.memfd_maps()
        for k in range(10):
            g.fe.set_mem_table()
            data = pattern(500 + k, 4 * KiB)
            assert g.blk.write(k * 8, data, segs=2) == VIRTIO_BLK_S_OK
            assert disk_read(daemon, k * 8 * SECTOR, len(data)) == data
        assert daemon.memfd_maps() == maps


@shared
def test_buffer_spanning_gpa_adjacent_regions(daemon: Daemon) -> None:
    """Two regions back to back in guest-physical space: one descriptor across the
    boundary becomes two iovecs on the device side."""
    ram = GuestRam(64 * MiB, 2)
    fe = FrontEnd(daemon.socket_path, ram)
    half = 32 * MiB
    try:
        fe.connect()
        fe.negotiate()
        # the device's view: region 1 right after region 0 (gpa 32 MiB), same file layout
        fe.request_ack(AddMemReg(MemoryRegion(0, half, ram.UVA_BASE, 0), ram.fd))
        fe.request_ack(AddMemReg(MemoryRegion(half, half, ram.UVA_BASE + half, half), ram.fd))
        blk = BlkDriver(fe.setup_queue(0, 64))
        data = pattern(26, 4 * KiB)
        # the buffer: device gpa [32M - 1K, 32M + 3K); our region 1 holds file offset 32M on
        start = half - 1024
        ram.write(start, data[:1024])
        ram.write(1 << 30, data[1024:])
        hdr, st = _hdr(ram, VIRTIO_BLK_T_OUT, 90), _buf(ram, 1)
        q = blk.queue
        d = _direct(q, [(hdr, 16, N, 1), (start, len(data), N, 2), (st, 1, W, None)])
        q.put_avail(d[0])
        q.kick()
        q.wait_used_idx(1)
        assert q.read_used_elem(0) == (d[0], 1)
        assert ram.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
        assert disk_read(daemon, 90 * SECTOR, len(data)) == data
    finally:
        fe.close()
        ram.close()


# =========================================================================================
# Memory slots (CONFIGURE_MEM_SLOTS)
# =========================================================================================


@shared
def test_add_mem_reg_instead_of_set_mem_table(daemon: Daemon) -> None:
    with connect_guest(daemon, add_mem_reg=True, buf_regions=(0, 1)) as g:
        assert g.fe.get_max_mem_slots() >= 256
        data = pattern(17, 16 * KiB)
        assert g.blk.write(200, data, segs=4) == VIRTIO_BLK_S_OK
        assert disk_read(daemon, 200 * SECTOR, len(data)) == data
        assert g.blk.read(200, len(data), segs=3) == data
        assert g.blk.read(200, len(data), segs=3, indirect=True) == data


@shared
def test_get_max_mem_slots(guest: Guest) -> None:
    assert guest.fe.get_max_mem_slots() >= 256


def test_rem_mem_reg(daemon: Daemon) -> None:
    idle = daemon.resources()
    with connect_guest(daemon, add_mem_reg=True) as g:
        data = pattern(18, 4 * KiB)
        hi = BlkDriver(g.queue, buf_regions=(1,))
        assert hi.write(300, data) == VIRTIO_BLK_S_OK
        g.fe.remove_mem_region(1)
        # buffers in the removed region are now outside guest memory
        r = hi.submit_read(300, len(data))
        c = hi.kick_and_wait([r])[0]
        assert (c.status, c.used_len) == (None, 0)
        daemon.wait_log("buffer outside guest memory")
        assert g.blk.read(300, len(data)) == data  # region 0 still works
        with pytest.raises(AckError):
            g.fe.remove_mem_region(1)  # not mapped any more
        # and back again
        g.fe.request_ack(_add_region(g.ram, 1))
        assert hi.read(300, len(data)) == data
    daemon.wait_disconnects(1)
    assert daemon.settled_resources(idle) == idle


def _add_region(ram: GuestRam, index: int) -> AddMemReg:
    return AddMemReg(ram.regions()[index], ram.fd)


def test_memory_slots_fill_up_and_are_released(daemon: Daemon) -> None:
    idle = daemon.resources()
    with connect_guest(daemon, add_mem_reg=True) as g:
        slots = g.fe.get_max_mem_slots()
        extra = os.memfd_create("extra-slots", os.MFD_CLOEXEC)
        try:
            os.ftruncate(extra, slots * PAGE)  # a page of file for each
            regions = [
                MemoryRegion(
                    guest_phys_addr=(8 << 30) + k * 2 * PAGE,
                    memory_size=PAGE,
                    userspace_addr=(1 << 44) + k * PAGE,
                    mmap_offset=k * PAGE,
                )
                for k in range(slots - 2 + 1)
            ]
            for r in regions[:-1]:
                g.fe.request_ack(AddMemReg(r, extra))
            with pytest.raises(AckError):  # one more than the slots
                g.fe.request_ack(AddMemReg(regions[-1], extra))
            # overlapping an existing region
            with pytest.raises(AckError):
                g.fe.request_ack(AddMemReg(MemoryRegion(PAGE, PAGE, 1 << 45, 0), extra))
        finally:
            os.close(extra)
        check_io_works(g, daemon)
        assert daemon.memfd_maps() >= slots
    daemon.wait_disconnects(1)
    assert daemon.settled_resources(idle) == idle
