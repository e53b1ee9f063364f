"""The test front end on its own: guest RAM, the driver side of split virtqueues, the
virtio-blk request builder (against an in-process fake device) and FrontEnd (against a
fake back end thread on a socketpair)."""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.blk import (
    BLK_CONFIG_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkDriver,
    BlkError,
    parse_blk_config,
)
from tests.support.frontend import (
    F_PROTOCOL_FEATURES,
    FRONTEND_PROTOCOL_FEATURES,
    PF_MQ,
    PF_REPLY_ACK,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    AckError,
    BackEndClosed,
    DriverQueue,
    FrontEnd,
    FrontEndError,
    GiB,
    GuestRam,
    MiB,
    QueueFull,
)
from vhost.protocol import (
    AddMemReg,
    ConfigReply,
    GetConfig,
    GetFeatures,
    GetMaxMemSlots,
    GetProtocolFeatures,
    GetQueueNum,
    GetVringBase,
    MessageReader,
    ProtocolError,
    Request,
    SetFeatures,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringKick,
    SetVringNum,
    U64Reply,
    Unknown,
    VringStateReply,
    encode_reply,
)

PAGE = mmap.PAGESIZE


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    with GuestRam(8 * MiB) as r:
        yield r


@pytest.fixture
def ram2() -> Iterator[GuestRam]:
    with GuestRam(8 * MiB, regions=2) as r:
        yield r


# =========================================================================================
# GuestRam
# =========================================================================================


def test_single_region_layout_and_access(ram: GuestRam) -> None:
    (r,) = ram.regions()
    assert (r.guest_phys_addr, r.memory_size, r.mmap_offset) == (0, 8 * MiB, 0)
    assert ram.uva_of(0x1234) == r.userspace_addr + 0x1234
    ram.write(0x1000, b"hello")
    assert ram.read(0x1000, 5) == b"hello"
    assert os.pread(ram.fd, 5, 0x1000) == b"hello"  # the memfd is the backing store
    ram.write_u64(0x2000, 0x1122334455667788)
    assert ram.read(0x2000, 8) == bytes.fromhex("8877665544332211")  # little endian
    with pytest.raises(ValueError):
        ram.read(8 * MiB - 4, 8)
    with pytest.raises(ValueError):
        ram.write(8 * MiB, b"x")


