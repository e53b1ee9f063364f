"""vhost-user-blk over a real socket: the test front end (tests/frontend.py) drives the
real daemon, and every test checks a real effect -- bytes in the image file read from the
host side, blocks freed in it, statuses and used lengths in guest memory, what the daemon
logged, and the daemon's fds, mappings and threads in /proc.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.frontend import (
    ALL_FEATURES,
    BLK_HDR,
    DESC_SIZE,
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
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    AckError,
    BackEndClosed,
    BlkDriver,
    BlkRequest,
    DriverQueue,
    FrontEnd,
    GuestRam,
    KiB,
    MiB,
    parse_blk_config,
)
from tests.integration.conftest import (
    IMAGE_SIZE,
    Daemon,
    Guest,
    StartDaemon,
    connect_guest,
)
from vhost.protocol import (
    AddMemReg,
    GetFeatures,
    Request,
    SetVringBase,
    SetVringKick,
    U64Reply,
    Unknown,
)

SECTOR = 512
CAPACITY = IMAGE_SIZE // SECTOR
STATUS_UNTOUCHED = 0xFF
# GuestRam(64 MiB, 2 regions): region 0 is [0, 32 MiB), region 1 starts at 1 GiB.
REGION0_END = 32 * MiB
HOLE_GPA = 512 * MiB  # between the two regions: not guest memory


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def disk_read(d: Daemon, offset: int, n: int) -> bytes:
    with open(d.image_path, "rb") as f:
        return os.pread(f.fileno(), n, offset)


def disk_write(d: Daemon, offset: int, data: bytes) -> None:
    with open(d.image_path, "r+b") as f:
        os.pwrite(f.fileno(), data, offset)


def check_io_works(g: Guest, d: Daemon, sector: int = 777, seed: int = 4242) -> None:
    """A good write and read on queue 0 of ``g`` land on / come from the image."""
    data = pattern(seed, 4 * KiB)
    assert g.blk.write(sector, data) == VIRTIO_BLK_S_OK
    assert disk_read(d, sector * SECTOR, len(data)) == data
    assert g.blk.read(sector, len(data)) == data


def check_new_connection_works(d: Daemon, sector: int = 901, seed: int = 99) -> None:
    with connect_guest(d) as g:
        check_io_works(g, d, sector, seed)


# =========================================================================================
# Reads, writes and the other request types
# =========================================================================================


@pytest.mark.parametrize("nbytes", [512, 4 * KiB, 64 * KiB + 512, 1 * MiB])
def test_write_reaches_disk_and_reads_back(guest: Guest, daemon: Daemon, nbytes: int) -> None:
    sector = 2048 + 3  # not 4 KiB aligned on purpose
    data = pattern(nbytes, nbytes)
    assert guest.blk.write(sector, data) == VIRTIO_BLK_S_OK
    assert disk_read(daemon, sector * SECTOR, nbytes) == data
    # neighbours untouched (the image is sparse: zeros)
    assert disk_read(daemon, sector * SECTOR - SECTOR, SECTOR) == bytes(SECTOR)
    assert disk_read(daemon, sector * SECTOR + nbytes, SECTOR) == bytes(SECTOR)
    assert guest.blk.read(sector, nbytes) == data


def test_read_returns_what_the_host_wrote(guest: Guest, daemon: Daemon) -> None:
    data = pattern(1, 12 * KiB)
    disk_write(daemon, 300 * SECTOR, data)
    c = guest.blk.kick_and_wait([guest.blk.submit_read(300, len(data))])[0]
    assert c.status == VIRTIO_BLK_S_OK
    assert c.data == data
    assert c.used_len == len(data) + 1  # data plus the status byte


def test_last_sector_is_reachable(guest: Guest, daemon: Daemon) -> None:
    assert guest.capacity() == CAPACITY
    data = pattern(2, SECTOR)
    assert guest.blk.write(CAPACITY - 1, data) == VIRTIO_BLK_S_OK
    assert disk_read(daemon, IMAGE_SIZE - SECTOR, SECTOR) == data
    assert guest.blk.read(CAPACITY - 1, SECTOR) == data
    assert os.stat(daemon.image_path).st_size == IMAGE_SIZE


@pytest.mark.parametrize("segs", [2, 7, 64, (1, 511, 3584), (4095, 1, 1024, 3072)],
                         ids=["2", "7", "64", "odd-sizes", "odd-sizes-2"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_multi_segment(guest: Guest, daemon: Daemon, segs: int | tuple[int, ...],
                       indirect: bool) -> None:
    nbytes = sum(segs) if isinstance(segs, tuple) else 32 * KiB
    data = pattern(len(str(segs)), nbytes)
    st = guest.blk.write(100, data, segs=segs, indirect=indirect)
    assert st == VIRTIO_BLK_S_OK
    assert disk_read(daemon, 100 * SECTOR, nbytes) == data
    # read back with a different segmentation
    assert guest.blk.read(100, nbytes, segs=5, indirect=not indirect) == data
    assert guest.blk.read(100, nbytes, segs=segs, indirect=indirect) == data


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


def test_rings_in_second_memory_region(daemon: Daemon) -> None:
    with connect_guest(daemon, queues=0) as g:
        q = g.fe.setup_queue(0, 64, region=1)
        blk = BlkDriver(q, buf_regions=(0, 1))
        data = pattern(4, 4 * KiB)
        assert blk.write(8, data, segs=2) == VIRTIO_BLK_S_OK
        assert disk_read(daemon, 8 * SECTOR, len(data)) == data
        assert blk.read(8, len(data), segs=3) == data


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


@pytest.mark.parametrize("flags", [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP], ids=["plain", "unmap"])
def test_write_zeroes(guest: Guest, daemon: Daemon, flags: int) -> None:
    start = 4096
    data = pattern(8, 256 * KiB)
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
        check_io_works(g, d)


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


@pytest.mark.parametrize("nbytes", [1, 100, 513, 4097])
def test_unaligned_length_is_ioerr(guest: Guest, daemon: Daemon, nbytes: int) -> None:
    old = pattern(11, 8 * KiB)
    disk_write(daemon, 0, old)
    assert guest.blk.write(0, pattern(12, nbytes)) == VIRTIO_BLK_S_IOERR
    c = guest.blk.kick_and_wait([guest.blk.submit_read(0, nbytes)])[0]
    assert c.status == VIRTIO_BLK_S_IOERR
    assert disk_read(daemon, 0, len(old)) == old
    check_io_works(guest, daemon)


@pytest.mark.parametrize("rtype", [2, 3, 5, 99, 0xFFFFFFFF])
def test_unknown_type_is_unsupp(guest: Guest, daemon: Daemon, rtype: int) -> None:
    req = guest.blk.submit_raw(rtype, 0, in_len=512)
    c = guest.blk.kick_and_wait([req])[0]
    assert c.status == VIRTIO_BLK_S_UNSUPP
    check_io_works(guest, daemon)
    daemon.wait_log("unsupported request type")


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
            req, slot, data = pending.pop(head)
            assert req.completion is not None
            assert req.completion.status == VIRTIO_BLK_S_OK, req
            if data is None:
                assert req.completion.data == model[slot], f"slot {slot} read back wrong"
            else:
                model[slot] = data
            free.insert(rng.randrange(len(free) + 1), slot)
            completed += 1
        assert time.monotonic() < deadline, "random I/O took too long"
    image = disk_read(d, base_sector * SECTOR, slots * SLOT_SECTORS * SECTOR)
    assert image == b"".join(model)
    return kicks


@pytest.mark.parametrize(("depth", "queue_size", "indirect"), [
    (32, 256, False), (64, 512, False), (64, 64, True)])
def test_many_requests_in_flight(daemon: Daemon, depth: int, queue_size: int,
                                 indirect: bool) -> None:
    with connect_guest(daemon, queue_size=queue_size) as g:
        run_random_io(g.blk, daemon, total=3000, depth=depth, indirect=indirect, seed=depth)
        assert g.fe.stop_queue(0) == 3000


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_ring_index_wraps_at_16_bits(daemon: Daemon, event_idx: bool) -> None:
    features = ALL_FEATURES if event_idx else ALL_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX)
    start = 65536 - 37
    with connect_guest(daemon, features=features, queue_size=128, start_idx=start) as g:
        assert g.queue.event_idx is event_idx
        run_random_io(g.blk, daemon, total=300, depth=16, slots=64, seed=start)
        assert g.queue.used_idx() == (start + 300) & 0xFFFF
        assert g.fe.stop_queue(0) == (start + 300) & 0xFFFF


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


def _wait_used(q: DriverQueue, idx: int, timeout: float = 5.0) -> None:
    """Poll (without asking for a call) until used->idx reaches ``idx``."""
    deadline = time.monotonic() + timeout
    while q.used_idx() != idx & 0xFFFF:
        assert time.monotonic() < deadline, f"used idx {q.used_idx()}, waiting for {idx}"
        time.sleep(0.002)


def test_no_interrupt_flag_honoured_without_event_idx(daemon: Daemon) -> None:
    features = ALL_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX)
    with connect_guest(daemon, features=features) as g:
        blk, q = g.blk, g.queue
        check_io_works(g, daemon)
        q.drain_call()
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


def test_used_event_suppresses_calls_with_event_idx(daemon: Daemon) -> None:
    with connect_guest(daemon) as g:
        blk, q = g.blk, g.queue
        assert q.event_idx
        check_io_works(g, daemon)
        q.drain_call()
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


def test_add_mem_reg_instead_of_set_mem_table(daemon: Daemon) -> None:
    with connect_guest(daemon, add_mem_reg=True, buf_regions=(0, 1)) as g:
        assert g.fe.get_max_mem_slots() >= 32
        data = pattern(17, 16 * KiB)
        assert g.blk.write(200, data, segs=4) == VIRTIO_BLK_S_OK
        assert disk_read(daemon, 200 * SECTOR, len(data)) == data
        assert g.blk.read(200, len(data), segs=3) == data
        assert g.blk.read(200, len(data), segs=3, indirect=True) == data


def test_get_max_mem_slots(guest: Guest) -> None:
    assert guest.fe.get_max_mem_slots() >= 32


def test_rem_mem_reg(daemon: Daemon) -> None:
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
    assert daemon.memfd_maps() == 0


def _add_region(ram: GuestRam, index: int) -> AddMemReg:
    return AddMemReg(ram.regions()[index], ram.fd)


# =========================================================================================
# GET_VRING_BASE, stop and restart
# =========================================================================================


def test_get_vring_base_and_restart(daemon: Daemon) -> None:
    with connect_guest(daemon, queue_size=64) as g:
        blk, q = g.blk, g.queue
        n = 0
        for k in range(45):
            assert blk.write(k * 8, pattern(k, 4 * KiB)) == VIRTIO_BLK_S_OK
            n += 1
        assert g.fe.stop_queue(0) == n
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
    "loop": (bad_loop, "descriptor loop"),
    "self-loop": (bad_self_loop_writable, "descriptor loop"),
    "indirect-longer-than-queue": (bad_indirect_longer_than_queue,
                                   "chain longer than the queue size"),
    "nested-indirect": (bad_nested_indirect, "nested indirect descriptor"),
    "indirect-outside-memory": (bad_indirect_outside_memory,
                                "indirect table outside guest memory"),
    "indirect-with-next": (bad_indirect_with_next, "indirect descriptor with NEXT set"),
    "indirect-length": (bad_indirect_length, "indirect table length not a positive multiple"),
    "indirect-next-out-of-table": (bad_indirect_next_out_of_table,
                                   "next index outside its descriptor table"),
    "status-readable": (bad_status_readable, "no device-writable status byte"),
    "readable-after-writable": (bad_readable_after_writable,
                                "device-readable descriptor after a device-writable one"),
    "next-out-of-range": (bad_next_out_of_range, "next index outside its descriptor table"),
    "head-out-of-range": (bad_head_out_of_range, "head index outside the descriptor table"),
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
        check_io_works(g, daemon, sector=60, seed=1)
        # a few more bad ones in one batch with good ones around them
        good = g.blk.submit_write(70, pattern(20, 1024))
        g.blk.publish_and_kick()
        assert g.blk.wait([good])[0].ok
    assert disk_read(daemon, 5 * SECTOR, SECTOR) == data0  # status-readable write not done
    check_new_connection_works(daemon)
    log = daemon.log_text()
    assert "Traceback" not in log


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


def test_indirect_without_feature_is_rejected(daemon: Daemon) -> None:
    features = ALL_FEATURES & ~(1 << VIRTIO_RING_F_INDIRECT_DESC)
    with connect_guest(daemon, features=features) as g:
        assert not g.fe.features & (1 << VIRTIO_RING_F_INDIRECT_DESC)
        req = g.blk.submit_write(3, pattern(21, 512), indirect=True)
        c = g.blk.kick_and_wait([req])[0]
        assert (c.status, c.used_len) == (None, 0)
        assert disk_read(daemon, 3 * SECTOR, 512) == bytes(512)
        daemon.wait_log("INDIRECT_DESC not negotiated")
        check_io_works(g, daemon)


def _break_queue0(d: Daemon, g: Guest) -> None:
    """Make queue 0 claim more available buffers than it holds; wait for the daemon to
    give up on it."""
    q0 = g.drivers[0].queue
    q0.set_avail_idx(q0.avail_idx + q0.num + 1)
    q0.kick()
    d.wait_log("avail index moved further than the queue size")
    d.wait_log("ring broken")


def test_avail_idx_jump_breaks_only_that_queue(start_daemon: StartDaemon) -> None:
    d = start_daemon("--num-queues", "2")
    data = pattern(23, 8 * KiB)
    with connect_guest(d, queues=2) as g:
        q0, b0, b1 = g.drivers[0].queue, g.drivers[0], g.drivers[1]
        check_io_works(g, d)
        _break_queue0(d, g)
        # queue 0 is stopped: a sane index and a good request get no answer
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


@pytest.mark.xfail(strict=True, reason=(
    "daemon bug: SET_VRING_BASE on a queue whose worker has not been joined (here: it "
    "exited on a broken ring) is overwritten by Virtqueue.stop() (vhost/virtqueue.py:184, "
    "self.base = self._vq.last_avail_idx) when SET_VRING_KICK restarts the queue, so the "
    "new ring starts at the old index and breaks again"))
def test_broken_queue_restarts_when_set_up_again(start_daemon: StartDaemon) -> None:
    """The log promises 'queue stopped until the front end sets it up again': a plain
    set-up (NUM, BASE 0, ADDR, KICK, CALL, ENABLE) with no GET_VRING_BASE must revive it."""
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


@pytest.mark.parametrize("case", list(JUNK))
@pytest.mark.parametrize("after_setup", [False, True], ids=["fresh", "running"])
def test_malformed_message_closes_connection(start_daemon: StartDaemon, case: str,
                                             after_setup: bool) -> None:
    data, nfds, logged = JUNK[case]
    d = start_daemon()
    idle = d.resources()
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        if after_setup:  # junk on a connection with mapped memory and a running queue
            g = connect_guest(d)
            fe = g.fe
            check_io_works(g, d)
        else:
            fe = _raw_frontend(d)
        try:
            fe.raw_send(data, fds)
        except BackEndClosed:
            pass
        assert fe.is_closed_by_peer(3.0)
        (g.close() if after_setup else _close_raw(fe))
    finally:
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


@pytest.mark.parametrize("code", [99, int(Request.SET_LOG_BASE), int(Request.GET_INFLIGHT_FD)])
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

