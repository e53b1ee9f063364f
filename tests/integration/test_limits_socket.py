"""The bounds of vhost/limits.py and of the devices' limits modules that need the real
daemon: tried at the bound (works) and one past it (refused with the documented error,
logged, the daemon goes on).

tests/unit/test_limits.py has the rest and the map from each row of the table to its
tests. Here: message size and fd count over a real socket (the server's ancillary
buffer), a ring of MAX_QUEUE_SIZE requests in flight, MAX_BLK_QUEUES queues, the largest
blk request, discard/write-zeroes segment counts and sizes, and a switch serving
MAX_ENGINE_PAIRS queue pairs.

One blk daemon serves the module: --num-queues MAX_BLK_QUEUES on a sparse image just
large enough for a segment of MAX_DISCARD_SECTORS + 1 sectors (so that one past the bound
is refused for its size, not for the capacity). Tests punch out what they wrote, so the
image stays sparse.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from devices.blk.limits import (
    MAX_BLK_QUEUES,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_REQUEST_BYTES,
    MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG,
    SEG_MAX,
    SIZE_MAX,
)
from devices.net.limits import MAX_ENGINE_PAIRS, MAX_QUEUE_PAIRS
from tests.support.blk import (
    BLK_HDR,
    STATUS_UNTOUCHED,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkDriver,
    BlkRequest,
    Completion,
    connect_guest,
    disk_read,
    parse_blk_config,
)
from tests.support.daemon import Daemon, borrowed, daemons, spawn_blk, spawn_net
from tests.support.frontend import AckError, FrontEnd, GuestRam, MiB
from tests.support.net import BROADCAST, NetPort, ports_and_queues, tagged_frame
from vhost.limits import (
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    MAX_QUEUE_SIZE,
    MEM_TABLE_MAX_REGIONS,
)
from vhost.protocol import VERSION, SetVringNum, U64Reply, Unknown, encode_message

SECTOR = 512
PAGE = 4096
POISON = 0xA5
UNKNOWN = 999  # a request code nobody implements
IMAGE_SIZE = max(MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS) * SECTOR + 2 * MiB
assert MAX_REQUEST_BYTES + 2 * MiB <= IMAGE_SIZE


# =========================================================================================
# The daemon
# =========================================================================================


@pytest.fixture(scope="module")
def limits_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemons(spawn_blk, tmp_path_factory.mktemp("limits"), "limits") as group:
        yield group.start("--num-queues", str(MAX_BLK_QUEUES), image_size=IMAGE_SIZE)


@pytest.fixture
def blk_daemon(limits_daemon: Daemon) -> Iterator[Daemon]:
    """The module's daemon, with a log starting now; it must still run afterwards."""
    with borrowed(limits_daemon) as view:
        yield view


def allocated(d: Daemon) -> int:
    return os.stat(d.image_path).st_blocks * 512


