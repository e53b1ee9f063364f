"""vhost-user-blk requests over a real socket: reads and writes of every shape (sizes,
segments, indirect tables, headers split across descriptors, buffers sharing one),
flush, discard, write-zeroes, GET_ID, and the statuses of requests the device must
refuse (beyond the capacity, unaligned, unknown type, wrong buffer directions, a host
I/O error). Every test checks a real effect: bytes in the image file read from the host
side, blocks freed in it, statuses and used lengths in guest memory.

The test front end is tests/support/blk.py on tests/support/frontend.py; the daemon is
the real one (tests/support/daemon.py), shared by the tests marked ``shared``.
"""

from __future__ import annotations

import os
import resource
import time

import pytest

from tests.support.blk import (
    BLK_HDR,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    Guest,
    check_io_works,
    connect_guest,
    disk_read,
    disk_write,
    pattern,
)
from tests.support.daemon import IMAGE_SIZE, Daemon, StartDaemon
from tests.support.frontend import (
    KiB,
    MiB,
)

SECTOR = SECTOR_SIZE
shared = pytest.mark.shared_daemon  # see conftest: the module's daemon, not a fresh one
CAPACITY = IMAGE_SIZE // SECTOR


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
@pytest.mark.parametrize(
    "segs",
    [2, 7, 64, (1, 511, 3584), (4095, 1, 1024, 3072)],
    ids=["2", "7", "64", "odd-sizes", "odd-sizes-2"],
)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_multi_segment(
    guest: Guest, daemon: Daemon, segs: int | tuple[int, ...], indirect: bool
) -> None:
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
        if time.monotonic() > deadline:
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
    assert disk_read(daemon, (start + 2560) * SECTOR, 768 * KiB) == data[-768 * KiB :]


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
        expect[off : off + n * SECTOR] = bytes(n * SECTOR)
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


@pytest.mark.parametrize(
    ("serial", "expect"),
    [
        ("", b""),
        ("short-id", b"short-id"),
        ("ABCDEFGHIJKLMNOPQRST", b"ABCDEFGHIJKLMNOPQRST"),
    ],
    ids=["none", "short", "20-bytes"],
)
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


# =========================================================================================
# Requests the device refuses
# =========================================================================================


@shared
@pytest.mark.parametrize(
    ("sector", "nbytes"),
    [
        (CAPACITY, SECTOR),  # starts at the end
        (CAPACITY - 1, 2 * SECTOR),  # straddles the end
        (CAPACITY + 1000, 4 * KiB),
        (2**63, SECTOR),  # sector * 512 overflows 64 bits
        (2**64 - 1, SECTOR),
    ],
    ids=["at-end", "straddles", "far", "overflow", "max"],
)
def test_beyond_capacity_is_ioerr(guest: Guest, daemon: Daemon, sector: int, nbytes: int) -> None:
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
        blk.submit_raw(VIRTIO_BLK_T_IN, 0, out_data=bytes(512), in_len=512),  # data to read out
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
