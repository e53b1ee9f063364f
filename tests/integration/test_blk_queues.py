"""vhost-user-blk virtqueues over a real socket: many requests in flight, the 16-bit
index wrap, event-idx and NO_INTERRUPT notification suppression, queue set-up (sizes,
ring addresses, enable, no call fd, no kick fd), several queues at once (one worker
thread each, control messages while another queue is busy), and GET_VRING_BASE: a
stopped ring serves nothing until it is restarted where it stopped.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_S_OK,
    BlkDriver,
    BlkRequest,
    Guest,
    check_io_works,
    connect_guest,
    disk_read,
    parse_blk_config,
    pattern,
)
from tests.support.daemon import Daemon, StartDaemon
from tests.support.frontend import (
    ALL_FEATURES,
    VIRTIO_RING_F_EVENT_IDX,
    AckError,
    DriverQueue,
    KiB,
)
from vhost.protocol import (
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringKick,
    SetVringNum,
)

SECTOR = SECTOR_SIZE
shared = pytest.mark.shared_daemon  # see conftest: the module's daemon, not a fresh one


# =========================================================================================
# Many requests, index wrap, notifications
# =========================================================================================


SLOT_SECTORS = 8


def run_random_io(
    blk: BlkDriver,
    d: Daemon,
    *,
    total: int,
    depth: int,
    slots: int = 256,
    base_sector: int = 0,
    indirect: bool = False,
    seed: int = 0,
) -> int:
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
                    raise TimeoutError(
                        f"no completion; {len(pending)} in flight, "
                        f"used_idx={q.used_idx()} avail_idx={q.avail_idx}"
                    )
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
@pytest.mark.parametrize(
    ("depth", "queue_size", "indirect"), [(32, 256, False), (64, 512, False), (64, 64, True)]
)
def test_many_requests_in_flight(
    daemon: Daemon, depth: int, queue_size: int, indirect: bool
) -> None:
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


@shared
def test_no_interrupt_flag_honoured_without_event_idx(daemon: Daemon) -> None:
    features = ALL_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX)
    with connect_guest(daemon, features=features) as g:
        blk, q = g.blk, g.queue
        check_io_works(g, daemon)
        q.drain_stale_calls()
        q.set_no_interrupt(True)
        data = pattern(14, 4 * KiB)
        reqs = [blk.submit_write(32 + 8 * k, data) for k in range(3)]
        blk.publish_and_kick()
        q.wait_used_idx(q.avail_idx)
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
        q.drain_stale_calls()
        q.set_used_event((q.used_idx() + 100) & 0xFFFF)  # far ahead: no call wanted
        r = blk.submit_write(64, pattern(15, 512))
        blk.publish_and_kick()
        q.wait_used_idx(q.avail_idx)
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
# Queue set-up
# =========================================================================================


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
def test_disabled_ring_is_not_served(guest: Guest) -> None:
    d = guest.daemon
    check_io_works(guest, d)
    guest.fe.enable_queue(0, False)
    guest.queue.drain_stale_calls()
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
        g.queue.drain_call()  # the one signal its previous call fd got when it was set
        data = pattern(29, 8 * KiB)
        c = g.blk.kick_and_wait([g.blk.submit_write(55, data)], poll_interval=0.005)[0]
        assert c.ok
        assert disk_read(daemon, 55 * SECTOR, len(data)) == data
        c = g.blk.kick_and_wait([g.blk.submit_read(55, len(data))], poll_interval=0.005)[0]
        assert c.data == data
        assert not g.queue.drain_call()


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
        datas = {
            (qi, k): pattern(1000 * qi + k, 4 * KiB) for qi in range(nq) for k in range(per_queue)
        }

        def sector(qi: int, k: int) -> int:
            return 10_000 + (qi * per_queue + k) * 8

        tokens = [
            [
                g.drivers[qi].submit_write(sector(qi, k), datas[qi, k], segs=2)
                for k in range(per_queue)
            ]
            for qi in range(nq)
        ]
        for blk in g.drivers:
            blk.publish_and_kick()
        for blk, ts in zip(g.drivers, tokens, strict=True):
            assert all(c.ok for c in blk.wait(ts))
        for (qi, k), data in datas.items():
            assert disk_read(d, sector(qi, k) * SECTOR, len(data)) == data
        # and read each queue's data back through another queue, concurrently
        reads = [
            [g.drivers[(qi + 1) % nq].submit_read(sector(qi, k), 4 * KiB) for k in range(per_queue)]
            for qi in range(nq)
        ]
        for blk in g.drivers:
            blk.publish_and_kick()
        for qi, ts in enumerate(reads):
            cs = g.drivers[(qi + 1) % nq].wait(ts)
            assert [c.data for c in cs] == [datas[qi, k] for k in range(per_queue)]
        # every queue busy at once: random I/O on all of them from threads
        with ThreadPoolExecutor(nq) as pool:
            futures = [
                pool.submit(
                    run_random_io,
                    g.drivers[qi],
                    d,
                    total=300,
                    depth=16,
                    slots=32,
                    base_sector=100_000 + qi * 32 * SLOT_SECTORS,
                    seed=qi,
                )
                for qi in range(nq)
            ]
            for f in futures:
                f.result()


def test_control_messages_while_other_queues_are_busy(start_daemon: StartDaemon) -> None:
    """SET_MEM_TABLE (all queues stop and restart around it) and GET_VRING_BASE +
    restart of queue 0, while queue 1 runs random I/O from another thread."""
    d = start_daemon("--num-queues", "2")
    with connect_guest(d, queues=2, queue_size=256) as g:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(
                run_random_io,
                g.drivers[1],
                d,
                total=4000,
                depth=32,
                slots=64,
                base_sector=60_000,
                seed=5,
            )
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