def test_alloc_alignment_and_exhaustion(ram: GuestRam) -> None:
    a = ram.alloc(3)
    b = ram.alloc(10, align=4096)
    assert a % 16 == 0 and b % 4096 == 0 and b >= a + 3
    with pytest.raises(ValueError):
        ram.alloc(8, align=3)
    with pytest.raises(MemoryError):
        ram.alloc(8 * MiB)
    assert ram.alloc(ram.free_bytes() // 2) > b  # a failed alloc consumed nothing


def test_two_regions_have_a_gap_and_share_the_memfd(ram2: GuestRam) -> None:
    r0, r1 = ram2.regions()
    assert (r0.guest_phys_addr, r0.memory_size, r0.mmap_offset) == (0, 4 * MiB, 0)
    assert r1.guest_phys_addr == 1 * GiB  # not contiguous with region 0
    assert (r1.memory_size, r1.mmap_offset) == (4 * MiB, 4 * MiB)
    assert r1.userspace_addr == r0.userspace_addr + 4 * MiB
    assert ram2.uva_of(1 * GiB + 5) == r1.userspace_addr + 5
    assert ram2.gpa_to_offset(1 * GiB + 5) == 4 * MiB + 5
    with pytest.raises(ValueError):
        ram2.gpa_to_offset(4 * MiB)  # in the hole
    with pytest.raises(ValueError):
        ram2.uva_of(1 * GiB - 1)


def test_two_regions_access_at_edges(ram2: GuestRam) -> None:
    end0 = 4 * MiB
    ram2.write(end0 - 8, b"ABCDEFGH")  # last 8 bytes of region 0
    ram2.write(1 * GiB, b"abcdefgh")  # first 8 bytes of region 1
    ram2.write(1 * GiB + 4 * MiB - 1, b"Z")  # last byte of region 1
    assert ram2.read(end0 - 8, 8) == b"ABCDEFGH"
    assert ram2.read(1 * GiB, 8) == b"abcdefgh"
    # region 1 is file offset 4 MiB onwards: both edges are adjacent in the file
    assert os.pread(ram2.fd, 16, end0 - 8) == b"ABCDEFGHabcdefgh"
    assert os.pread(ram2.fd, 1, 8 * MiB - 1) == b"Z"
    for gpa, n in ((end0 - 4, 8), (1 * GiB - 4, 8), (1 * GiB + 4 * MiB - 1, 2)):
        with pytest.raises(ValueError):
            ram2.read(gpa, n)
        with pytest.raises(ValueError):
            ram2.write(gpa, bytes(n))
    a = ram2.alloc(64, region=1)
    assert 1 * GiB <= a < 1 * GiB + 4 * MiB
    assert ram2.alloc(64) < 4 * MiB


def test_region_count_and_size_validation() -> None:
    with pytest.raises(ValueError):
        GuestRam(PAGE * 3, regions=2)
    with pytest.raises(ValueError):
        GuestRam(PAGE, regions=0)
    with GuestRam(4 * PAGE, regions=4) as r:
        gpas = [x.guest_phys_addr for x in r.regions()]
        assert gpas == [0, GiB, 2 * GiB, 3 * GiB]


# =========================================================================================
# DriverQueue
# =========================================================================================


def test_ring_geometry(ram2: GuestRam) -> None:
    q = DriverQueue(ram2, 256, region=1)
    try:
        assert q.desc_gpa % 16 == 0 and q.avail_gpa % 2 == 0 and q.used_gpa % 4 == 0
        assert q.avail_gpa >= q.desc_gpa + 16 * 256
        assert q.used_gpa >= q.avail_gpa + 6 + 2 * 256
        for gpa in (q.desc_gpa, q.avail_gpa, q.used_gpa):
            assert ram2.region_of(gpa).gpa == 1 * GiB
        assert q.num_free == 256 and q.used_idx() == 0 and q.published_avail_idx() == 0
    finally:
        q.close()
    for bad in (0, 3, 100, 2048):
        with pytest.raises(ValueError):
            DriverQueue(ram2, bad)


def test_chain_layout(ram: GuestRam) -> None:
    q = DriverQueue(ram, 16)
    bufs = [(0x10000, 16, False), (0x20000, 512, False), (0x30000, 100, True), (0x40000, 1, True)]
    head = q.add_chain(bufs)
    chain = q.chain_of(head)
    assert len(chain) == 4 and chain[0] == head and len(set(chain)) == 4
    i = head
    for k, (addr, length, writable) in enumerate(bufs):
        d_addr, d_len, d_flags, d_next = q.read_desc(i)
        assert (d_addr, d_len) == (addr, length)
        assert bool(d_flags & VRING_DESC_F_WRITE) == writable
        assert not d_flags & VRING_DESC_F_INDIRECT
        if k < 3:
            assert d_flags & VRING_DESC_F_NEXT and d_next == chain[k + 1]
            i = d_next
        else:
            assert not d_flags & VRING_DESC_F_NEXT
    # the head is in the ring but not published until publish()
    assert ram.read_u16(q.avail_gpa + 4) == head
    assert q.published_avail_idx() == 0 and q.avail_idx == 1
    h2 = q.add_chain([(0x50000, 8, False)])
    assert ram.read_u16(q.avail_gpa + 6) == h2
    q.publish()
    assert q.published_avail_idx() == 2
    assert q.num_free == 16 - 5 and q.in_flight == 2
    q.close()


def test_indirect_chain(ram: GuestRam) -> None:
    q = DriverQueue(ram, 8)
    bufs = [(0x10000 + k * 0x1000, 100 + k, k >= 3) for k in range(6)]
    head = q.add_chain(bufs, indirect=True)
    assert q.num_free == 7  # one descriptor for the whole chain
    addr, length, flags, _next = q.read_desc(head)
    assert flags == VRING_DESC_F_INDIRECT and length == 16 * 6
    table = DriverQueue.read_table(ram, addr, 6)
    for k, (t_addr, t_len, t_flags, t_next) in enumerate(table):
        assert (t_addr, t_len) == bufs[k][:2]
        assert bool(t_flags & VRING_DESC_F_WRITE) == bufs[k][2]
        assert not t_flags & VRING_DESC_F_INDIRECT
        if k < 5:
            assert t_flags & VRING_DESC_F_NEXT and t_next == k + 1
        else:
            assert not t_flags & VRING_DESC_F_NEXT
    q.close()


def _device_use(ram: GuestRam, q: DriverQueue, entries: list[tuple[int, int]]) -> None:
    """Act as a device: append used elements and bump used->idx."""
    idx = q.used_idx()
    for uid, ulen in entries:
        ram.pack("<II", q.used_gpa + 4 + 8 * (idx % q.num), uid, ulen)
        idx = (idx + 1) & 0xFFFF
    ram.write_u16(q.used_gpa + 2, idx)


def test_free_list_exhaustion_and_reuse(ram: GuestRam) -> None:
    q = DriverQueue(ram, 8)
    h1 = q.add_chain([(0x10000, 1, False)] * 3)
    h2 = q.add_chain([(0x10000, 1, False)] * 5)
    assert q.num_free == 0
    with pytest.raises(QueueFull):
        q.add_chain([(0x10000, 1, False)])
    used_by_h1 = set(q.chain_of(h1))
    _device_use(ram, q, [(h1, 7)])
    assert q.get_used() == [(h1, 7)]
    assert q.num_free == 3 and q.in_flight == 1
    with pytest.raises(QueueFull):
        q.add_chain([(0x10000, 1, False)] * 4)
    h3 = q.add_chain([(0x10000, 1, False)] * 3)
    assert set(q.chain_of(h3)) == used_by_h1  # freed descriptors were reused
    _device_use(ram, q, [(h2, 0), (h3, 0)])
    assert q.get_used() == [(h2, 0), (h3, 0)]
    assert q.num_free == 8 and q.in_flight == 0
    assert q.get_used() == []
    q.close()


def test_unknown_used_ids_are_returned_without_freeing(ram: GuestRam) -> None:
    q = DriverQueue(ram, 8)
    q.add_chain([(0x10000, 1, False)])
    _device_use(ram, q, [(5, 1), (99, 2)])
    assert q.get_used() == [(5, 1), (99, 2)]
    assert q.num_free == 7 and q.in_flight == 1
    q.close()


def test_used_ring_16bit_wrap(ram: GuestRam) -> None:
    q = DriverQueue(ram, 4, start_idx=65533)
    assert q.used_idx() == 65533 and q.published_avail_idx() == 65533
    assert q.avail_idx == q.last_used_idx == 65533
    seen: list[tuple[int, int]] = []
    for rnd in range(6):  # crosses 65535 -> 0 several slots in
        heads = [q.add_chain([(0x10000, 8, True)]) for _ in range(2)]
        q.publish()
        _device_use(ram, q, [(h, rnd * 10 + k) for k, h in enumerate(heads)])
        got = q.get_used()
        assert got == [(h, rnd * 10 + k) for k, h in enumerate(heads)]
        seen += got
    assert q.last_used_idx == (65533 + 12) & 0xFFFF == 9
    assert q.published_avail_idx() == 9 and q.num_free == 4
    # avail ring slots are indexed modulo the queue size across the wrap
    assert ram.read_u16(q.avail_gpa + 4 + 2 * (8 % 4)) in {h for h, _ in seen}
    q.close()


def test_used_ring_overrun_is_detected(ram: GuestRam) -> None:
    q = DriverQueue(ram, 4, start_idx=65535)
    ram.write_u16(q.used_gpa + 2, (65535 + 5) & 0xFFFF)  # 5 entries on a 4-entry ring
    with pytest.raises(RuntimeError, match="overrun"):
        q.get_used()
    q.close()


def test_raw_avail_access(ram: GuestRam) -> None:
    q = DriverQueue(ram, 8)
    q.write_desc(3, 0xDEAD0000, 77, VRING_DESC_F_NEXT, 9)
    assert q.read_desc(3) == (0xDEAD0000, 77, VRING_DESC_F_NEXT, 9)
    q.put_avail(3)
    assert q.published_avail_idx() == 1 and ram.read_u16(q.avail_gpa + 4) == 3
    q.set_avail_idx(500)
    assert q.published_avail_idx() == 500 and q.avail_idx == 500
    with pytest.raises(IndexError):
        q.write_desc(8, 0, 0, 0, 0)
    q.close()


def test_event_idx_fields(ram: GuestRam) -> None:
    q = DriverQueue(ram, 16, event_idx=True)
    q.set_used_event(0xBEEF)
    assert ram.read_u16(q.avail_gpa + 4 + 2 * 16) == 0xBEEF == q.used_event()
    ram.write_u16(q.used_gpa + 4 + 8 * 16, 0x1234)
    assert q.avail_event() == 0x1234
    q.set_no_interrupt(True)
    assert ram.read_u16(q.avail_gpa) == VRING_AVAIL_F_NO_INTERRUPT
    q.set_no_interrupt(False)
    assert ram.read_u16(q.avail_gpa) == 0
    # vring_need_event: notify iff event lies in [old, new)
    assert DriverQueue.need_event(5, 6, 5)
    assert not DriverQueue.need_event(6, 6, 5)
    assert DriverQueue.need_event(65535, 1, 65534)  # across the wrap
    assert not DriverQueue.need_event(2, 1, 65534)
    _device_use(ram, q, [])
    q.add_chain([(0x10000, 1, False)])
    q.publish()
    ram.write_u16(q.used_gpa + 4 + 8 * 16, 0)  # device wants a kick once entry 0 is there
    assert q.need_kick(0)
    ram.write_u16(q.used_gpa + 4 + 8 * 16, 1)
    assert not q.need_kick(0)
    q.enable_cb()
    assert q.used_event() == q.last_used_idx
    q.close()


def test_kick_and_call_eventfds(ram: GuestRam) -> None:
    q = DriverQueue(ram, 8)
    assert not select.select([q.kick_fd], [], [], 0)[0]
    q.kick()
    q.kick()
    assert os.eventfd_read(q.kick_fd) == 2
    t0 = time.monotonic()
    assert not q.wait_call(0.05)
    assert time.monotonic() - t0 >= 0.04
    os.eventfd_write(q.call_fd, 1)
    assert q.wait_call(1.0)
    assert not q.wait_call(0)  # drained
    threading.Timer(0.05, os.eventfd_write, (q.call_fd, 1)).start()
    assert q.wait_call(2.0)
    q.close()
    assert q.kick_fd == -1 and q.call_fd == -1
    q.close()  # idempotent


# =========================================================================================
# BlkDriver against an in-process fake device
# =========================================================================================


class FakeBlkDevice(threading.Thread):
    """A minimal virtio-blk device model working directly on the driver's rings."""

    UNTOUCHED_TYPE = 99  # complete without writing the status byte

    def __init__(self, q: DriverQueue, sectors: int = 8192, serial: bytes = b"fake-serial"):
        super().__init__(daemon=True)
        self.q = q
        self.ram = q.ram
        self.disk = bytearray(512 * sectors)
        self.serial = serial
        self.last_avail = q.published_avail_idx()
        self.used = q.used_idx()
        self.stopping = threading.Event()
        self.calls = 0
        self.suppressed = 0
        self.max_chain = 0

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)

    def run(self) -> None:
        p = select.poll()
        p.register(self.q.kick_fd, select.POLLIN)
        while not self.stopping.is_set():
            if p.poll(20):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.q.kick_fd)
                self.process()

    def walk(self, head: int) -> list[tuple[int, int, bool]]:
        addr, length, flags, nxt = self.q.read_desc(head)
        if flags & VRING_DESC_F_INDIRECT:
            table = DriverQueue.read_table(self.ram, addr, length // 16)
            descs, i = [], 0
            while True:
                descs.append(table[i])
                if not table[i][2] & VRING_DESC_F_NEXT:
                    break
                i = table[i][3]
        else:
            descs = [(addr, length, flags, nxt)]
            while descs[-1][2] & VRING_DESC_F_NEXT:
                descs.append(self.q.read_desc(descs[-1][3]))
        return [(a, n, bool(f & VRING_DESC_F_WRITE)) for a, n, f, _ in descs]

    def handle(self, bufs: list[tuple[int, int, bool]]) -> int:
        self.max_chain = max(self.max_chain, len(bufs))
        out = b"".join(self.ram.read(a, n) for a, n, w in bufs if not w)
        writable = [(a, n) for a, n, w in bufs if w]
        room = sum(n for _, n in writable)
        rtype, _ioprio, sector = struct.unpack_from("<IIQ", out)
        payload = out[16:]
        data = b""
        status = VIRTIO_BLK_S_OK
        off = sector * 512
        if rtype == VIRTIO_BLK_T_IN:
            n = room - 1
            if off + n > len(self.disk):
                status = VIRTIO_BLK_S_IOERR
            else:
                data = bytes(self.disk[off : off + n])
        elif rtype == VIRTIO_BLK_T_OUT:
            if off + len(payload) > len(self.disk):
                status = VIRTIO_BLK_S_IOERR
            else:
                self.disk[off : off + len(payload)] = payload
        elif rtype == VIRTIO_BLK_T_FLUSH:
            pass
        elif rtype == VIRTIO_BLK_T_GET_ID:
            data = self.serial.ljust(room - 1, b"\0")
        elif rtype == VIRTIO_BLK_T_WRITE_ZEROES:
            for k in range(0, len(payload), 16):
                s, ns, _fl = struct.unpack_from("<QII", payload, k)
                self.disk[s * 512 : (s + ns) * 512] = bytes(ns * 512)
        elif rtype == self.UNTOUCHED_TYPE:
            return 0
        else:
            status = VIRTIO_BLK_S_UNSUPP
        # data from the start of the writable space, status in its very last byte
        pos = 0
        for a, n in writable:
            chunk = data[pos : pos + n]
            if not chunk:
                break
            self.ram.write(a, chunk)
            pos += len(chunk)
        last_a, last_n = writable[-1]
        self.ram.write(last_a + last_n - 1, bytes([status]))
        return len(data) + 1

    def process(self) -> None:
        q, ram = self.q, self.ram
        old_used = self.used
        while self.last_avail != q.published_avail_idx():
            head = ram.read_u16(q.avail_gpa + 4 + 2 * (self.last_avail % q.num))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            written = self.handle(self.walk(head))
            ram.pack("<II", q.used_gpa + 4 + 8 * (self.used % q.num), head, written)
            self.used = (self.used + 1) & 0xFFFF
            ram.write_u16(q.used_gpa + 2, self.used)
        if q.event_idx:
            ram.write_u16(q.used_gpa + 4 + 8 * q.num, self.last_avail)
        if self.used == old_used:
            return
        if q.event_idx:
            signal = DriverQueue.need_event(q.used_event(), self.used, old_used)
        else:
            signal = not ram.read_u16(q.avail_gpa) & VRING_AVAIL_F_NO_INTERRUPT
        if signal:
            self.calls += 1
            os.eventfd_write(q.call_fd, 1)
        else:
            self.suppressed += 1


@pytest.fixture(params=[False, True], ids=["plain", "event_idx"])
def blk(request: pytest.FixtureRequest, ram2: GuestRam) -> Iterator[tuple[BlkDriver, Any]]:
    q = DriverQueue(ram2, 64, event_idx=request.param)
    dev = FakeBlkDevice(q)
    dev.start()
    try:
        yield BlkDriver(q, buf_regions=(0, 1)), dev
    finally:
        dev.stop()
        q.close()


def test_blk_request_layout(ram: GuestRam) -> None:
    q = DriverQueue(ram, 16)
    drv = BlkDriver(q)
    req = drv.submit_write(7, b"x" * 1000, segs=3)
    chain = q.chain_of(req.head)
    descs = [q.read_desc(i) for i in chain]
    assert [d[1] for d in descs] == [16, 334, 333, 333, 1]
    assert [bool(d[2] & VRING_DESC_F_WRITE) for d in descs] == [False] * 4 + [True]
    assert ram.read(descs[0][0], 16) == struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 7)
    assert ram.read(descs[1][0], 334) == b"x" * 334
    assert ram.read(descs[4][0], 1) == b"\xff"  # pre-filled status
    rd = drv.submit_read(3, 1024, segs=[512, 512], indirect=True)
    addr, length, flags, _ = q.read_desc(rd.head)
    assert flags == VRING_DESC_F_INDIRECT and length == 16 * 4
    table = DriverQueue.read_table(ram, addr, 4)
    assert [t[1] for t in table] == [16, 512, 512, 1]
    assert [bool(t[2] & VRING_DESC_F_WRITE) for t in table] == [False, True, True, True]
    assert ram.read(table[1][0], 4) == b"\xa5" * 4  # poisoned IN buffer
    split = drv.submit_raw(VIRTIO_BLK_T_FLUSH, 0, header_split=5)
    assert [q.read_desc(i)[1] for i in q.chain_of(split.head)] == [5, 11, 1]
    with pytest.raises(ValueError):
        drv.submit_read(0, 1024, segs=[512, 100])
    q.close()


