"""vhost-user-blk over a real socket: the test front end (tests/support/) drives the
real daemon, and every test checks a real effect -- bytes in the image file read from the
host side, blocks freed in it, statuses and used lengths in guest memory, what the daemon
logged, and the daemon's fds, mappings and threads in /proc.
"""

from __future__ import annotations

import os
import random
import resource
import select
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.blk import (
    BLK_HDR,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkDriver,
    BlkRequest,
    Guest,
    connect_guest,
    parse_blk_config,
)
from tests.support.daemon import IMAGE_SIZE, Daemon, StartDaemon
from tests.support.frontend import (
    ALL_FEATURES,
    DESC_SIZE,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    AckError,
    BackEndClosed,
    DriverQueue,
    FrontEnd,
    GuestRam,
    KiB,
    MiB,
)
from vhost.protocol import (
    AddMemReg,
    GetFeatures,
    GetQueueNum,
    MemoryRegion,
    Request,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringKick,
    SetVringNum,
    U64Reply,
    Unknown,
    encode_message,
)

SECTOR = 512
CAPACITY = IMAGE_SIZE // SECTOR
STATUS_UNTOUCHED = 0xFF
# GuestRam(64 MiB, 2 regions): region 0 is [0, 32 MiB), region 1 starts at 1 GiB.
REGION0_END = 32 * MiB
HOLE_GPA = 512 * MiB  # between the two regions: not guest memory
PAGE = 4096


shared = pytest.mark.shared_daemon  # see conftest: the module's daemon, not a fresh one


def pattern(seed: int | str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def disk_read(d: Daemon, offset: int, n: int) -> bytes:
    with open(d.image_path, "rb") as f:
        return os.pread(f.fileno(), n, offset)


def disk_write(d: Daemon, offset: int, data: bytes) -> None:
    with open(d.image_path, "r+b") as f:
        os.pwrite(f.fileno(), data, offset)


def check_io_works(g: Guest, d: Daemon, sector: int = 777) -> None:
    """A good write and read on queue 0 of ``g`` land on / come from the image (fresh
    random data each time, so an earlier call cannot make a dead write look good)."""
    data = os.urandom(4 * KiB)
    assert g.blk.write(sector, data) == VIRTIO_BLK_S_OK
    assert disk_read(d, sector * SECTOR, len(data)) == data
    assert g.blk.read(sector, len(data)) == data


def check_new_connection_works(d: Daemon, sector: int = 901) -> None:
    with connect_guest(d) as g:
        check_io_works(g, d, sector)


# =========================================================================================
# Reads, writes and the other request types
# =========================================================================================


@shared
@pytest.mark.parametrize("nbytes", [512, 4 * KiB, 64 * KiB + 512, 1 * MiB])
def test_write_reaches_disk_and_reads_back(guest: Guest, daemon: Daemon, nbytes: int) -> None:
    sector = 2048 + 3  # not 4 KiB aligned on purpose
    data = pattern(nbytes, nbytes)
    before = disk_read(daemon, sector * SECTOR - SECTOR, SECTOR)
    after = disk_read(daemon, sector * SECTOR + nbytes, SECTOR)
    assert guest.blk.write(sector, data) == VIRTIO_BLK_S_OK
    assert disk_read(daemon, sector * SECTOR, nbytes) == data
    # neighbours untouched
    assert disk_read(daemon, sector * SECTOR - SECTOR, SECTOR) == before
    assert disk_read(daemon, sector * SECTOR + nbytes, SECTOR) == after
    assert guest.blk.read(sector, nbytes) == data


@shared
def test_read_returns_what_the_host_wrote(guest: Guest, daemon: Daemon) -> None:
    data = pattern(1, 12 * KiB)
    disk_write(daemon, 300 * SECTOR, data)
    c = guest.blk.kick_and_wait([guest.blk.submit_read(300, len(data))])[0]
    assert c.status == VIRTIO_BLK_S_OK
    assert c.data == data
    assert c.used_len == len(data) + 1  # data plus the status byte


@shared
def test_last_sector_is_reachable(guest: Guest, daemon: Daemon) -> None:
    assert guest.capacity() == CAPACITY
    data = pattern(2, SECTOR)
    assert guest.blk.write(CAPACITY - 1, data) == VIRTIO_BLK_S_OK
    assert disk_read(daemon, IMAGE_SIZE - SECTOR, SECTOR) == data
    assert guest.blk.read(CAPACITY - 1, SECTOR) == data
    assert os.stat(daemon.image_path).st_size == IMAGE_SIZE


@shared
@pytest.mark.parametrize("segs", [2, 7, 64, (1, 511, 3584), (4095, 1, 1024, 3072)],
                         ids=["2", "7", "64", "odd-sizes", "odd-sizes-2"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_multi_segment(guest: Guest, daemon: Daemon, segs: int | tuple[int, ...],
                       indirect: bool) -> None:
    nbytes = sum(segs) if isinstance(segs, tuple) else 32 * KiB
    data = pattern(f"{segs}-{indirect}", nbytes)
    st = guest.blk.write(100, data, segs=segs, indirect=indirect)
    assert st == VIRTIO_BLK_S_OK
    assert disk_read(daemon, 100 * SECTOR, nbytes) == data
    # read back with a different segmentation
    assert guest.blk.read(100, nbytes, segs=5, indirect=not indirect) == data
    assert guest.blk.read(100, nbytes, segs=segs, indirect=indirect) == data


@shared
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_more_segments_than_iov_max(daemon: Daemon, indirect: bool) -> None:
    """1020 data segments: more than one preadv/pwritev (IOV_MAX is 1024) with the status
    byte's iovec in the mix."""
    with connect_guest(daemon, queue_size=1024) as g:
        sizes = [512 if k % 3 else 256 for k in range(1020)]
        sizes[-1] += 512 - sum(sizes) % 512
        data = pattern(f"iov-{indirect}", sum(sizes))
        assert g.blk.write(3000, data, segs=sizes, indirect=indirect) == VIRTIO_BLK_S_OK
        assert disk_read(daemon, 3000 * SECTOR, len(data)) == data
        back = g.blk.read(3000, len(data), segs=sizes[::-1], indirect=indirect)
        assert back == data


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
@pytest.mark.parametrize("split", [1, 4, 8, 12, 15])
def test_header_split_across_descriptors(guest: Guest, daemon: Daemon, split: int) -> None:
    data = pattern(split, 2 * KiB)
    w = guest.blk.submit_raw(VIRTIO_BLK_T_OUT, 64, out_data=data, header_split=split)
    assert guest.blk.kick_and_wait([w])[0].status == VIRTIO_BLK_S_OK
    assert disk_read(daemon, 64 * SECTOR, len(data)) == data
    r = guest.blk.submit_raw(VIRTIO_BLK_T_IN, 64, in_len=len(data), header_split=split)
    c = guest.blk.kick_and_wait([r])[0]
    assert (c.status, c.data) == (VIRTIO_BLK_S_OK, data)


def _raw_request(g: Guest, bufs: list[tuple[int, int, bool]]) -> int:
    """Put a hand-built chain on queue 0, kick, and return its used length."""
    q = g.queue
    head = q.add_chain(bufs)
    q.publish()
    q.kick()
    deadline = time.monotonic() + 5
    while True:
        used = q.get_used()
        if used:
            assert used == [(head, used[0][1])]
            return used[0][1]
        q.enable_cb()
        if not q.get_used() and time.monotonic() > deadline:
            raise TimeoutError("hand-built chain not completed")
        q.wait_call(0.1)


@shared
def test_header_data_and_status_share_descriptors(guest: Guest, daemon: Daemon) -> None:
    """The device must not assume one buffer per descriptor: header and data in one
    readable buffer; data and status in one writable buffer."""
    ram = guest.ram
    data = pattern(5, 1024)
    out = ram.alloc(16 + len(data))
    ram.write(out, BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, 10) + data)
    status = ram.alloc(1)
    ram.write(status, b"\xff")
    assert _raw_request(guest, [(out, 16 + len(data), False), (status, 1, True)]) == 1
    assert ram.read(status, 1) == bytes([VIRTIO_BLK_S_OK])
    assert disk_read(daemon, 10 * SECTOR, len(data)) == data

    hdr = ram.alloc(16)
    ram.write(hdr, BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, 10))
    inbuf = ram.alloc(len(data) + 1)
    ram.fill(inbuf, len(data) + 1, 0xA5)
    assert _raw_request(guest, [(hdr, 16, False), (inbuf, len(data) + 1, True)]) == len(data) + 1
    assert ram.read(inbuf, len(data)) == data
    assert ram.read(inbuf + len(data), 1) == bytes([VIRTIO_BLK_S_OK])


@shared
def test_flush(guest: Guest, daemon: Daemon) -> None:
    data = pattern(6, 4 * KiB)
    assert guest.blk.write(16, data) == VIRTIO_BLK_S_OK
    c = guest.blk.kick_and_wait([guest.blk.submit_flush()])[0]
    assert (c.status, c.used_len) == (VIRTIO_BLK_S_OK, 1)
    assert guest.blk.kick_and_wait([guest.blk.submit_flush(indirect=True)])[0].ok
    assert disk_read(daemon, 16 * SECTOR, len(data)) == data


def _allocated_bytes(d: Daemon) -> int:
    return os.stat(d.image_path).st_blocks * 512


def test_discard_punches_holes(guest: Guest, daemon: Daemon) -> None:
    start, nbytes = 8192, 2 * MiB  # 4 KiB aligned
    data = pattern(7, nbytes)
    assert guest.blk.write(start, data) == VIRTIO_BLK_S_OK
    assert guest.blk.flush() == VIRTIO_BLK_S_OK
    before = _allocated_bytes(daemon)
    assert before >= nbytes
    # discard the middle 1 MiB, in two segments
    segs = [(start + 512, 1024, 0), (start + 1536, 1024, 0)]
    assert guest.blk.discard(segs) == VIRTIO_BLK_S_OK
    after = _allocated_bytes(daemon)
    assert before - after >= 1 * MiB, (before, after)
    assert disk_read(daemon, (start + 512) * SECTOR, MiB) == bytes(MiB)
    assert guest.blk.read(start + 512, MiB) == bytes(MiB)
    # the rest is intact
    assert disk_read(daemon, start * SECTOR, 256 * KiB) == data[: 256 * KiB]
    assert disk_read(daemon, (start + 2560) * SECTOR, 768 * KiB) == data[-768 * KiB:]


@shared
@pytest.mark.parametrize("flags", [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP], ids=["plain", "unmap"])
def test_write_zeroes(guest: Guest, daemon: Daemon, flags: int) -> None:
    start = 6000
    data = pattern(f"write-zeroes-{flags}", 256 * KiB)
    assert guest.blk.write(start, data) == VIRTIO_BLK_S_OK
    # two ranges, one not 4 KiB aligned
    segs = [(start + 8, 64, flags), (start + 201, 3, flags)]
    assert guest.blk.write_zeroes(segs) == VIRTIO_BLK_S_OK
    expect = bytearray(data)
    for s, n, _f in segs:
        off = (s - start) * SECTOR
        expect[off:off + n * SECTOR] = bytes(n * SECTOR)
    assert disk_read(daemon, start * SECTOR, len(data)) == bytes(expect)
    assert guest.blk.read(start, len(data)) == bytes(expect)
    assert os.stat(daemon.image_path).st_size == IMAGE_SIZE


@shared
def test_discard_and_write_zeroes_bad_segments(guest: Guest, daemon: Daemon) -> None:
    data = pattern(9, 8 * KiB)
    assert guest.blk.write(0, data) == VIRTIO_BLK_S_OK
    # discard has no flags; unknown flag bits are UNSUPP
    assert guest.blk.discard([(0, 8, 1)]) == VIRTIO_BLK_S_UNSUPP
    assert guest.blk.write_zeroes([(0, 8, 2)]) == VIRTIO_BLK_S_UNSUPP
    # beyond capacity, and more segments than max_discard_seg (32)
    assert guest.blk.discard([(CAPACITY - 4, 8, 0)]) == VIRTIO_BLK_S_IOERR
    assert guest.blk.write_zeroes([(CAPACITY, 1, 0)]) == VIRTIO_BLK_S_IOERR
    assert guest.blk.discard([(k, 1, 0) for k in range(33)]) == VIRTIO_BLK_S_IOERR
    assert disk_read(daemon, 0, len(data)) == data
    check_io_works(guest, daemon)


@pytest.mark.parametrize(("serial", "expect"), [
    ("", b""),
    ("short-id", b"short-id"),
    ("ABCDEFGHIJKLMNOPQRST", b"ABCDEFGHIJKLMNOPQRST"),
], ids=["none", "short", "20-bytes"])
def test_get_id(start_daemon: StartDaemon, serial: str, expect: bytes) -> None:
    d = start_daemon("--serial", serial) if serial else start_daemon()
    with connect_guest(d) as g:
        c = g.blk.kick_and_wait([g.blk.submit_get_id()])[0]
        assert c.status == VIRTIO_BLK_S_OK
        # exactly 20 bytes, NUL padded when shorter
        assert c.data == expect.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        assert c.used_len == VIRTIO_BLK_ID_BYTES + 1
        assert g.blk.get_id() == expect
        # a larger buffer gets the 20 bytes and no more
        big = g.blk.submit_raw(VIRTIO_BLK_T_GET_ID, 0, in_len=64)
        c = g.blk.kick_and_wait([big])[0]
        assert c.status == VIRTIO_BLK_S_OK
        assert c.data[:20] == expect.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        assert c.data[20:] == bytes([g.blk.poison]) * 44
        # a smaller one gets what fits
        small = g.blk.submit_raw(VIRTIO_BLK_T_GET_ID, 0, in_len=8)
        c = g.blk.kick_and_wait([small])[0]
        assert (c.status, c.used_len) == (VIRTIO_BLK_S_OK, 9)
        assert c.data == expect.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:8]
        check_io_works(g, d)