def check_io_works(d: Daemon, sector: int = 4242) -> None:
    """A new front end can write and read (the daemon went on)."""
    data = os.urandom(4096)
    with connect_guest(d) as g:
        assert g.blk.write(sector, data) == VIRTIO_BLK_S_OK
        assert g.blk.read(sector, len(data)) == data
        assert g.blk.discard([(sector, len(data) // SECTOR, 0)]) == VIRTIO_BLK_S_OK


def run_chain(
    blk: BlkDriver,
    rtype: int,
    sector: int,
    data: Sequence[tuple[int, int]],
    writable: bool,
    timeout: float = 30.0,
) -> Completion:
    """One request: a header, the given (gpa, len) data buffers (they may overlap), a
    status byte; in an indirect table so that it takes one ring slot."""
    ram = blk.ram
    hdr = ram.alloc(BLK_HDR.size)
    ram.write(hdr, BLK_HDR.pack(rtype, 0, sector))
    status = ram.alloc(1)
    ram.write(status, bytes([STATUS_UNTOUCHED]))
    bufs = [(hdr, BLK_HDR.size, False), *((g, n, writable) for g, n in data), (status, 1, True)]
    head = blk.queue.add_chain(bufs, indirect=True)
    req = BlkRequest(rtype, sector, head, status, [], [])
    blk.inflight[head] = req
    return blk.kick_and_wait([req], timeout)[0]


# =========================================================================================
# MAX_PAYLOAD_SIZE and MAX_FDS_PER_MESSAGE on the socket
# =========================================================================================


def test_payload_size_on_the_socket(blk_daemon: Daemon) -> None:
    with GuestRam(4 * MiB) as ram, FrontEnd(blk_daemon.socket_path, ram) as fe:
        fe.connect()
        fe.negotiate()
        # at the bound: framed and answered (a failure ack: nobody implements it)
        body = bytes(range(256)) * (MAX_PAYLOAD_SIZE // 256) + bytes(MAX_PAYLOAD_SIZE % 256)
        assert fe.request(Unknown(UNKNOWN, VERSION, body, (), need_reply=True)) == U64Reply(
            UNKNOWN, 1
        )
        assert fe.get_queue_num() == MAX_BLK_QUEUES  # the connection goes on
        # one past: the header alone gets the connection dropped
        fe.raw_send(struct.pack("<III", UNKNOWN, VERSION, MAX_PAYLOAD_SIZE + 1))
        assert fe.is_closed_by_peer(5.0)
    blk_daemon.wait_log(
        f"payload size {MAX_PAYLOAD_SIZE + 1} exceeds the maximum {MAX_PAYLOAD_SIZE}"
    )
    check_io_works(blk_daemon)


def steady_resources(d: Daemon, timeout: float = 2.0) -> dict[str, int]:
    """The daemon's fds, memfd mappings and threads once two looks in a row agree (a
    joined thread can linger in /proc/PID/task for a moment)."""
    deadline = time.monotonic() + timeout
    last = d.resources()
    while True:
        time.sleep(0.02)
        now = d.resources()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def test_fds_per_message_on_the_socket(blk_daemon: Daemon) -> None:
    idle = steady_resources(blk_daemon)
    regions = MEM_TABLE_MAX_REGIONS
    assert regions == MAX_FDS_PER_MESSAGE  # SET_MEM_TABLE is the message with the most
    # at the bound: a memory table of that many regions, one fd each, is mapped and used
    with connect_guest(
        blk_daemon, regions=regions, ram_size=regions * 4 * MiB, buf_regions=[regions - 1]
    ) as g:
        assert blk_daemon.memfd_maps() == idle["memfd_maps"] + regions
        data = os.urandom(8192)
        assert g.blk.write(100, data) == VIRTIO_BLK_S_OK
        assert g.blk.read(100, len(data)) == data
    blk_daemon.wait_disconnects(1)
    assert blk_daemon.settled_resources(idle) == idle
    # one past: more fds than the ancillary buffer holds; every one closed
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(MAX_FDS_PER_MESSAGE + 1)]
    try:
        with GuestRam(4 * MiB) as ram, FrontEnd(blk_daemon.socket_path, ram) as fe:
            fe.connect()
            fe.negotiate()
            data, _ = encode_message(Unknown(UNKNOWN, VERSION, b"", tuple(fds)))
            fe.raw_send(data, fds)
            assert fe.is_closed_by_peer(5.0)
    finally:
        for fd in fds:
            os.close(fd)
    blk_daemon.wait_log(f"more than {MAX_FDS_PER_MESSAGE} fds")
    blk_daemon.wait_disconnects(2)
    assert blk_daemon.settled_resources(idle) == idle
    check_io_works(blk_daemon)


# =========================================================================================
# Requests in flight: a whole ring of MAX_QUEUE_SIZE
# =========================================================================================


def test_a_full_ring_of_requests_completes(blk_daemon: Daemon) -> None:
    """MAX_QUEUE_SIZE requests made available at once (indirect: one slot each), the ring
    full: every one completes; then as many reads bring the data back."""
    base = 8192
    with connect_guest(blk_daemon, queue_size=MAX_QUEUE_SIZE) as g:
        blob = os.urandom(MAX_QUEUE_SIZE * SECTOR)
        writes = [
            g.blk.submit_write(base + k, blob[k * SECTOR : (k + 1) * SECTOR], indirect=True)
            for k in range(MAX_QUEUE_SIZE)
        ]
        assert g.queue.num_free == 0
        assert all(c.ok for c in g.blk.kick_and_wait(writes, 30.0))
        assert disk_read(blk_daemon, base * SECTOR, len(blob)) == blob
        reads = [g.blk.submit_read(base + k, SECTOR, indirect=True) for k in range(MAX_QUEUE_SIZE)]
        assert g.queue.num_free == 0
        done = g.blk.kick_and_wait(reads, 30.0)
        assert all(c.ok for c in done)
        assert b"".join(c.data for c in done) == blob
        assert g.blk.discard([(base, MAX_QUEUE_SIZE, 0)]) == VIRTIO_BLK_S_OK
        assert g.fe.stop_queue(0) == 2 * MAX_QUEUE_SIZE + 1
    check_io_works(blk_daemon)


# =========================================================================================
# MAX_BLK_QUEUES
# =========================================================================================


def test_blk_daemon_serves_max_blk_queues(blk_daemon: Daemon) -> None:
    with connect_guest(blk_daemon, queues=0) as g:
        assert g.fe.queue_num == MAX_BLK_QUEUES
        assert parse_blk_config(g.fe.get_config())["num_queues"] == MAX_BLK_QUEUES
        last = BlkDriver(g.fe.setup_queue(MAX_BLK_QUEUES - 1, 64))
        data = os.urandom(4096)
        assert last.write(300, data) == VIRTIO_BLK_S_OK
        assert last.read(300, len(data)) == data
        with pytest.raises(AckError):  # a queue index one past the last
            g.fe.request_ack(SetVringNum(MAX_BLK_QUEUES, 64))
        assert last.read(300, len(data)) == data  # the session goes on
    blk_daemon.wait_log(f"queue index {MAX_BLK_QUEUES} out of range")


# =========================================================================================
# MAX_REQUEST_BYTES
# =========================================================================================


def test_request_bytes(blk_daemon: Daemon) -> None:
    """SEG_MAX descriptors of SIZE_MAX bytes (all over the same MiB of guest memory:
    descriptors may overlap) make a request of exactly MAX_REQUEST_BYTES: a write and a
    read of it complete; with one sector more, both get IOERR and move no data."""
    assert MAX_REQUEST_BYTES == SEG_MAX * SIZE_MAX
    rng = random.Random(126)
    one, other = rng.randbytes(SIZE_MAX), rng.randbytes(SIZE_MAX)
    # a ring (and so an indirect table) that can hold header + SEG_MAX + 1 + status
    with connect_guest(blk_daemon, queue_size=1 << (SEG_MAX + 2).bit_length()) as g:
        ram, blk = g.ram, g.blk
        assert g.capacity() * SECTOR >= MAX_REQUEST_BYTES + SECTOR  # not a capacity error
        buf = ram.alloc(SIZE_MAX, PAGE)
        tail = ram.alloc(SECTOR, PAGE)
        at_bound = [(buf, SIZE_MAX)] * SEG_MAX
        past = [*at_bound, (tail, SECTOR)]

        ram.write(buf, one)
        c = run_chain(blk, VIRTIO_BLK_T_OUT, 0, at_bound, writable=False)
        assert c.status == VIRTIO_BLK_S_OK
        for k in (0, SEG_MAX // 2, SEG_MAX - 1):
            assert disk_read(blk_daemon, k * SIZE_MAX, SIZE_MAX) == one
        ram.fill(buf, SIZE_MAX, POISON)
        c = run_chain(blk, VIRTIO_BLK_T_IN, 0, at_bound, writable=True)
        assert c.status == VIRTIO_BLK_S_OK and c.used_len == MAX_REQUEST_BYTES + 1
        assert ram.read(buf, SIZE_MAX) == one  # the last MiB read, into the shared buffer

        ram.write(buf, other)
        ram.write(tail, other[:SECTOR])
        c = run_chain(blk, VIRTIO_BLK_T_OUT, 0, past, writable=False)
        assert c.status == VIRTIO_BLK_S_IOERR
        assert disk_read(blk_daemon, 0, SIZE_MAX) == one  # nothing written
        assert disk_read(blk_daemon, MAX_REQUEST_BYTES, SECTOR) == bytes(SECTOR)
        ram.fill(buf, SIZE_MAX, POISON)
        c = run_chain(blk, VIRTIO_BLK_T_IN, 0, past, writable=True)
        assert c.status == VIRTIO_BLK_S_IOERR and c.used_len == 1
        assert ram.read(buf, SIZE_MAX) == bytes([POISON]) * SIZE_MAX  # nothing read
        blk_daemon.wait_log("read/write longer than seg_max x size_max", 2)

        assert blk.discard([(0, MAX_REQUEST_BYTES // SECTOR, 0)]) == VIRTIO_BLK_S_OK
        blk.read(0, 4096)  # the queue goes on (raises unless OK)
    check_io_works(blk_daemon)


# =========================================================================================
# MAX_DISCARD_SEG / MAX_WRITE_ZEROES_SEG and MAX_DISCARD_SECTORS / MAX_WRITE_ZEROES_SECTORS
# =========================================================================================

KINDS = {
    "discard": (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS),
    "write-zeroes": (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_segments_per_request(blk_daemon: Daemon, kind: str) -> None:
    """max_seg segments (8 sectors each, 16 apart) complete; max_seg + 1 get IOERR and
    none of them is applied."""
    max_seg, _ = KINDS[kind]
    base, stride, n = 20000, 16, 8
    with connect_guest(blk_daemon) as g:
        blk = g.blk
        op = blk.discard if kind == "discard" else blk.write_zeroes
        span = (max_seg + 1) * stride * SECTOR
        data = os.urandom(span)

        def segments(count: int) -> list[tuple[int, int, int]]:
            return [(base + k * stride, n, 0) for k in range(count)]

        assert blk.write(base, data) == VIRTIO_BLK_S_OK
        assert op(segments(max_seg + 1)) == VIRTIO_BLK_S_IOERR
        assert disk_read(blk_daemon, base * SECTOR, span) == data  # not one segment applied
        blk_daemon.wait_log("bad discard/write-zeroes segments")

        assert op(segments(max_seg)) == VIRTIO_BLK_S_OK
        if kind == "write-zeroes":  # (a discard is a hint: its effect is not promised)
            expect = bytearray(data)
            for s, count, _f in segments(max_seg):
                off = (s - base) * SECTOR
                expect[off : off + count * SECTOR] = bytes(count * SECTOR)
            assert disk_read(blk_daemon, base * SECTOR, span) == bytes(expect)
        assert blk.discard([(base, span // SECTOR, 0)]) == VIRTIO_BLK_S_OK  # the queue goes on


@pytest.mark.parametrize("kind", list(KINDS))
def test_sectors_per_segment(blk_daemon: Daemon, kind: str) -> None:
    """One segment of max_sectors completes; max_sectors + 1 (inside the capacity) gets
    IOERR and changes nothing."""
    _, max_sectors = KINDS[kind]
    marker_sector = max_sectors - 8  # inside both ranges
    with connect_guest(blk_daemon) as g:
        blk = g.blk
        assert g.capacity() >= max_sectors + 1  # refused for its size, not the capacity
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if kind == "write-zeroes" else 0
        op = blk.discard if kind == "discard" else blk.write_zeroes
        marker = os.urandom(4096)
        assert blk.write(marker_sector, marker) == VIRTIO_BLK_S_OK

        assert op([(0, max_sectors + 1, flags)]) == VIRTIO_BLK_S_IOERR
        assert disk_read(blk_daemon, marker_sector * SECTOR, len(marker)) == marker
        blk_daemon.wait_log("sector range beyond capacity or not sector aligned")

        assert op([(0, max_sectors, flags)]) == VIRTIO_BLK_S_OK
        if kind == "write-zeroes":
            assert disk_read(blk_daemon, marker_sector * SECTOR, len(marker)) == bytes(4096)
        # give the blocks back (write-zeroes may have allocated the whole range)
        assert blk.discard([(0, max_sectors, 0)]) == VIRTIO_BLK_S_OK
    assert allocated(blk_daemon) < 64 * MiB


# =========================================================================================
# MAX_ENGINE_PAIRS: a switch whose ports have that many queue pairs in all
# =========================================================================================


def test_switch_serves_max_engine_pairs(tmp_path: Path) -> None:
    """ports x queue pairs == MAX_ENGINE_PAIRS is accepted (one past it: see the unit
    test of the CLI), and the last pair of the last port is served like the first."""
    nports, pairs = ports_and_queues(MAX_ENGINE_PAIRS, MAX_QUEUE_PAIRS)
    assert nports * pairs == MAX_ENGINE_PAIRS
    d = spawn_net(tmp_path, "pairs", "--switch", "sw0", "--num-queues", str(pairs), ports=nports)
    ports: list[NetPort] = []
    try:
        ports = [NetPort(s, pairs=None, queue_size=64) for s in d.sockets]
        assert all(len(p.rxq) == pairs for p in ports)
        for p in ports:
            p.post_rx(4)
        for seq, src in enumerate((ports[0], ports[-1])):
            frame = tagged_frame(BROADCAST, src.mac, seq)
            src.send(frame, pair=pairs - 1)
            for dst in ports:
                if dst is not src:
                    assert [f.frame for f in dst.receive(1)] == [frame]
    finally:
        for p in ports:
            p.close()
        d.check_clean_exit()