def test_blk_roundtrip(blk: tuple[BlkDriver, FakeBlkDevice]) -> None:
    drv, dev = blk
    data = os.urandom(8192)
    assert drv.write(10, data) == VIRTIO_BLK_S_OK
    assert dev.disk[10 * 512 : 10 * 512 + 8192] == data
    assert drv.read(10, 8192) == data
    assert drv.read(10, 8192, segs=5) == data
    assert drv.read(10, 8192, segs=7, indirect=True) == data
    assert drv.write(30, data[:1536], segs=3, indirect=True) == VIRTIO_BLK_S_OK
    assert drv.read(30, 1536) == data[:1536]
    assert drv.flush() == VIRTIO_BLK_S_OK
    assert drv.get_id() == b"fake-serial"
    assert drv.discard([(0, 8, 0)]) == VIRTIO_BLK_S_UNSUPP
    assert drv.write_zeroes([(10, 2, 0), (13, 1, 1)]) == VIRTIO_BLK_S_OK
    got = drv.read(10, 4 * 512)
    assert got == bytes(1024) + data[1024:1536] + bytes(512)
    assert dev.max_chain == 9  # header + 7 segments + status
    assert drv.queue.in_flight == 0 and not drv.inflight
    assert all(p.outstanding == 0 for p in drv.pools)


