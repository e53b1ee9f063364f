"""Inflight I/O tracking (vhost-user.rst, "Inflight I/O tracking", split rings) and
restarts of the daemon under a front end that keeps the guest running.

The front end here plays QEMU: it asks for the region once (GET_INFLIGHT_FD), hands it
to every daemon it connects to (SET_INFLIGHT_FD), and after a back-end crash describes
the rings again with the used index as the ring base (QEMU cannot ask a dead back end).

Two kinds of tests:

* crafted crash states: the front end writes the region and the used ring exactly as a
  back end killed between two of its stores would have left them (every gap in the
  store order of c_ext/ring.c), then connects: requests still marked must run again
  (oldest counter first, before new ones), requests whose used entry was published must
  not, and new requests continue from the right avail slot. Replays are caught on the
  disk: these requests were never really executed, so only a replay writes their bytes.
* real kills: the daemon is killed -9 at random moments while writes stream in, and
  restarted on the same socket; every request completes exactly once and the disk ends
  with the last data written to each block.
"""

from __future__ import annotations

import itertools
import mmap
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devices.blk.limits import MAX_BLK_QUEUES
from tests.support.blk import RAM_SIZE, VIRTIO_BLK_S_OK, BlkDriver, BlkRequest, disk_read
from tests.support.daemon import Daemon, spawn_blk
from tests.support.frontend import PF_INFLIGHT_SHMFD, DriverQueue, FrontEnd, GuestRam
from vhost.protocol import GetInflightFd, InflightReply, SetInflightFd

SECTOR = 512
QSIZE = 128
HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("<B5xHQ")  # inflight, padding, next, counter


def region_size(queue_size: int) -> int:
    n = HEADER.size + DESC.size * queue_size
    return (n + 63) // 64 * 64


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Region:
    """The front end's view of one queue's inflight region (a map of the memfd)."""

    def __init__(self, reply: InflightReply, queue: int = 0) -> None:
        assert reply.fd is not None
        self.reply = reply
        self.map = mmap.mmap(reply.fd, reply.mmap_size)
        self.base = queue * region_size(reply.queue_size)

    def header(self) -> tuple[int, int, int, int, int]:
        return HEADER.unpack_from(self.map, self.base)

    def set_header(self, version: int, desc_num: int, last_batch_head: int, used_idx: int) -> None:
        HEADER.pack_into(self.map, self.base, 0, version, desc_num, last_batch_head, used_idx)

    def desc(self, i: int) -> tuple[int, int, int]:
        return DESC.unpack_from(self.map, self.base + HEADER.size + DESC.size * i)

    def set_desc(self, i: int, inflight: int, next: int = 0, counter: int = 0) -> None:
        DESC.pack_into(self.map, self.base + HEADER.size + DESC.size * i, inflight, next, counter)

    def marked(self) -> list[int]:
        return [i for i in range(self.reply.queue_size) if self.desc(i)[0]]

    def close(self) -> None:
        self.map.close()
        if self.reply.fd is not None:
            os.close(self.reply.fd)


@dataclass
class Vm:
    """A 'guest' that outlives back-end connections: RAM, one ring, one driver, and the
    inflight region the front end keeps."""

    ram: GuestRam
    queue: DriverQueue
    blk: BlkDriver
    region: Region | None = None
    fe: FrontEnd | None = None

    def connect(self, d: Daemon, base: int | None = None, *, inflight: bool = True) -> None:
        """What QEMU does on (re)connect: handshake, region, memory, rings. ``base``
        defaults to the used index (QEMU's fallback after a back end died)."""
        if self.fe is not None:
            self.fe.close()
        fe = self.fe = FrontEnd(d.socket_path, self.ram)
        fe.connect()
        fe.negotiate()
        if inflight:
            assert fe.protocol_features & PF_INFLIGHT_SHMFD
            if self.region is None:
                self.region = Region(fe.get_inflight_fd(1, self.queue.num))
            fe.set_inflight_fd(self.region.reply)
        fe.set_mem_table()
        fe.announce_queue(0, self.queue, self.queue.used_idx() if base is None else base)

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
        if self.region is not None:
            self.region.close()
        self.queue.close()
        self.ram.close()


@pytest.fixture
def vm() -> Iterator[Vm]:
    ram = GuestRam(RAM_SIZE, 1)
    q = DriverQueue(ram, QSIZE, event_idx=True)
    v = Vm(ram, q, BlkDriver(q))
    yield v
    v.close()


# --- the region itself --------------------------------------------------------------------