@shared
@pytest.mark.parametrize(("sector", "nbytes"), [
    (CAPACITY, SECTOR),          # starts at the end
    (CAPACITY - 1, 2 * SECTOR),  # straddles the end
    (CAPACITY + 1000, 4 * KiB),
    (2**63, SECTOR),             # sector * 512 overflows 64 bits
    (2**64 - 1, SECTOR),
], ids=["at-end", "straddles", "far", "overflow", "max"])
def test_beyond_capacity_is_ioerr(guest: Guest, daemon: Daemon, sector: int,
                                  nbytes: int) -> None:
    before = disk_read(daemon, IMAGE_SIZE - 4 * KiB, 4 * KiB)
    w = guest.blk.submit_write(sector, pattern(10, nbytes))
    r = guest.blk.submit_read(sector, nbytes)
    cw, cr = guest.blk.kick_and_wait([w, r])
    assert (cw.status, cw.used_len) == (VIRTIO_BLK_S_IOERR, 1)
    assert cr.status == VIRTIO_BLK_S_IOERR
    assert os.stat(daemon.image_path).st_size == IMAGE_SIZE  # not extended
    assert disk_read(daemon, IMAGE_SIZE - 4 * KiB, 4 * KiB) == before
    check_io_works(guest, daemon)
    daemon.wait_log("sector range beyond capacity")


@shared
@pytest.mark.parametrize("nbytes", [1, 100, 513, 4097])
def test_unaligned_length_is_ioerr(guest: Guest, daemon: Daemon, nbytes: int) -> None:
    old = pattern(11, 8 * KiB)
    disk_write(daemon, 0, old)
    assert guest.blk.write(0, pattern(12, nbytes)) == VIRTIO_BLK_S_IOERR
    c = guest.blk.kick_and_wait([guest.blk.submit_read(0, nbytes)])[0]
    assert c.status == VIRTIO_BLK_S_IOERR
    assert disk_read(daemon, 0, len(old)) == old
    check_io_works(guest, daemon)


@shared
@pytest.mark.parametrize("rtype", [2, 3, 5, 99, 0xFFFFFFFF])
def test_unknown_type_is_unsupp(guest: Guest, daemon: Daemon, rtype: int) -> None:
    req = guest.blk.submit_raw(rtype, 0, in_len=512)
    c = guest.blk.kick_and_wait([req])[0]
    assert (c.status, c.used_len) == (VIRTIO_BLK_S_UNSUPP, 1)
    assert c.data == bytes([guest.blk.poison]) * 512  # nothing read into the buffer
    check_io_works(guest, daemon)
    daemon.wait_log("unsupported request type")


@shared
def test_wrong_buffer_directions_are_ioerr(guest: Guest, daemon: Daemon) -> None:
    blk = guest.blk
    old = pattern(13, 4 * KiB)
    disk_write(daemon, 0, old)
    bad = [
        blk.submit_raw(VIRTIO_BLK_T_IN, 0, out_data=bytes(512), in_len=512),   # data to read out
        blk.submit_raw(VIRTIO_BLK_T_OUT, 0, out_data=bytes(512), in_len=512),  # writable data
    ]
    cs = blk.kick_and_wait(bad)
    assert [c.status for c in cs] == [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR]
    assert disk_read(daemon, 0, len(old)) == old
    # a header shorter than 16 bytes
    ram = guest.ram
    hdr = ram.alloc(8)
    ram.write(hdr, bytes(8))
    status = ram.alloc(1)
    ram.write(status, b"\xff")
    assert _raw_request(guest, [(hdr, 8, False), (status, 1, True)]) == 1
    assert ram.read(status, 1) == bytes([VIRTIO_BLK_S_IOERR])
    check_io_works(guest, daemon)
    daemon.wait_log("request header shorter than 16 bytes")