def test_blk_errors_and_untouched_status(blk: tuple[BlkDriver, FakeBlkDevice]) -> None:
    drv, _dev = blk
    bad = drv.submit_read(1 << 40, 512)
    untouched = drv.submit_raw(FakeBlkDevice.UNTOUCHED_TYPE, 0, in_len=16)
    unsupp = drv.submit_raw(1234, 0)
    c_bad, c_untouched, c_unsupp = drv.kick_and_wait([bad, untouched, unsupp])
    assert c_bad.status == VIRTIO_BLK_S_IOERR and not c_bad.ok
    assert c_untouched.status is None and c_untouched.used_len == 0 and c_untouched.completed
    assert c_untouched.data == b"\xa5" * 16
    assert c_unsupp.status == VIRTIO_BLK_S_UNSUPP and c_unsupp.used_len == 1
    with pytest.raises(BlkError):
        drv.read(1 << 40, 512)


def test_blk_many_requests_reuse_buffers(blk: tuple[BlkDriver, FakeBlkDevice]) -> None:
    drv, dev = blk
    # 2040 x 16 KiB = 32 MiB of I/O through 8 MiB of guest RAM
    size = 16 * 1024
    expect: dict[int, int] = {}
    for batch in range(170):
        toks = []
        for k in range(12):  # 3..5 descriptors each: fits a 64-entry ring
            slot = (batch * 12 + k) % 200
            expect[slot] = (batch + k) % 256
            toks.append(drv.submit_write(slot * 32, bytes([expect[slot]]) * size, segs=1 + k % 3))
        assert all(c.status == VIRTIO_BLK_S_OK for c in drv.kick_and_wait(toks))
    assert all(p.outstanding == 0 for p in drv.pools)
    assert drv.queue.num_free == drv.queue.num
    assert dev.calls > 0  # with event_idx most calls are (rightly) suppressed
    toks = [drv.submit_read(slot * 32, 512) for slot in range(0, 200, 10)]
    comps = drv.kick_and_wait(toks)
    assert [c.data for c in comps] == [bytes([expect[s]]) * 512 for s in range(0, 200, 10)]