def test_region_is_offered_set_up_and_kept_current(daemon: Daemon, vm: Vm) -> None:
    vm.connect(daemon)
    assert vm.region is not None
    r = vm.region.reply
    assert (r.mmap_size, r.mmap_offset, r.num_queues, r.queue_size) == (
        region_size(QSIZE),
        0,
        1,
        QSIZE,
    )
    assert os.fstat(r.fd).st_size == r.mmap_size  # type: ignore[arg-type]
    daemon.wait_log("inflight region of")
    data = {s: pattern(s, 4096) for s in range(0, 80, 8)}
    reqs = [vm.blk.submit_write(s, b) for s, b in data.items()]
    assert all(c.ok for c in vm.blk.kick_and_wait(reqs))
    for s, b in data.items():
        assert disk_read(daemon, s * SECTOR, len(b)) == b
    _f, version, desc_num, last_batch_head, used_idx = vm.region.header()
    assert (version, desc_num, used_idx) == (1, QSIZE, vm.queue.used_idx())
    assert last_batch_head == reqs[-1].head
    assert vm.region.marked() == []
    counters = [vm.region.desc(t.head)[2] for t in reqs]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)


def test_protocol_feature_only_for_block(tmp_path: Path) -> None:
    from devices.net import NetDevice, NetOptions, Switch
    from vhost.session import Session

    dev = NetDevice(NetOptions(mac=b"\x02\0\0\0\0\1"), switch=Switch("t"))
    s = Session(dev, "net")
    try:
        assert not s.offered_protocol_features & PF_INFLIGHT_SHMFD
    finally:
        s.close()
        dev.close()


# --- crafted crash states -----------------------------------------------------------------

A, B, C = 0, 1, 2  # three writes the crashed back end had taken, in this order
SECTORS = {A: 1000, B: 1100, C: 1200}


def _taken(vm: Vm) -> list[BlkRequest]:
    reqs = [vm.blk.submit_write(SECTORS[k], pattern(k + 50, 2048)) for k in (A, B, C)]
    vm.queue.publish()
    return reqs


def _used(vm: Vm, slot: int, head: int, length: int) -> None:
    vm.ram.pack("<II", vm.queue.used_gpa + 4 + 8 * slot, head, length)


def _used_idx(vm: Vm, idx: int) -> None:
    vm.ram.write_u16(vm.queue.used_gpa + 2, idx)