def test_host_io_error_is_ioerr(daemon: Daemon) -> None:
    """A write the host refuses (EFBIG past RLIMIT_FSIZE) and a read past the end of a
    file shrunk underneath the daemon: both IOERR, logged, and the queue goes on."""
    soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (1 * MiB, hard))
    with connect_guest(daemon) as g:
        before = disk_read(daemon, 2 * MiB, 4 * KiB)
        assert g.blk.write(2 * MiB // SECTOR, pattern(33, 4 * KiB)) == VIRTIO_BLK_S_IOERR
        assert disk_read(daemon, 2 * MiB, 4 * KiB) == before
        daemon.wait_log("host I/O error: File too large")
        check_io_works(g, daemon, sector=8)  # below the limit
        resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (soft, hard))
        os.truncate(daemon.image_path, 1 * MiB)
        c = g.blk.kick_and_wait([g.blk.submit_read(4 * MiB // SECTOR, 4 * KiB)])[0]
        assert c.status == VIRTIO_BLK_S_IOERR
        daemon.wait_log("host I/O error: Input/output error")
        check_io_works(g, daemon, sector=16)


def test_bad_chains_do_not_flood_the_log(daemon: Daemon) -> None:
    with connect_guest(daemon, queue_size=256) as g:
        for _ in range(3):
            bads = [bad_loop(g.queue) for _ in range(60)]
            for b in bads:
                g.queue.put_avail(b.head)
            g.queue.kick()
            _wait_used(g.queue, g.queue.avail_idx)
            g.blk.collect()
            assert len(g.blk.unexpected_used) == 60
            g.blk.unexpected_used.clear()
            for b in bads:
                g.queue.release_descs(b.descs)
        check_io_works(g, daemon)
        assert 1 <= daemon.log_count("descriptor loop") <= 10, daemon.log_text()


# =========================================================================================
# Many requests, index wrap, notifications
# =========================================================================================


SLOT_SECTORS = 8


def run_random_io(blk: BlkDriver, d: Daemon, *, total: int, depth: int, slots: int = 256,
                  base_sector: int = 0, indirect: bool = False, seed: int = 0) -> int:
    """Keep ``depth`` random reads/writes in flight until ``total`` completed, each on a
    4 KiB slot no other in-flight request uses; reads are checked against a model at
    completion, and the image against the model at the end. Kicks only when the device
    asks (need_kick). Returns how many kicks were sent."""
    rng = random.Random(seed)
    model = [bytes(SLOT_SECTORS * SECTOR)] * slots
    for k in range(slots):  # start from what is on disk
        model[k] = disk_read(d, (base_sector + k * SLOT_SECTORS) * SECTOR, SLOT_SECTORS * SECTOR)
    free = list(range(slots))
    rng.shuffle(free)
    pending: dict[int, tuple[BlkRequest, int, bytes | None]] = {}
    q = blk.queue
    submitted = completed = kicks = 0
    deadline = time.monotonic() + 30
    while completed < total:
        old = q.avail_idx
        while len(pending) < depth and submitted < total:
            slot = free.pop()
            sector = base_sector + slot * SLOT_SECTORS
            segs = rng.choice([1, 2, 3])
            if rng.random() < 0.5:
                data = rng.randbytes(SLOT_SECTORS * SECTOR)
                req = blk.submit_write(sector, data, segs=segs, indirect=indirect)
                pending[req.head] = (req, slot, data)
            else:
                req = blk.submit_read(sector, SLOT_SECTORS * SECTOR, segs=segs, indirect=indirect)
                pending[req.head] = (req, slot, None)
            submitted += 1
        q.publish()
        if q.avail_idx != old and q.need_kick(old):
            q.kick()
            kicks += 1
        if not blk.collect():
            q.enable_cb()
            if not blk.collect():
                if not q.wait_call(5.0):
                    raise TimeoutError(f"no completion; {len(pending)} in flight, "
                                       f"used_idx={q.used_idx()} avail_idx={q.avail_idx}")
                blk.collect()
        assert not blk.unexpected_used
        for head in [h for h, (r, _s, _d) in pending.items() if r.done]:
            req, slot, written = pending.pop(head)
            assert req.completion is not None
            assert req.completion.status == VIRTIO_BLK_S_OK, req
            if written is None:
                assert req.completion.data == model[slot], f"slot {slot} read back wrong"
            else:
                model[slot] = written
            free.insert(rng.randrange(len(free) + 1), slot)
            completed += 1
        assert time.monotonic() < deadline, "random I/O took too long"
    image = disk_read(d, base_sector * SECTOR, slots * SLOT_SECTORS * SECTOR)
    assert image == b"".join(model)
    return kicks


@shared
@pytest.mark.parametrize(("depth", "queue_size", "indirect"), [
    (32, 256, False), (64, 512, False), (64, 64, True)])
def test_many_requests_in_flight(daemon: Daemon, depth: int, queue_size: int,
                                 indirect: bool) -> None:
    with connect_guest(daemon, queue_size=queue_size) as g:
        run_random_io(g.blk, daemon, total=3000, depth=depth, indirect=indirect, seed=depth)
        assert g.fe.stop_queue(0) == 3000


@shared
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_ring_index_wraps_at_16_bits(daemon: Daemon, event_idx: bool) -> None:
    features = ALL_FEATURES if event_idx else ALL_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX)
    start = 65536 - 37
    with connect_guest(daemon, features=features, queue_size=128, start_idx=start) as g:
        assert g.queue.event_idx is event_idx
        run_random_io(g.blk, daemon, total=300, depth=16, slots=64, seed=start)
        assert g.queue.used_idx() == (start + 300) & 0xFFFF
        assert g.fe.stop_queue(0) == (start + 300) & 0xFFFF


@shared
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_event_idx_negotiation(daemon: Daemon, event_idx: bool) -> None:
    features = ALL_FEATURES if event_idx else ALL_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX)
    with connect_guest(daemon, features=features) as g:
        assert g.fe.offered_features & (1 << VIRTIO_RING_F_EVENT_IDX)
        assert bool(g.fe.features & (1 << VIRTIO_RING_F_EVENT_IDX)) is event_idx
        kicks = run_random_io(g.blk, daemon, total=500, depth=8, slots=64)
        assert kicks >= 1
        if event_idx:
            # An idle device asks to be kicked for the next buffer it has not seen.
            deadline = time.monotonic() + 2
            while g.queue.avail_event() != g.queue.avail_idx:
                assert time.monotonic() < deadline, (g.queue.avail_event(), g.queue.avail_idx)
                time.sleep(0.005)
        check_io_works(g, daemon)


def drain_stale_calls(q: DriverQueue) -> None:
    """Forget calls for work already collected: the device writes the call eventfd just
    after publishing used->idx, so a call can trail the completion the driver saw."""
    time.sleep(0.02)
    q.drain_call()


def _wait_used(q: DriverQueue, idx: int, timeout: float = 5.0) -> None:
    """Poll (without asking for a call) until used->idx reaches ``idx``."""
    deadline = time.monotonic() + timeout
    while q.used_idx() != idx & 0xFFFF:
        assert time.monotonic() < deadline, f"used idx {q.used_idx()}, waiting for {idx}"
        time.sleep(0.002)


@shared
def test_no_interrupt_flag_honoured_without_event_idx(daemon: Daemon) -> None:
    features = ALL_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX)
    with connect_guest(daemon, features=features) as g:
        blk, q = g.blk, g.queue
        check_io_works(g, daemon)
        drain_stale_calls(q)
        q.set_no_interrupt(True)
        data = pattern(14, 4 * KiB)
        reqs = [blk.submit_write(32 + 8 * k, data) for k in range(3)]
        blk.publish_and_kick()
        _wait_used(q, q.avail_idx)
        assert not q.wait_call(0.2), "device signalled despite VRING_AVAIL_F_NO_INTERRUPT"
        blk.collect()
        assert all(r.completion is not None and r.completion.ok for r in reqs)
        assert disk_read(daemon, 32 * SECTOR, len(data)) == data
        q.set_no_interrupt(False)
        r = blk.submit_read(32, len(data))
        blk.publish_and_kick()
        assert q.wait_call(5.0), "no call after NO_INTERRUPT was cleared"
        blk.collect()
        assert r.completion is not None and r.completion.data == data


@shared
def test_used_event_suppresses_calls_with_event_idx(daemon: Daemon) -> None:
    with connect_guest(daemon) as g:
        blk, q = g.blk, g.queue
        assert q.event_idx
        check_io_works(g, daemon)
        drain_stale_calls(q)
        q.set_used_event((q.used_idx() + 100) & 0xFFFF)  # far ahead: no call wanted
        r = blk.submit_write(64, pattern(15, 512))
        blk.publish_and_kick()
        _wait_used(q, q.avail_idx)
        assert not q.wait_call(0.2), "device signalled before reaching used_event"
        blk.collect()
        assert r.completion is not None and r.completion.ok
        q.set_used_event(q.last_used_idx)  # the next used entry should signal
        r = blk.submit_read(64, 512)
        blk.publish_and_kick()
        assert q.wait_call(5.0)
        blk.collect()
        assert r.completion is not None and r.completion.data == pattern(15, 512)