def test_blk_completions_out_of_wait_order(blk: tuple[BlkDriver, FakeBlkDevice]) -> None:
    drv, _ = blk
    a = drv.submit_write(0, b"a" * 512)
    b = drv.submit_write(1, b"b" * 512)
    (cb,) = drv.kick_and_wait([b])
    assert cb.ok
    (ca,) = drv.wait([a], timeout=1)  # completed by the same kick: no new call needed
    assert ca.ok


def test_blk_queue_full_releases_buffers(ram: GuestRam) -> None:
    q = DriverQueue(ram, 4)
    drv = BlkDriver(q)
    drv.submit_read(0, 512)  # 3 descriptors
    before = drv.pools[0].outstanding
    with pytest.raises(QueueFull):
        drv.submit_read(0, 512)
    assert drv.pools[0].outstanding == before
    q.close()


def test_blk_wait_timeout(ram: GuestRam) -> None:
    q = DriverQueue(ram, 8)  # no device at all
    drv = BlkDriver(q)
    tok = drv.submit_flush()
    with pytest.raises(TimeoutError, match="not completed"):
        drv.kick_and_wait([tok], timeout=0.1)
    (c,) = drv.wait([tok], timeout=0.05, allow_timeout=True)
    assert not c.completed and c.status is None and not c.ok
    q.close()