# Each: (marks as (request, inflight, counter)), used entries published, last batch
# (heads, newest first) with the region's used_idx, and which requests must run again.
CRASH_POINTS = {
    # popped C: counter stored, flag not yet -> C is read again from its avail slot
    "after-counter-before-flag": ([(A, 1, 1), (B, 1, 2), (C, 0, 3)], 0, [], {A, B, C}),
    "all-marked-none-pushed": ([(A, 1, 1), (B, 1, 2), (C, 1, 3)], 0, [], {A, B, C}),
    # A's used entry written, used->idx not yet: A runs again (idempotent write)
    "pushed-not-published": ([(A, 1, 1), (B, 1, 2)], 0, [A], {A, B, C}),
    # used->idx covers A and B, their flags still set: the last batch is cleared
    "published-flags-set": ([(A, 1, 1), (B, 1, 2)], 2, [B, A], {C}),
    "published-one-flag-cleared": ([(A, 0, 1), (B, 1, 2)], 2, [B, A], {C}),
    "published-flags-cleared": ([(A, 0, 1), (B, 0, 2)], 2, [B, A], {C}),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_restart_from_crash_point(daemon: Daemon, vm: Vm, point: str) -> None:
    marks, published, batch, expect_run = CRASH_POINTS[point]
    vm.connect(daemon)  # the region exists and was set up by a first back end ...
    assert vm.region is not None
    vm.fe.close()  # type: ignore[union-attr]
    vm.fe = None
    daemon.wait_disconnects(1)
    reqs = _taken(vm)  # ... which then took A, B, C and died at `point`
    for k, inflight, counter in marks:
        vm.region.set_desc(reqs[k].head, inflight, 0, counter)
    for slot, k in enumerate([k for k in (A, B) if k in batch]):
        _used(vm, slot, reqs[k].head, 1)
    heads = [reqs[k].head for k in batch]
    for newer, older in itertools.pairwise(heads):
        vm.region.set_desc(newer, vm.region.desc(newer)[0], older, vm.region.desc(newer)[2])
    _used_idx(vm, published)
    vm.region.set_header(1, QSIZE, heads[0] if heads else 0, 0)
    # QEMU after a crash: base = used index
    vm.connect(daemon)
    vm.queue.kick()
    pending = [reqs[k] for k in sorted(expect_run)]
    done = vm.blk.wait(pending)
    assert all(c.status == VIRTIO_BLK_S_OK for c in done)
    for k in (A, B, C):
        on_disk = disk_read(daemon, SECTORS[k] * SECTOR, 2048)
        if k in expect_run:
            assert on_disk == pattern(k + 50, 2048), f"request {k} was not run"
        else:
            assert on_disk == bytes(2048), f"request {k} was replayed after its completion"
    # completions in the used ring: the published ones, then replays by counter, then C
    order = [reqs[k].head for k in (A, B) if k in expect_run] + [reqs[C].head]
    assert vm.queue.used_idx() == published + len(order)
    got = [vm.queue.read_used_elem(published + i)[0] for i in range(len(order))]
    assert got == order
    assert not [u for u in vm.blk.unexpected_used if u[0] not in heads]
    assert vm.region.marked() == []
    assert vm.region.header()[4] == vm.queue.used_idx()
    replayed = 0 if published else sum(flag for _k, flag, _c in marks)
    if replayed:
        daemon.wait_log(f"{replayed} requests in flight before the restart run again")


def test_replay_follows_counters_not_heads(daemon: Daemon, vm: Vm) -> None:
    vm.connect(daemon)
    assert vm.region is not None
    vm.fe.close()  # type: ignore[union-attr]
    vm.fe = None
    daemon.wait_disconnects(1)  # else the first back end's worker may take them as new
    reqs = _taken(vm)
    # taken C, A, B (counters 7, 9, 8): replay order C, B, A
    for k, counter in ((C, 7), (A, 9), (B, 8)):
        vm.region.set_desc(reqs[k].head, 1, 0, counter)
    vm.connect(daemon)
    vm.queue.kick()
    vm.blk.wait(reqs)
    assert [vm.queue.read_used_elem(i)[0] for i in range(3)] == [
        reqs[C].head,
        reqs[B].head,
        reqs[A].head,
    ]
    # new requests get counters above the replayed ones
    r = vm.blk.submit_write(5, pattern(9, 512))
    assert vm.blk.kick_and_wait([r])[0].ok
    assert vm.region.desc(r.head)[2] > 9


# --- hostile regions ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["version", "desc-num", "batch-too-big", "batch-head"])
def test_unusable_region_is_logged_and_io_goes_on(daemon: Daemon, vm: Vm, damage: str) -> None:
    vm.connect(daemon)
    assert vm.region is not None
    vm.fe.close()  # type: ignore[union-attr]
    vm.fe = None
    if damage == "version":
        vm.region.set_header(7, QSIZE, 0, 0)
    elif damage == "desc-num":
        vm.region.set_header(1, QSIZE // 2, 0, 0)
    elif damage == "batch-too-big":
        _used_idx(vm, 0)
        vm.region.set_header(1, QSIZE, 0, 0xFF00)
        vm.region.set_desc(5, 1, 0, 3)  # with something in flight it cannot be a reset
    else:
        vm.region.set_header(1, QSIZE, 0xFFFF, 0xFFFF)  # used idx 0 is one ahead
    vm.connect(daemon)
    daemon.wait_log("inflight region unusable")
    r = vm.blk.submit_write(7, pattern(3, 1024))
    assert vm.blk.kick_and_wait([r])[0].ok
    assert disk_read(daemon, 7 * SECTOR, 1024) == pattern(3, 1024)


def test_rings_set_up_afresh_restart_the_record(daemon: Daemon, vm: Vm) -> None:
    """A guest driver reset re-creates the rings (used idx 0) while the region still
    holds the old used index: with nothing in flight, tracking just starts over."""
    vm.connect(daemon)
    assert vm.region is not None
    vm.fe.close()  # type: ignore[union-attr]
    vm.fe = None
    vm.region.set_header(1, QSIZE, 17, 0x8000)
    vm.connect(daemon)
    r = vm.blk.submit_write(9, pattern(8, 1024))
    assert vm.blk.kick_and_wait([r])[0].ok
    assert vm.region.header()[3:] == (r.head, vm.queue.used_idx())
    assert "inflight region unusable" not in daemon.log_text()


@pytest.mark.parametrize("nq,qs", [(0, 128), (MAX_BLK_QUEUES + 1, 128), (1, 0), (1, 96), (1, 2048)])
def test_get_inflight_fd_bad_shape_is_refused(daemon: Daemon, vm: Vm, nq: int, qs: int) -> None:
    fe = vm.fe = FrontEnd(daemon.socket_path, vm.ram).connect()
    fe.negotiate()
    r = fe.request(GetInflightFd(nq, qs))
    assert isinstance(r, InflightReply)
    assert (r.mmap_size, r.fd) == (0, None)
    daemon.wait_log("GET_INFLIGHT_FD(31) failed")
    assert fe.get_features()  # the connection goes on


@pytest.mark.parametrize("bad", ["size-short", "offset-unaligned", "file-short", "queues"])
def test_set_inflight_fd_bad_region_is_refused(daemon: Daemon, vm: Vm, bad: str) -> None:
    fe = vm.fe = FrontEnd(daemon.socket_path, vm.ram).connect()
    fe.negotiate()
    fd = os.memfd_create("fake-inflight", os.MFD_CLOEXEC)
    try:
        size = region_size(QSIZE)
        os.ftruncate(fd, size // 2 if bad == "file-short" else size + 8192)
        msg = SetInflightFd(
            size - 64 if bad == "size-short" else size,
            100 if bad == "offset-unaligned" else 0,
            3 if bad == "queues" else 1,
            QSIZE,
            fd,
            need_reply=True,
        )
        reply = fe.request(msg)
    finally:
        os.close(fd)
    assert reply is not None and reply.value != 0  # type: ignore[union-attr]
    daemon.wait_log("SET_INFLIGHT_FD(32) failed")
    fe.set_mem_table()
    fe.announce_queue(0, vm.queue, 0)
    r = vm.blk.submit_write(3, pattern(4, 512))
    assert vm.blk.kick_and_wait([r])[0].ok
    with open(f"/proc/{daemon.pid}/maps") as f:
        assert "fake-inflight" not in f.read()  # the refused region was not kept
    assert len(os.listdir(f"/proc/{daemon.pid}/fd")) == daemon_fds(daemon)


# --- real kills ---------------------------------------------------------------------------

SLOTS = 512  # 4 KiB blocks written over and over
DEPTH = 40  # x 3 descriptors each: fits the 128-entry ring
KILLS = int(os.environ.get("VHOST_INFLIGHT_KILLS", "12"))


class Writer(threading.Thread):
    """Keeps DEPTH writes in flight, never two to one block at once; remembers the last
    data submitted to each block and checks every completion."""

    def __init__(self, vm: Vm) -> None:
        super().__init__(name="writer", daemon=True)
        self.vm = vm
        self.stop = threading.Event()
        self.last: dict[int, bytes] = {}
        self.completed = 0
        self.errors: list[str] = []
        self.rng = random.Random(1234)
        self.version = 0

    def run(self) -> None:
        blk = self.vm.blk
        busy: dict[int, BlkRequest] = {}
        try:
            while not self.stop.is_set() or busy:
                while not self.stop.is_set() and len(busy) < DEPTH:
                    slot = self.rng.randrange(SLOTS)
                    if slot in busy:
                        continue
                    self.version += 1
                    data = struct.pack("<QQ", slot, self.version) * 256
                    busy[slot] = blk.submit_write(slot * 8, data)
                    self.last[slot] = data
                blk.publish_and_kick()
                blk.wait(list(busy.values()), timeout=0.05, allow_timeout=True)
                for slot, t in list(busy.items()):
                    if t.done:
                        if t.completion is None or not t.completion.ok:
                            self.errors.append(f"slot {slot}: {t.completion}")
                        del busy[slot]
                        self.completed += 1
                if blk.unexpected_used:
                    self.errors.append(f"unexpected used entries {blk.unexpected_used}")
                    return
        except Exception as e:
            self.errors.append(repr(e))


def test_kill_and_restart_loses_nothing(tmp_path: Path, vm: Vm) -> None:
    """SIGKILL the daemon at random moments under a stream of writes, restart it on the
    same socket, reconnect as QEMU does: every write completes once, the disk ends with
    the last data of every block."""
    rng = random.Random(99)
    sock, img = tmp_path / "blk.sock", tmp_path / "blk.img"
    d = spawn_blk(tmp_path, "k0", socket_path=sock, image=img)
    vm.connect(d)
    writer = Writer(vm)
    writer.start()
    daemons = [d]
    try:
        for k in range(KILLS):
            time.sleep(rng.uniform(0.05, 0.4))
            d.kill9()
            assert sock.exists()  # stale socket left behind, replaced by the next one
            d = d.respawn(tmp_path / f"k{k + 1}.log")
            daemons.append(d)
            vm.connect(d)
            assert not writer.errors, writer.errors
        time.sleep(0.2)
        writer.stop.set()
        writer.join(20)
        assert not writer.is_alive(), "writes never completed after the last restart"
        assert not writer.errors, writer.errors
        assert writer.completed > KILLS
        for slot, data in writer.last.items():
            assert disk_read(d, slot * 4096, 4096) == data, f"block {slot} lost its last write"
        assert vm.region is not None and vm.region.marked() == []
        resubmitted = sum(_resubmitted(x) for x in daemons)
        print(f"\n{KILLS} kills, {writer.completed} writes, {resubmitted} resubmitted at restarts")
    finally:
        writer.stop.set()
        if vm.fe is not None:
            vm.fe.close()
            vm.fe = None
        d.check_clean_exit()


def daemon_fds(d: Daemon) -> int:
    return d.fd_count()


def _resubmitted(d: Daemon) -> int:
    import re

    m = re.findall(r"(\d+) requests? in flight before the restart", d.log_text())
    return sum(int(x) for x in m)