# =========================================================================================
# Read-only
# =========================================================================================


def test_read_only(start_daemon: StartDaemon, tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    content = pattern(16, 1 * MiB)
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(content)
    before = os.stat(image)
    d = start_daemon("--read-only", image=image)
    with connect_guest(d) as g:
        assert g.fe.offered_features & (1 << VIRTIO_BLK_F_RO)
        assert g.fe.features & (1 << VIRTIO_BLK_F_RO)
        blk = g.blk
        assert blk.read(0, len(content), segs=4) == content
        assert blk.write(0, bytes(4 * KiB)) == VIRTIO_BLK_S_IOERR
        assert blk.discard([(0, 8, 0)]) == VIRTIO_BLK_S_IOERR
        assert blk.write_zeroes([(8, 8, 0)]) == VIRTIO_BLK_S_IOERR
        assert blk.write_zeroes([(8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]) == \
            VIRTIO_BLK_S_IOERR
        assert blk.flush() == VIRTIO_BLK_S_OK
        assert blk.read(0, len(content)) == content
        d.wait_log("write to a read-only device")
    with open(image, "rb") as f:
        assert f.read(len(content)) == content
    after = os.stat(image)
    assert (after.st_size, after.st_blocks, after.st_mtime_ns) == \
        (before.st_size, before.st_blocks, before.st_mtime_ns)


@shared
def test_not_read_only_without_flag(guest: Guest) -> None:
    assert not guest.fe.offered_features & (1 << VIRTIO_BLK_F_RO)


# =========================================================================================
# Multiqueue
# =========================================================================================


@pytest.mark.parametrize("nq", [2, 4])
def test_multiqueue(start_daemon: StartDaemon, nq: int) -> None:
    d = start_daemon("--num-queues", str(nq))
    with connect_guest(d, queues=None) as g:
        assert g.fe.offered_features & (1 << VIRTIO_BLK_F_MQ)
        assert g.fe.get_queue_num() == nq
        assert len(g.drivers) == nq
        assert parse_blk_config(g.fe.get_config())["num_queues"] == nq
        with pytest.raises(AckError):
            g.fe.setup_queue(nq, 64)
        # 32 writes on every queue, all published before any is waited for
        per_queue = 32
        datas = {(qi, k): pattern(1000 * qi + k, 4 * KiB)
                 for qi in range(nq) for k in range(per_queue)}

        def sector(qi: int, k: int) -> int:
            return 10_000 + (qi * per_queue + k) * 8

        tokens = [[g.drivers[qi].submit_write(sector(qi, k), datas[qi, k], segs=2)
                   for k in range(per_queue)] for qi in range(nq)]
        for blk in g.drivers:
            blk.publish_and_kick()
        for blk, ts in zip(g.drivers, tokens, strict=True):
            assert all(c.ok for c in blk.wait(ts))
        for (qi, k), data in datas.items():
            assert disk_read(d, sector(qi, k) * SECTOR, len(data)) == data
        # and read each queue's data back through another queue, concurrently
        reads = [[g.drivers[(qi + 1) % nq].submit_read(sector(qi, k), 4 * KiB)
                  for k in range(per_queue)] for qi in range(nq)]
        for blk in g.drivers:
            blk.publish_and_kick()
        for qi, ts in enumerate(reads):
            cs = g.drivers[(qi + 1) % nq].wait(ts)
            assert [c.data for c in cs] == [datas[qi, k] for k in range(per_queue)]
        # every queue busy at once: random I/O on all of them from threads
        with ThreadPoolExecutor(nq) as pool:
            futures = [pool.submit(run_random_io, g.drivers[qi], d, total=300, depth=16,
                                   slots=32, base_sector=100_000 + qi * 32 * SLOT_SECTORS,
                                   seed=qi) for qi in range(nq)]
            for f in futures:
                f.result()


# =========================================================================================
# Memory slots (CONFIGURE_MEM_SLOTS)
# =========================================================================================


@shared
def test_add_mem_reg_instead_of_set_mem_table(daemon: Daemon) -> None:
    with connect_guest(daemon, add_mem_reg=True, buf_regions=(0, 1)) as g:
        assert g.fe.get_max_mem_slots() >= 32
        data = pattern(17, 16 * KiB)
        assert g.blk.write(200, data, segs=4) == VIRTIO_BLK_S_OK
        assert disk_read(daemon, 200 * SECTOR, len(data)) == data
        assert g.blk.read(200, len(data), segs=3) == data
        assert g.blk.read(200, len(data), segs=3, indirect=True) == data


@shared
def test_get_max_mem_slots(guest: Guest) -> None:
    assert guest.fe.get_max_mem_slots() >= 32


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


# =========================================================================================
# Control plane: config space, features, queue and memory set-up
# =========================================================================================


@shared
def test_config_space(guest: Guest) -> None:
    cfg = parse_blk_config(guest.fe.get_config())
    assert cfg["capacity"] == CAPACITY
    assert cfg["blk_size"] == SECTOR
    assert cfg["num_queues"] == 1
    assert cfg["seg_max"] >= 1 and cfg["size_max"] >= 4 * KiB
    assert cfg["max_discard_seg"] == 32 and cfg["max_write_zeroes_seg"] == 32
    assert cfg["max_discard_sectors"] > 0 and cfg["max_write_zeroes_sectors"] > 0
    assert cfg["write_zeroes_may_unmap"] == 1
    # a window of it, and reads past its end are zero
    assert guest.fe.get_config(8, 0) == guest.fe.get_config()[:8]
    assert guest.fe.get_config(16, 60) == guest.fe.get_config()[60:] + bytes(16)
    # config space is read-only here
    with pytest.raises(AckError):
        guest.fe.set_config(32, b"\x01")
    assert parse_blk_config(guest.fe.get_config())["writeback"] == 0
    check_io_works(guest, guest.daemon)


@shared
def test_features_not_offered_are_refused(guest: Guest) -> None:
    with pytest.raises(AckError):
        guest.fe.set_features(ALL_FEATURES)
    guest.fe.set_features(guest.fe.offered_features)  # the offer itself is fine
    check_io_works(guest, guest.daemon)


@shared
@pytest.mark.parametrize("size", [0, 3, 100, 2048, 65536])
def test_bad_queue_size_is_refused(guest: Guest, size: int) -> None:
    with pytest.raises(AckError):
        guest.fe.request_ack(SetVringNum(0, size))
    check_io_works(guest, guest.daemon)


@shared
@pytest.mark.parametrize("size", [4, 8, 1024])
def test_queue_sizes(daemon: Daemon, size: int) -> None:
    # A request takes 3 descriptors here, and a chain may not be longer than the queue
    # (an indirect table counts), so 4 is the smallest size this driver can use.
    with connect_guest(daemon, queue_size=size) as g:
        for k in range(6):  # 12 requests: wraps the small rings a few times
            data = pattern(size + k, 2 * KiB)
            assert g.blk.write(k * 4, data) == VIRTIO_BLK_S_OK
            assert g.blk.read(k * 4, len(data)) == data
            assert disk_read(daemon, k * 4 * SECTOR, len(data)) == data


@shared
@pytest.mark.parametrize("which", ["desc", "avail", "used"])
@pytest.mark.parametrize("how", ["outside", "misaligned"])
def test_bad_ring_address_is_refused(daemon: Daemon, which: str, how: str) -> None:
    with connect_guest(daemon, queues=0) as g:
        ram = g.ram
        q = DriverQueue(ram, 64)
        addrs = {"desc": q.desc_gpa, "avail": q.avail_gpa, "used": q.used_gpa}
        uva = {k: ram.uva_of(v) for k, v in addrs.items()}
        uva[which] = ram.UVA_BASE + ram.size + 4096 if how == "outside" else uva[which] + 1
        g.fe.request_ack(SetVringNum(0, 64))
        g.fe.request_ack(SetVringBase(0, 0))
        g.fe.request_ack(SetVringAddr(0, 0, uva["desc"], uva["used"], uva["avail"], 0))
        g.fe.request_ack(SetVringKick(0, q.kick_fd))
        g.fe.request_ack(SetVringCall(0, q.call_fd))
        with pytest.raises(AckError):  # the queue cannot start
            g.fe.enable_queue(0)
        q.close()
        daemon.wait_log("ring address not in guest memory or misaligned")
        g.drivers.append(BlkDriver(g.fe.setup_queue(0, 64)))
        check_io_works(g, daemon)


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


def test_memory_slots_fill_up_and_are_released(daemon: Daemon) -> None:
    idle = daemon.resources()
    with connect_guest(daemon, add_mem_reg=True) as g:
        slots = g.fe.get_max_mem_slots()
        extra = os.memfd_create("extra-slots", os.MFD_CLOEXEC)
        try:
            os.ftruncate(extra, 64 * PAGE)
            regions = [MemoryRegion(guest_phys_addr=(8 << 30) + k * 2 * PAGE, memory_size=PAGE,
                                    userspace_addr=(1 << 44) + k * PAGE, mmap_offset=k * PAGE)
                       for k in range(slots - 2 + 1)]
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
        _wait_used(q, 1)
        assert q.read_used_elem(0) == (d[0], 1)
        assert ram.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
        assert disk_read(daemon, 90 * SECTOR, len(data)) == data
    finally:
        fe.close()
        ram.close()


@shared
def test_reset_device_then_set_up_again(guest: Guest) -> None:
    d = guest.daemon
    check_io_works(guest, d)
    guest.fe.reset_device()
    # the old ring is no longer served
    drain_stale_calls(guest.queue)
    data = pattern(32, 4 * KiB)
    before = disk_read(d, 33 * SECTOR, len(data))
    stale = guest.blk.submit_write(33, data)
    guest.blk.publish_and_kick()
    assert not guest.queue.wait_call(0.3)
    assert not stale.done
    assert disk_read(d, 33 * SECTOR, len(data)) == before
    guest.fe.set_features(guest.fe.features)
    guest.fe.set_mem_table()
    blk = BlkDriver(guest.fe.setup_queue(0, 128))
    data = pattern(27, 4 * KiB)
    assert blk.write(33, data) == VIRTIO_BLK_S_OK
    assert disk_read(d, 33 * SECTOR, len(data)) == data


@shared
def test_disabled_ring_is_not_served(guest: Guest) -> None:
    d = guest.daemon
    check_io_works(guest, d)
    guest.fe.enable_queue(0, False)
    drain_stale_calls(guest.queue)
    data = pattern(28, 4 * KiB)
    before = disk_read(d, 44 * SECTOR, len(data))
    assert before != data
    r = guest.blk.submit_write(44, data)
    guest.blk.publish_and_kick()
    assert not guest.queue.wait_call(0.3)
    assert not r.done and guest.queue.used_idx() == 2
    assert disk_read(d, 44 * SECTOR, len(data)) == before
    guest.fe.enable_queue(0, True)
    assert guest.blk.wait([r])[0].ok
    assert disk_read(d, 44 * SECTOR, len(data)) == data


@shared
def test_no_call_fd_means_polling_driver(daemon: Daemon) -> None:
    """SET_VRING_CALL with NOFD: the device must complete requests without signalling."""
    with connect_guest(daemon) as g:
        g.fe.request_ack(SetVringCall(0, None))
        data = pattern(29, 8 * KiB)
        c = g.blk.kick_and_wait([g.blk.submit_write(55, data)], poll_interval=0.005)[0]
        assert c.ok
        assert disk_read(daemon, 55 * SECTOR, len(data)) == data
        c = g.blk.kick_and_wait([g.blk.submit_read(55, len(data))], poll_interval=0.005)[0]
        assert c.data == data
        assert not g.queue.drain_call()


def test_err_fd_signalled_when_ring_breaks(daemon: Daemon) -> None:
    with connect_guest(daemon) as g:
        err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            g.fe.set_vring_err(0, err)
            check_io_works(g, daemon)
            with pytest.raises(BlockingIOError):
                os.eventfd_read(err)  # not for good requests (or bad chains)
            _break_queue0(daemon, g)
            assert select.select([err], [], [], 2)[0], "err eventfd not signalled"
            assert os.eventfd_read(err) >= 1
        finally:
            os.close(err)


def test_kick_without_fd_is_refused_or_polled(daemon: Daemon) -> None:
    """SET_VRING_KICK with NOFD asks for polling: a back end must poll, or refuse; it
    must not ack and then leave the ring silent."""
    with connect_guest(daemon) as g:
        check_io_works(g, daemon)
        try:
            g.fe.request_ack(SetVringKick(0, None))
        except AckError:
            # refused: the front end can give a kick fd again and carry on
            g.fe.request_ack(SetVringKick(0, g.queue.kick_fd))
            check_io_works(g, daemon, sector=40)
            return
        # accepted: the device must poll, so a request completes without any kick
        data = pattern(31, 4 * KiB)
        r = g.blk.submit_write(40, data)
        g.queue.publish()
        assert g.blk.wait([r], timeout=2.0, poll_interval=0.005)[0].ok
        assert disk_read(daemon, 40 * SECTOR, len(data)) == data


def test_control_messages_while_other_queues_are_busy(start_daemon: StartDaemon) -> None:
    """SET_MEM_TABLE (all queues stop and restart around it) and GET_VRING_BASE +
    restart of queue 0, while queue 1 runs random I/O from another thread."""
    d = start_daemon("--num-queues", "2")
    with connect_guest(d, queues=2, queue_size=256) as g:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(run_random_io, g.drivers[1], d, total=4000, depth=32, slots=64,
                               base_sector=60_000, seed=5)
            k = 0
            while not busy.done():
                g.fe.set_mem_table()
                base = g.fe.stop_queue(0)
                g.fe.request_ack(SetVringBase(0, base))
                g.fe.request_ack(SetVringKick(0, g.queue.kick_fd))
                data = pattern(600 + k, 4 * KiB)
                assert g.blk.write(k * 8, data) == VIRTIO_BLK_S_OK
                assert disk_read(d, k * 8 * SECTOR, len(data)) == data
                k += 1
            busy.result()
        assert k >= 3, "the busy queue finished before the control plane did anything"


# =========================================================================================
# GET_VRING_BASE, stop and restart
# =========================================================================================


@shared
def test_get_vring_base_and_restart(daemon: Daemon) -> None:
    with connect_guest(daemon, queue_size=64) as g:
        blk, q = g.blk, g.queue
        n = 0
        for k in range(45):
            assert blk.write(k * 8, pattern(k, 4 * KiB)) == VIRTIO_BLK_S_OK
            n += 1
        assert g.fe.stop_queue(0) == n
        q.drain_call()  # the worker is joined: no call can trail any more
        # stopped: a request made available now is not served...
        data = pattern(100, 4 * KiB)
        pending = blk.submit_write(1000, data)
        blk.publish_and_kick()
        assert not q.wait_call(0.3)
        assert not pending.done and q.used_idx() == n
        # ...until the ring is restarted where it stopped, with a new kick fd
        g.fe.request_ack(SetVringBase(0, n))
        new_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        os.close(q.kick_fd)
        q.kick_fd = new_kick
        g.fe.request_ack(SetVringKick(0, new_kick))
        assert blk.wait([pending])[0].ok
        assert disk_read(daemon, 1000 * SECTOR, len(data)) == data
        for k in range(45):
            assert blk.read(k * 8, 4 * KiB) == pattern(k, 4 * KiB)
        assert g.fe.stop_queue(0) == n + 1 + 45
        assert q.used_idx() == n + 1 + 45


@shared
def test_get_vring_base_twice_is_stable(guest: Guest) -> None:
    for k in range(5):
        assert guest.blk.write(k, bytes(512)) == VIRTIO_BLK_S_OK
    assert guest.fe.stop_queue(0) == 5
    assert guest.fe.stop_queue(0) == 5


# =========================================================================================
# Hostile chains
# =========================================================================================


@dataclass
class BadChain:
    head: int                 # what goes into the avail ring
    descs: list[int]          # main-table descriptors to release afterwards
    status_gpa: int | None    # a status byte the device must leave alone
    used: bool = True         # whether the device returns the head (with length 0)


def _hdr(ram: GuestRam, rtype: int = VIRTIO_BLK_T_IN, sector: int = 0) -> int:
    gpa = ram.alloc(16)
    ram.write(gpa, BLK_HDR.pack(rtype, 0, sector))
    return gpa


def _buf(ram: GuestRam, n: int, fill: int = 0xFF) -> int:
    gpa = ram.alloc(n)
    ram.fill(gpa, n, fill)
    return gpa


def _table(ram: GuestRam, entries: list[tuple[int, int, int, int]]) -> int:
    gpa = ram.alloc(DESC_SIZE * len(entries), 16)
    for k, e in enumerate(entries):
        ram.pack("<QIHH", gpa + DESC_SIZE * k, *e)
    return gpa


N, W, I = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


def _direct(q: DriverQueue, entries: list[tuple[int, int, int, int | None]]) -> list[int]:
    """Write entries (addr, len, flags, next as an index into ``entries`` or a raw
    number if >= len) into reserved descriptors."""
    idx = q.reserve_descs(len(entries))
    for k, (addr, n, flags, nxt) in enumerate(entries):
        raw = 0 if nxt is None else (idx[nxt] if nxt < len(entries) else nxt)
        q.write_desc(idx[k], addr, n, flags, raw)
    return idx


def bad_outside_memory(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (HOLE_GPA, 512, W | N, 2), (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_straddles_region_end(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (REGION0_END - 256, 512, W | N, 2),
                    (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_huge_length(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (_buf(ram, 512), 0xFFFF_FFFF, W | N, 2),
                    (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_address_wraps(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (2**64 - 256, 512, W | N, 2), (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_loop(q: DriverQueue) -> BadChain:
    ram = q.ram
    d = _direct(q, [(_hdr(ram, VIRTIO_BLK_T_OUT), 16, N, 1), (_buf(ram, 512), 512, N, 2),
                    (_buf(ram, 512), 512, N, 1)])
    return BadChain(d[0], d, None)


def bad_self_loop_writable(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (st, 1, W | N, 1)])
    return BadChain(d[0], d, st)


def bad_indirect_longer_than_queue(q: DriverQueue) -> BadChain:
    ram = q.ram
    n = q.num + 1
    st = _buf(ram, 1)
    entries = [(_hdr(ram), 16, N, 1)] + [(_buf(ram, 512), 512, W | N, k + 2)
                                         for k in range(n - 2)] + [(st, 1, W, 0)]
    d = _direct(q, [(_table(ram, entries), DESC_SIZE * n, I, None)])
    return BadChain(d[0], d, st)


def bad_nested_indirect(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    inner = _table(ram, [(st, 1, W, 0)])
    outer = _table(ram, [(_hdr(ram), 16, N, 1), (inner, DESC_SIZE, I, 0)])
    d = _direct(q, [(outer, 2 * DESC_SIZE, I, None)])
    return BadChain(d[0], d, st)


def bad_indirect_outside_memory(q: DriverQueue) -> BadChain:
    d = _direct(q, [(HOLE_GPA, 3 * DESC_SIZE, I, None)])
    return BadChain(d[0], d, None)


def bad_indirect_with_next(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    table = _table(ram, [(_hdr(ram), 16, N, 1), (st, 1, W, 0)])
    d = _direct(q, [(table, 2 * DESC_SIZE, I | N, 1), (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_indirect_length(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    table = _table(ram, [(_hdr(ram), 16, N, 1), (st, 1, W, 0)])
    d = _direct(q, [(table, DESC_SIZE + 8, I, None)])
    return BadChain(d[0], d, st)


def bad_indirect_empty(q: DriverQueue) -> BadChain:
    d = _direct(q, [(_buf(q.ram, 64), 0, I, None)])
    return BadChain(d[0], d, None)


def bad_indirect_loop(q: DriverQueue) -> BadChain:
    ram = q.ram
    table = _table(ram, [(_hdr(ram), 16, N, 1), (_buf(ram, 16), 16, N, 0)])
    d = _direct(q, [(table, 2 * DESC_SIZE, I, None)])
    return BadChain(d[0], d, None)


def bad_indirect_next_out_of_table(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    table = _table(ram, [(_hdr(ram), 16, N, 1), (st, 1, W | N, 2)])
    d = _direct(q, [(table, 2 * DESC_SIZE, I, None)])
    return BadChain(d[0], d, st)


def bad_status_readable(q: DriverQueue) -> BadChain:
    """A complete write request whose 'status' buffer is device-readable: the walker
    accepts it, but there is nowhere to answer, so the device must not do the write."""
    ram = q.ram
    st = _buf(ram, 1)
    data = ram.alloc(512)
    ram.write(data, b"\x66" * 512)
    d = _direct(q, [(_hdr(ram, VIRTIO_BLK_T_OUT, 5), 16, N, 1), (data, 512, N, 2),
                    (st, 1, 0, None)])
    return BadChain(d[0], d, st)


def bad_readable_after_writable(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (_buf(ram, 512), 512, W | N, 2),
                    (_buf(ram, 16), 16, N, 3), (st, 1, W, None)])
    return BadChain(d[0], d, st)


def bad_next_out_of_range(q: DriverQueue) -> BadChain:
    ram = q.ram
    st = _buf(ram, 1)
    d = _direct(q, [(_hdr(ram), 16, N, 1), (st, 1, W | N, q.num + 5)])
    return BadChain(d[0], d, st)


def bad_head_out_of_range(q: DriverQueue) -> BadChain:
    return BadChain(q.num + 3, [], None, used=False)


HOSTILE: dict[str, tuple[Callable[[DriverQueue], BadChain], str]] = {
    "outside-memory": (bad_outside_memory, "buffer outside guest memory"),
    "straddles-region-end": (bad_straddles_region_end, "buffer outside guest memory"),
    "huge-length": (bad_huge_length, "buffer outside guest memory"),
    "address-wraps": (bad_address_wraps, "buffer outside guest memory"),
    "loop": (bad_loop, "descriptor loop"),
    "self-loop": (bad_self_loop_writable, "descriptor loop"),
    "indirect-longer-than-queue": (bad_indirect_longer_than_queue,
                                   "chain longer than the queue size"),
    "nested-indirect": (bad_nested_indirect, "nested indirect descriptor"),
    "indirect-outside-memory": (bad_indirect_outside_memory,
                                "indirect table outside guest memory"),
    "indirect-with-next": (bad_indirect_with_next, "indirect descriptor with NEXT set"),
    "indirect-length": (bad_indirect_length, "indirect table length not a positive multiple"),
    "indirect-empty": (bad_indirect_empty, "indirect table length not a positive multiple"),
    "indirect-loop": (bad_indirect_loop, "descriptor loop"),
    "indirect-next-out-of-table": (bad_indirect_next_out_of_table,
                                   "next index outside its descriptor table"),
    "status-readable": (bad_status_readable, "no device-writable status byte"),
    "readable-after-writable": (bad_readable_after_writable,
                                "device-readable descriptor after a device-writable one"),
    "next-out-of-range": (bad_next_out_of_range, "next index outside its descriptor table"),
}


def submit_bad_chain(g: Guest, make: Callable[[DriverQueue], BadChain]) -> BadChain:
    """Publish a hostile chain alone, kick, and wait until the device has dealt with it."""
    blk, q = g.blk, g.queue
    bad = make(q)
    used_before = q.used_idx()
    q.put_avail(bad.head)
    q.kick()
    if bad.used:
        deadline = time.monotonic() + 5
        while not blk.unexpected_used:
            blk.collect()
            if blk.unexpected_used:
                break
            q.enable_cb()
            blk.collect()
            assert time.monotonic() < deadline, "the bad chain was never returned"
            q.wait_call(0.05)
        assert blk.unexpected_used == [(bad.head, 0)]
        blk.unexpected_used.clear()
        q.release_descs(bad.descs)
    else:
        time.sleep(0.05)
        assert q.used_idx() == used_before
    return bad


@shared
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_chain(daemon: Daemon, case: str) -> None:
    make, logged = HOSTILE[case]
    data0 = pattern(19, SECTOR)
    disk_write(daemon, 5 * SECTOR, data0)
    with connect_guest(daemon) as g:
        check_io_works(g, daemon, sector=50)
        bad = submit_bad_chain(g, make)
        if bad.status_gpa is not None:
            assert g.ram.read(bad.status_gpa, 1)[0] == STATUS_UNTOUCHED
        daemon.wait_log(logged)
        # the same queue goes on
        check_io_works(g, daemon, sector=60)
    assert disk_read(daemon, 5 * SECTOR, SECTOR) == data0  # status-readable write not done
    check_new_connection_works(daemon)


@shared
def test_hostile_chains_mixed_into_a_batch(daemon: Daemon) -> None:
    """Bad chains among good ones in one pass: each good one completes, each bad one is
    returned with length 0, and the batch goes on."""
    with connect_guest(daemon, queue_size=256) as g:
        blk, q = g.blk, g.queue
        goods: list[tuple[BlkRequest, int, bytes]] = []
        bads: list[BadChain] = []
        makers = [m for m, _t in HOSTILE.values()]
        for k, make in enumerate(makers):
            data = pattern(200 + k, 1024)
            goods.append((blk.submit_write(2000 + 2 * k, data), 2000 + 2 * k, data))
            bad = make(q)
            q._put_ring_entry(bad.head)  # unpublished; all go out at once below
            bads.append(bad)
        blk.publish_and_kick()
        cs = blk.wait([t for t, _s, _d in goods])
        assert all(c.ok for c in cs)
        for _t, s, data in goods:
            assert disk_read(daemon, s * SECTOR, len(data)) == data
        returned = sorted(blk.unexpected_used)
        assert returned == sorted((b.head, 0) for b in bads if b.used)
        check_io_works(g, daemon)
    check_new_connection_works(daemon)


@shared
def test_indirect_without_feature_is_rejected(daemon: Daemon) -> None:
    features = ALL_FEATURES & ~(1 << VIRTIO_RING_F_INDIRECT_DESC)
    with connect_guest(daemon, features=features) as g:
        assert not g.fe.features & (1 << VIRTIO_RING_F_INDIRECT_DESC)
        before = disk_read(daemon, 3 * SECTOR, 512)
        req = g.blk.submit_write(3, pattern(21, 512), indirect=True)
        c = g.blk.kick_and_wait([req])[0]
        assert (c.status, c.used_len) == (None, 0)
        assert disk_read(daemon, 3 * SECTOR, 512) == before
        daemon.wait_log("INDIRECT_DESC not negotiated")
        check_io_works(g, daemon)


def _break_queue0(d: Daemon, g: Guest, how: str = "avail-idx-jump") -> None:
    """Make queue 0's avail ring garbage -- claim more available buffers than it holds,
    or offer a head outside the table -- and wait for the daemon to give up on it."""
    q0 = g.drivers[0].queue
    if how == "avail-idx-jump":
        q0.set_avail_idx(q0.avail_idx + q0.num + 1)
        q0.kick()
        d.wait_log("avail index moved further than the queue size")
    else:
        submit_bad_chain(g, bad_head_out_of_range)
        d.wait_log("head index outside the descriptor table")
    d.wait_log("ring broken")


@pytest.mark.parametrize("how", ["avail-idx-jump", "head-out-of-range"])
def test_garbage_avail_ring_breaks_only_that_queue(start_daemon: StartDaemon,
                                                    how: str) -> None:
    d = start_daemon("--num-queues", "2")
    data = pattern(23, 8 * KiB)
    with connect_guest(d, queues=2) as g:
        q0, b0, b1 = g.drivers[0].queue, g.drivers[0], g.drivers[1]
        check_io_works(g, d)
        _break_queue0(d, g, how)
        # queue 0 is stopped: a sane index and a good request get no answer
        q0.drain_call()
        if how == "avail-idx-jump":
            q0.set_avail_idx(q0.avail_idx - q0.num - 1)
        r = b0.submit_write(11, pattern(22, 512))
        b0.publish_and_kick()
        assert not q0.wait_call(0.3)
        assert not r.done
        assert disk_read(d, 11 * SECTOR, 512) == bytes(512)
        # queue 1 keeps working
        assert b1.write(400, data) == VIRTIO_BLK_S_OK
        assert disk_read(d, 400 * SECTOR, len(data)) == data
        assert b1.read(400, len(data)) == data
        assert d.log_count("ring broken") == 1
    with connect_guest(d, queues=2) as g:
        check_io_works(g, d)
        assert g.drivers[1].read(400, len(data)) == data


def test_broken_queue_restarts_after_get_vring_base(start_daemon: StartDaemon) -> None:
    d = start_daemon("--num-queues", "2")
    with connect_guest(d, queues=2) as g:
        check_io_works(g, d)
        _break_queue0(d, g)
        g.fe.stop_queue(0)
        blk = BlkDriver(g.fe.setup_queue(0, 128))
        data = pattern(24, 4 * KiB)
        assert blk.write(12, data) == VIRTIO_BLK_S_OK
        assert disk_read(d, 12 * SECTOR, len(data)) == data
        assert d.log_count("ring broken") == 1


def test_broken_queue_restarts_when_set_up_again(start_daemon: StartDaemon) -> None:
    """The log promises 'queue stopped until the front end sets it up again': a plain
    set-up (NUM, BASE 0, ADDR, KICK, CALL, ENABLE) with no GET_VRING_BASE must revive it
    (the new SET_VRING_BASE must win over the index the dead worker stopped at)."""
    d = start_daemon("--num-queues", "2")
    with connect_guest(d, queues=2) as g:
        check_io_works(g, d)
        _break_queue0(d, g)
        blk = BlkDriver(g.fe.setup_queue(0, 128))
        data = pattern(24, 4 * KiB)
        assert blk.write(12, data, timeout=1.0) == VIRTIO_BLK_S_OK
        assert disk_read(d, 12 * SECTOR, len(data)) == data
        assert d.log_count("ring broken") == 1


# =========================================================================================
# Protocol junk over the socket
# =========================================================================================


_HDR = struct.Struct("<III")


def _hdr_bytes(request: int, flags: int, size: int) -> bytes:
    return _HDR.pack(request, flags, size)


def _junk_cases() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, number of eventfds to attach, text the log line must have)"""
    sf, kick, gf = Request.SET_FEATURES, Request.SET_VRING_KICK, Request.GET_FEATURES
    return {
        "version-0": (_hdr_bytes(gf, 0, 0), 0, "header version 0"),
        "version-2": (_hdr_bytes(gf, 2, 0), 0, "header version 2"),
        "version-3": (_hdr_bytes(gf, 3, 0), 0, "header version 3"),
        "reply-flag": (_hdr_bytes(gf, 1 | 4, 0), 0, "request with the REPLY flag"),
        "size-over-4096": (_hdr_bytes(gf, 1, 4097), 0, "exceeds the maximum 4096"),
        "size-huge": (_hdr_bytes(sf, 1, 0xFFFFFFFF), 0, "exceeds the maximum 4096"),
        "short-payload": (_hdr_bytes(sf, 1, 4) + bytes(4), 0, "payload size 4, expected 8"),
        "long-payload": (_hdr_bytes(gf, 1, 8) + bytes(8), 0, "payload size 8, expected 0"),
        "kick-without-fd": (_hdr_bytes(kick, 1, 8) + struct.pack("<Q", 0), 0,
                            "0 fds attached, expected 1"),
        "extra-fds": (_hdr_bytes(gf, 1, 0), 2, "2 fds attached, expected 0"),
        "kick-two-fds": (_hdr_bytes(kick, 1, 8) + struct.pack("<Q", 0), 2,
                         "2 fds attached, expected 1"),
        "too-many-fds": (_hdr_bytes(gf, 1, 0), 9, "more than 8 fds"),
        "mem-table-zero-regions": (_hdr_bytes(Request.SET_MEM_TABLE, 1, 8) + bytes(8), 0,
                                   "0 regions"),
    }


JUNK = _junk_cases()


def _raw_frontend(d: Daemon) -> FrontEnd:
    return FrontEnd(d.socket_path, GuestRam(1 * MiB)).connect()


def _close_raw(fe: FrontEnd) -> None:
    fe.close()
    fe.ram.close()


# On a connection with running queues too, for a few representative cases.
_RUNNING = {"version-2", "size-huge", "kick-without-fd", "extra-fds", "too-many-fds"}


@pytest.mark.parametrize(("case", "after_setup"),
                         [(c, False) for c in JUNK] + [(c, True) for c in sorted(_RUNNING)],
                         ids=[f"{c}-fresh" for c in JUNK] + [f"{c}-running"
                                                             for c in sorted(_RUNNING)])
def test_malformed_message_closes_connection(start_daemon: StartDaemon, case: str,
                                             after_setup: bool) -> None:
    data, nfds, logged = JUNK[case]
    d = start_daemon()
    idle = d.resources()
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    # junk on a fresh connection, or on one with mapped memory and a running queue
    g = connect_guest(d) if after_setup else None
    fe = g.fe if g is not None else _raw_frontend(d)
    try:
        if g is not None:
            check_io_works(g, d)
        try:
            fe.raw_send(data, fds)
        except BackEndClosed:
            pass
        assert fe.is_closed_by_peer(3.0)
    finally:
        if g is not None:
            g.close()
        else:
            _close_raw(fe)
        for fd in fds:
            os.close(fd)
    lines = d.wait_log("disconnected: malformed message")
    assert len(lines) == 1
    assert logged in lines[0], lines
    d.wait_disconnects(1)
    assert d.settled_resources(idle) == idle  # the attached fds were closed, memory unmapped
    check_new_connection_works(d)


def test_short_header_then_close(daemon: Daemon) -> None:
    idle = daemon.resources()
    fe = _raw_frontend(daemon)
    fe.raw_send(_hdr_bytes(Request.GET_FEATURES, 1, 0)[:6])
    _close_raw(fe)
    daemon.wait_disconnects(1)
    assert "front end closed the connection" in daemon.wait_log("disconnected:", 2)[-1]
    assert daemon.settled_resources(idle) == idle
    # half a payload, with an fd, then close
    fe = _raw_frontend(daemon)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    fe.raw_send(_hdr_bytes(Request.SET_FEATURES, 1, 8) + bytes(3), [efd])
    os.close(efd)
    _close_raw(fe)
    daemon.wait_disconnects(2)
    assert daemon.settled_resources(idle) == idle
    check_new_connection_works(daemon)
    assert "malformed" not in daemon.log_text()


@shared
@pytest.mark.parametrize("code", [99, int(Request.SET_LOG_BASE), int(Request.SET_STATUS)])
def test_unknown_request_with_need_reply(daemon: Daemon, code: int) -> None:
    with connect_guest(daemon, queues=0) as g:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        reply = g.fe.request(Unknown(code, 0, b"\0" * 8, (efd,), need_reply=True))
        os.close(efd)
        assert isinstance(reply, U64Reply)
        assert reply.request == code and reply.value != 0
        daemon.wait_log("unsupported request")
        # the connection stays up and works
        assert not g.fe.is_closed_by_peer(0.1)
        assert g.fe.get_features() == g.fe.offered_features
        g.drivers.append(BlkDriver(g.fe.setup_queue(0, 128)))
        check_io_works(g, daemon)
    daemon.wait_disconnects(1)
    assert daemon.log_count("malformed") == 0


def test_unknown_request_without_need_reply(daemon: Daemon) -> None:
    idle = daemon.resources()
    with connect_guest(daemon, queues=0) as g:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        assert g.fe.request(Unknown(99, 0, b"junk", (efd,))) is None
        os.close(efd)
        assert not g.fe.is_closed_by_peer(0.2)
        assert g.fe.request(GetFeatures()) is not None  # the next reply is GET_FEATURES'
        g.drivers.append(BlkDriver(g.fe.setup_queue(0, 128)))
        check_io_works(g, daemon)
    daemon.wait_disconnects(1)
    assert daemon.settled_resources(idle) == idle
    assert daemon.log_count("malformed") == 0


@shared
def test_messages_split_and_coalesced(daemon: Daemon) -> None:
    """The stream is cut anywhere: messages a byte at a time, several in one send, and an
    fd sent with the header while the payload follows in a later send."""
    with connect_guest(daemon) as g:
        fe = g.fe
        get_features = encode_message(GetFeatures())[0]
        get_queue_num = encode_message(GetQueueNum())[0]
        for b in get_features:
            fe.raw_send(bytes([b]))
            time.sleep(0.001)
        r = fe.read_reply()
        assert isinstance(r, U64Reply) and r.value == fe.offered_features
        fe.raw_send(get_queue_num + get_features + get_queue_num)
        replies = [fe.read_reply() for _ in range(3)]
        assert [(x.request, x.value) for x in replies if isinstance(x, U64Reply)] == [
            (Request.GET_QUEUE_NUM, 1), (Request.GET_FEATURES, fe.offered_features),
            (Request.GET_QUEUE_NUM, 1)]
        # a new call fd, its header (with the fd) and payload in two sends
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        msg, fds = encode_message(SetVringCall(0, call, need_reply=True))
        fe.raw_send(msg[:12], fds)
        time.sleep(0.01)
        fe.raw_send(msg[12:])
        ack = fe.read_reply()
        assert isinstance(ack, U64Reply) and ack.value == 0
        os.close(g.queue.call_fd)
        g.queue.call_fd = call
        check_io_works(g, daemon)  # completions are signalled on the new fd


@shared
def test_set_owner_alone_then_hangup(daemon: Daemon) -> None:
    """A front end that negotiates and leaves without ever setting a queue up."""
    for _ in range(3):
        fe = _raw_frontend(daemon)
        fe.negotiate()
        _close_raw(fe)
    daemon.wait_disconnects(3)
    check_new_connection_works(daemon)


# =========================================================================================
# Disconnects and resource leaks
# =========================================================================================


def test_disconnect_mid_io_cycles_leak_nothing(start_daemon: StartDaemon) -> None:
    d = start_daemon("--num-queues", "2")
    idle = d.resources()
    assert idle["memfd_maps"] == 0
    cycles, per_cycle, size = 20, 96, 4 * KiB
    completed: dict[int, bytes] = {}   # sector -> data whose completion we saw
    uncertain: dict[int, bytes] = {}   # sector -> data submitted, completion not seen
    for c in range(cycles):
        g = connect_guest(d, queues=2, queue_size=256)
        try:
            during = d.resources()
            assert during["memfd_maps"] >= 1
            assert during["threads"] == idle["threads"] + 2
            # check what earlier cycles wrote
            for sector, data in list(completed.items())[-8:]:
                assert g.blk.read(sector, size) == data
            reqs: list[tuple[BlkRequest, int, bytes]] = []
            for k in range(per_cycle):
                sector = (c * per_cycle + k) * 8
                data = pattern(c * 1000 + k, size)
                blk = g.drivers[k % 2]
                reqs.append((blk.submit_write(sector, data, segs=2), sector, data))
                if k == per_cycle // 2:  # see the first half through on queue 0
                    for b in g.drivers:
                        b.publish_and_kick()
                    g.drivers[0].wait([r for r, _s, _d in reqs[0::2]])
            for b in g.drivers:
                b.publish_and_kick()
            for b in g.drivers:
                b.collect()
        finally:
            g.close()  # no GET_VRING_BASE: just hang up with requests in flight
        for r, sector, data in reqs:
            (completed if r.done else uncertain)[sector] = data
        d.wait_disconnects(c + 1)
        assert d.settled_resources(idle) == idle, f"cycle {c}"
    assert len(completed) >= cycles * 4
    for sector, data in completed.items():
        assert disk_read(d, sector * SECTOR, size) == data
    for sector, data in uncertain.items():
        assert disk_read(d, sector * SECTOR, size) in (data, bytes(size))
    with connect_guest(d) as g:
        for sector, data in list(completed.items())[:50]:
            assert g.blk.read(sector, size) == data


def test_disconnect_while_queue_stopped_and_with_junk_state(daemon: Daemon) -> None:
    """Hang-ups in odd states: memory but no queue, a stopped queue, a queue with no
    call fd, memory added by ADD_MEM_REG and half removed."""
    idle = daemon.resources()
    with connect_guest(daemon, queues=0):
        pass
    with connect_guest(daemon) as g:
        check_io_works(g, daemon)
        g.fe.stop_queue(0)
    with connect_guest(daemon, add_mem_reg=True) as g:
        check_io_works(g, daemon)
        g.fe.remove_mem_region(1)
    daemon.wait_disconnects(3)
    assert daemon.settled_resources(idle) == idle


@shared
def test_second_front_end_waits_for_the_first(daemon: Daemon) -> None:
    """One front end at a time: a second connection is served once the first leaves."""
    g1 = connect_guest(daemon)
    try:
        check_io_works(g1, daemon)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.socket_path))
        s.sendall(_hdr_bytes(Request.GET_FEATURES, 1, 0))
        assert not select.select([s], [], [], 0.3)[0]  # not served yet
        check_io_works(g1, daemon, sector=3000)
    finally:
        g1.close()
    assert select.select([s], [], [], 5)[0]
    reply = s.recv(64)
    s.close()
    assert len(reply) == 20 and _HDR.unpack_from(reply)[0] == Request.GET_FEATURES
    check_new_connection_works(daemon)


# =========================================================================================
# SIGTERM
# =========================================================================================


def test_sigterm_while_idle(daemon: Daemon) -> None:
    assert daemon.socket_path.exists()
    assert daemon.terminate() == 0
    assert not daemon.socket_path.exists()
    assert "stopped" in daemon.log_text()


def test_sigterm_while_connected_keeps_data(daemon: Daemon) -> None:
    with connect_guest(daemon) as g:
        data = pattern(24, 256 * KiB)
        assert g.blk.write(512, data, segs=8) == VIRTIO_BLK_S_OK
        assert daemon.terminate() == 0
        assert g.fe.is_closed_by_peer(1.0)
    assert not daemon.socket_path.exists()
    assert disk_read(daemon, 512 * SECTOR, len(data)) == data


def test_sigterm_with_io_in_flight(daemon: Daemon) -> None:
    with connect_guest(daemon, queue_size=256) as g:
        blk = g.blk
        before = pattern(25, 64 * KiB)
        assert blk.write(0, before) == VIRTIO_BLK_S_OK
        reqs = [(blk.submit_write(1024 + k * 512, pattern(300 + k, 256 * KiB), indirect=True),
                 1024 + k * 512, pattern(300 + k, 256 * KiB)) for k in range(120)]
        blk.publish_and_kick()
        time.sleep(0.005)
        assert daemon.terminate() == 0
        blk.collect()
        done = [(s, data) for r, s, data in reqs if r.done]
        for r, _s, _d in reqs:
            assert not r.done or (r.completion is not None and r.completion.ok)
    assert not daemon.socket_path.exists()
    assert disk_read(daemon, 0, len(before)) == before
    for s, data in done:
        assert disk_read(daemon, s * SECTOR, len(data)) == data
    for r, s, data in reqs:
        if not r.done:
            assert disk_read(daemon, s * SECTOR, len(data)) in (data, bytes(len(data)))


def test_flush_before_exit_for_requests_in_queue(daemon: Daemon) -> None:
    """A clean stop after GET_VRING_BASE: everything before it is on disk."""
    with connect_guest(daemon) as g:
        for k in range(20):
            assert g.blk.write(k * 8, pattern(400 + k, 4 * KiB)) == VIRTIO_BLK_S_OK
        assert g.fe.stop_queue(0) == 20
    assert daemon.terminate() == 0
    for k in range(20):
        assert disk_read(daemon, k * 8 * SECTOR, 4 * KiB) == pattern(400 + k, 4 * KiB)