def test_parse_blk_config() -> None:
    raw = bytearray(BLK_CONFIG_SIZE)
    struct.pack_into("<QII", raw, 0, 2048, 65536, 126)
    struct.pack_into("<HBB", raw, 16, 100, 16, 63)
    struct.pack_into("<I", raw, 20, 4096)
    struct.pack_into("<BBHI", raw, 24, 3, 1, 8, 256)
    struct.pack_into("<BxH", raw, 32, 1, 4)
    struct.pack_into("<IIIII", raw, 36, 1 << 20, 1, 8, 1 << 21, 2)
    struct.pack_into("<B", raw, 56, 1)
    cfg = parse_blk_config(bytes(raw))
    assert cfg == {
        "capacity": 2048,
        "size_max": 65536,
        "seg_max": 126,
        "cylinders": 100,
        "heads": 16,
        "sectors": 63,
        "blk_size": 4096,
        "physical_block_exp": 3,
        "alignment_offset": 1,
        "min_io_size": 8,
        "opt_io_size": 256,
        "writeback": 1,
        "num_queues": 4,
        "max_discard_sectors": 1 << 20,
        "max_discard_seg": 1,
        "discard_sector_alignment": 8,
        "max_write_zeroes_sectors": 1 << 21,
        "max_write_zeroes_seg": 2,
        "write_zeroes_may_unmap": 1,
    }
    assert parse_blk_config(bytes(raw[:24])) == {
        k: cfg[k]
        for k in ("capacity", "size_max", "seg_max", "cylinders", "heads", "sectors", "blk_size")
    }


# =========================================================================================
# FrontEnd against a fake back end
# =========================================================================================

_REQ = {
    GetFeatures: Request.GET_FEATURES,
    GetProtocolFeatures: Request.GET_PROTOCOL_FEATURES,
    GetQueueNum: Request.GET_QUEUE_NUM,
    GetMaxMemSlots: Request.GET_MAX_MEM_SLOTS,
}


class FakeBackEnd(threading.Thread):
    """Answers like a vhost-user back end; records every message; keeps received fds."""

    def __init__(
        self,
        sock: socket.socket,
        features: int,
        protocol_features: int = 0,
        *,
        queue_num: int = 1,
        nack: dict[type, int] | None = None,
        config: bytes = bytes(range(60)),
    ) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.nack = nack or {}
        self.config = config
        self.messages: list[Any] = []
        self.fds: list[int] = []
        self.error: BaseException | None = None
        self.vring_base: dict[int, int] = {}

    def reply(self, r: Any) -> None:
        self.sock.sendall(encode_reply(r))

    def answer(self, m: Any) -> None:
        if isinstance(m, GetFeatures | GetProtocolFeatures | GetQueueNum | GetMaxMemSlots):
            value = {
                GetFeatures: self.features,
                GetProtocolFeatures: self.protocol_features,
                GetQueueNum: self.queue_num,
                GetMaxMemSlots: 32,
            }[type(m)]
            self.reply(U64Reply(_REQ[type(m)], value))
        elif isinstance(m, GetVringBase):
            self.reply(VringStateReply(Request.GET_VRING_BASE, m.index, 42))
        elif isinstance(m, GetConfig):
            data = self.config[m.offset : m.offset + m.size]
            if len(data) != m.size:
                self.reply(ConfigReply(Request.GET_CONFIG, 0, 0, 0, b""))
            else:
                self.reply(ConfigReply(Request.GET_CONFIG, m.offset, m.size, m.flags, data))
        elif isinstance(m, Unknown):
            raise ProtocolError("unknown request")
        elif m.need_reply:
            code = {
                SetOwner: Request.SET_OWNER,
                SetFeatures: Request.SET_FEATURES,
                SetProtocolFeatures: Request.SET_PROTOCOL_FEATURES,
                SetMemTable: Request.SET_MEM_TABLE,
                AddMemReg: Request.ADD_MEM_REG,
                SetVringNum: Request.SET_VRING_NUM,
                SetVringBase: Request.SET_VRING_BASE,
                SetVringAddr: Request.SET_VRING_ADDR,
                SetVringKick: Request.SET_VRING_KICK,
                SetVringCall: Request.SET_VRING_CALL,
                SetVringEnable: Request.SET_VRING_ENABLE,
            }[type(m)]
            self.reply(U64Reply(code, self.nack.get(type(m), 0)))

    def _recv_exact(self, n: int) -> tuple[bytes, list[int]]:
        data = b""
        fds: list[int] = []
        while len(data) < n:
            chunk, more_fds, _flags, _addr = socket.recv_fds(self.sock, n - len(data), 16)
            if not chunk:
                return b"", fds
            data += chunk
            fds += more_fds
        return data, fds

    def run(self) -> None:
        # Header first, then exactly the payload (as libvhost-user does): one recv on a
        # stream socket may otherwise return a message together with the *next* message's
        # fds, which would then be attributed to the wrong message.
        reader = MessageReader()
        try:
            while True:
                hdr, fds = self._recv_exact(12)
                if len(hdr) < 12:
                    return
                reader.feed(hdr, fds)
                m = reader.next_message()  # checks the header before trusting its size
                if m is None:
                    payload, more = self._recv_exact(struct.unpack_from("<I", hdr, 8)[0])
                    reader.feed(payload, more)
                    m = reader.next_message()
                if m is not None:
                    self.messages.append(m)
                    for attr in ("fds", "fd"):
                        v = getattr(m, attr, None)
                        if isinstance(v, int):
                            self.fds.append(v)
                        elif isinstance(v, tuple):
                            self.fds.extend(v)
                    self.answer(m)
        except ProtocolError as e:
            self.error = e
        finally:
            reader.close()
            self.sock.close()

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


ALL_PF = (1 << 17) - 1
BLK_FEATURES = (
    (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | F_PROTOCOL_FEATURES
    | (1 << 9)
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def _front(ram: GuestRam, sock: socket.socket, timeout: float = 2.0) -> FrontEnd:
    return FrontEnd("/nonexistent", ram, timeout=timeout).attach(sock)


def test_negotiate_with_reply_ack(ram2: GuestRam, pair: Any) -> None:
    a, b = pair
    be = FakeBackEnd(b, BLK_FEATURES, ALL_PF, queue_num=4)
    be.start()
    with _front(ram2, a) as fe:
        wanted = ~(1 << VIRTIO_RING_F_EVENT_IDX) & ((1 << 64) - 1) & ~F_PROTOCOL_FEATURES
        features, pf = fe.negotiate(wanted)
        assert pf == FRONTEND_PROTOCOL_FEATURES
        assert features == BLK_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX)
        assert features & F_PROTOCOL_FEATURES  # kept even though not "wanted"
        assert fe.queue_num == 4 and fe.reply_ack
        assert fe.get_max_mem_slots() == 32
        assert fe.get_config() == bytes(range(60))
        assert fe.get_config(size=4, offset=8) == bytes(range(8, 12))
        with pytest.raises(FrontEndError, match="refused GET_CONFIG"):
            fe.get_config(size=16, offset=56)
    be.join(2)
    types = [type(m) for m in be.messages]
    assert types[:6] == [
        GetFeatures,
        GetProtocolFeatures,
        SetProtocolFeatures,
        SetOwner,
        SetFeatures,
        GetQueueNum,
    ]
    assert be.messages[2].features == FRONTEND_PROTOCOL_FEATURES
    assert not be.messages[2].need_reply  # REPLY_ACK is not in force before it is set
    assert be.messages[3].need_reply and be.messages[4].need_reply
    assert be.messages[4].features == features


def test_mem_table_and_queue_setup(ram2: GuestRam, pair: Any) -> None:
    a, b = pair
    be = FakeBackEnd(b, BLK_FEATURES, PF_REPLY_ACK | PF_MQ)
    be.start()
    marker = 1 * GiB + 0x3000
    ram2.write(marker, b"region-1 marker")
    try:
        with _front(ram2, a) as fe:
            fe.negotiate()
            fe.set_mem_table()
            (mt,) = [m for m in be.messages if isinstance(m, SetMemTable)]
            assert mt.need_reply and len(mt.fds) == 2
            assert list(mt.regions) == ram2.regions()
            # the back end can map region 1 from its own fd at mmap_offset
            r1 = mt.regions[1]
            with mmap.mmap(mt.fds[1], r1.memory_size, offset=r1.mmap_offset) as m:
                off = marker - r1.guest_phys_addr
                assert m[off : off + 15] == b"region-1 marker"
            q = fe.setup_queue(0, size=64, start_idx=65530, region=1)
            assert q.event_idx  # negotiated default
            assert q.used_idx() == q.published_avail_idx() == 65530
            setup = be.messages[-6:]
            assert [type(m) for m in setup] == [
                SetVringNum,
                SetVringBase,
                SetVringAddr,
                SetVringKick,
                SetVringCall,
                SetVringEnable,
            ]
            assert all(m.need_reply for m in setup)
            assert (setup[0].num, setup[1].num) == (64, 65530)
            addr = setup[2]
            assert addr.desc_user_addr == ram2.uva_of(q.desc_gpa)
            assert addr.avail_user_addr == ram2.uva_of(q.avail_gpa)
            assert addr.used_user_addr == ram2.uva_of(q.used_gpa)
            assert addr.desc_user_addr - r1.userspace_addr == q.desc_gpa - r1.guest_phys_addr
            assert setup[5].enable is True
            # the received fds are the queue's eventfds
            q.kick()
            assert os.eventfd_read(setup[3].fd) == 1
            os.eventfd_write(setup[4].fd, 1)
            assert q.wait_call(1)
            assert fe.stop_queue(0) == 42
            fe.add_mem_regions()
            adds = [m for m in be.messages if isinstance(m, AddMemReg)]
            assert [m.region for m in adds] == ram2.regions()
    finally:
        be.join(2)
        be.close_fds()


def test_without_reply_ack_or_protocol_features(ram: GuestRam, pair: Any) -> None:
    a, b = pair
    be = FakeBackEnd(b, (1 << VIRTIO_F_VERSION_1))
    be.start()
    with _front(ram, a) as fe:
        assert fe.negotiate() == (1 << VIRTIO_F_VERSION_1, 0)
        fe.set_mem_table()
        q = fe.setup_queue(1, size=16)
        assert not q.event_idx
        assert fe.stop_queue(1) == 42  # a reply also syncs with the back end
    be.join(2)
    be.close_fds()
    types = [type(m) for m in be.messages]
    assert GetProtocolFeatures not in types and GetQueueNum not in types
    assert SetVringEnable not in types  # rings start enabled without protocol features
    assert not any(getattr(m, "need_reply", False) for m in be.messages)


def test_nack_raises(ram: GuestRam, pair: Any) -> None:
    a, b = pair
    be = FakeBackEnd(b, BLK_FEATURES, PF_REPLY_ACK, nack={SetVringNum: 3})
    be.start()
    with _front(ram, a) as fe:
        fe.negotiate()
        with pytest.raises(AckError) as ei:
            fe.setup_queue(0, size=8)
        assert ei.value.value == 3
    be.join(2)
    be.close_fds()


def test_junk_closes_and_request_raises_on_eof(ram: GuestRam, pair: Any) -> None:
    a, b = pair
    be = FakeBackEnd(b, BLK_FEATURES)
    be.start()
    with _front(ram, a, timeout=2) as fe:
        assert fe.get_features() == BLK_FEATURES
        fe.raw_send(b"\xff" * 12)  # bad version: the fake (and the codec) reject it
        assert fe.is_closed_by_peer(2)
        with pytest.raises(BackEndClosed):
            fe.get_features()
    be.join(2)
    assert isinstance(be.error, ProtocolError)


def test_reply_timeout(ram: GuestRam, pair: Any) -> None:
    a, _b = pair  # nobody answers
    with _front(ram, a, timeout=0.1) as fe:
        with pytest.raises(TimeoutError, match="GetFeatures"):
            fe.get_features()
        assert not fe.is_closed_by_peer(0.05)


def test_connect_retries_until_socket_exists(ram: GuestRam, tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    accepted: list[socket.socket] = []

    def listen_later() -> None:
        time.sleep(0.2)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        conn, _ = srv.accept()
        accepted.append(conn)
        srv.close()

    t = threading.Thread(target=listen_later, daemon=True)
    t.start()
    with FrontEnd(path, ram).connect(timeout=3) as fe:
        assert fe.sock is not None
        t.join(2)
        assert accepted
        accepted[0].close()
        assert fe.is_closed_by_peer(1)
    with pytest.raises(TimeoutError):
        FrontEnd(str(tmp_path / "never"), ram).connect(timeout=0.1)
