"""vhost-user-rng through the test front end over its real socket: bytes arrive in the
guest's buffers with the right used lengths, the rate limit holds, a --source file is
what the guest reads, hostile chains are refused without costing the device, and the
program follows the back-end conventions.

What is asserted is what the guest sees (used lengths, the bytes in its buffers, chains
left untouched) and what the daemon logged; never how fast it went."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from devices.rng.limits import MAX_BATCH, MAX_CHAIN_BYTES
from tests.support.daemon import Daemon, device_command
from tests.support.frontend import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    MiB,
)
from tests.support.rng import Rng, connect_rng

from .conftest import StartRng


def served_bytes(d: Daemon, connection: int = 2) -> int:
    """What the daemon logged it gave one connection (the probe was #1)."""
    line = d.wait_log(f"{d.connection(connection)}: counters since start: bytes=")[0]
    return int(line.rsplit("bytes=", 1)[1])


# --- bytes arrive -----------------------------------------------------------------------


def test_bytes_arrive_with_the_right_lengths(rng: Daemon) -> None:
    sizes = [1, 16, 64, 100, 4096, 65536]
    with connect_rng(rng) as g:
        heads = g.driver.post(sizes)
        g.driver.kick()
        done = g.driver.wait(heads)
    assert [c.used_len for c in done] == sizes
    assert [len(c.data) for c in done] == sizes
    for c in done[3:]:  # random bytes: no run of poison at the end, all values seen
        assert g.driver.poisoned_tail(c) < 4
    assert len(set(done[-1].data)) == 256
    assert len({c.data for c in done[1:]}) == len(sizes) - 1  # no two the same
    rng.wait_disconnects(1)
    assert served_bytes(rng) == sum(sizes)


def test_chains_of_many_buffers_indirect_and_across_regions(rng: Daemon) -> None:
    with connect_rng(rng, regions=2, buf_regions=(0, 1)) as g:
        heads = g.driver.post([4096, 3000, 17], segs=5, indirect=True)
        heads += g.driver.post([999], segs=3)
        g.driver.kick()
        done = g.driver.wait(heads)
    assert [c.used_len for c in done] == [4096, 3000, 17, 999]
    assert all(g.driver.poisoned_tail(c) < 4 for c in done[:2])


def test_requests_keep_coming(rng: Daemon) -> None:
    """More requests than the ring holds, over many kicks: each one answered in full."""
    with connect_rng(rng, queue_size=8) as g:
        total = 0
        for round_ in range(50):
            n = 1 + round_ * 37 % 2000
            assert len(g.driver.read(n)) == n
            total += n
    rng.wait_disconnects(1)
    assert served_bytes(rng) == total


# --- bounds (devices/rng/limits.py) ------------------------------------------------------


@pytest.mark.parametrize("extra", [0, 1, 10 * MiB], ids=["at", "past", "far past"])
def test_a_chain_gets_at_most_max_chain_bytes(rng: Daemon, extra: int) -> None:
    """A buffer of MAX_CHAIN_BYTES is filled whole; a larger one gets MAX_CHAIN_BYTES and
    the rest of it stays untouched (the used length says so)."""
    size = MAX_CHAIN_BYTES + extra
    with connect_rng(rng, ram_size=64 * MiB, regions=1) as g:
        (head,) = g.driver.post([size], segs=2)
        g.driver.kick()
        (c,) = g.driver.wait([head])
    assert c.used_len == MAX_CHAIN_BYTES
    assert len(c.data) == MAX_CHAIN_BYTES and g.driver.poisoned_tail(c) < 4


def test_a_chain_claiming_gigabytes_costs_max_chain_bytes(rng: Daemon) -> None:
    """A chain of the queue size's worth of 1 MiB buffers that all overlap: a gigabyte
    of writable bytes as the guest tells it, in 16 MiB of RAM. Served with
    MAX_CHAIN_BYTES; the daemon does not try to make the rest."""
    with connect_rng(rng, queue_size=1024, ram_size=16 * MiB) as g:
        q = g.queue
        buf = g.ram.alloc(MiB, 4096)
        g.ram.fill(buf, MiB, 0xA5)
        descs = q.reserve_descs(1024)
        for k, d in enumerate(descs):
            last = k == len(descs) - 1
            q.write_desc(
                d,
                buf,
                MiB,
                VRING_DESC_F_WRITE | (0 if last else VRING_DESC_F_NEXT),
                0 if last else descs[k + 1],
            )
        q.drain_call()  # the one signal SET_VRING_CALL gives a new call fd
        q.put_avail(descs[0])
        q.kick()
        q.enable_cb()
        assert q.wait_call(5.0)
        assert q.get_used() == [(descs[0], MAX_CHAIN_BYTES)]
        assert g.ram.read(buf + MAX_CHAIN_BYTES, 16) == b"\xa5" * 16


def test_more_than_max_batch_waiting_are_all_served(rng: Daemon) -> None:
    """MAX_BATCH chains are taken per call; more waiting than that are served by the
    calls that follow, without another kick."""
    with connect_rng(rng, queue_size=256) as g:
        heads = g.driver.post([32] * (2 * MAX_BATCH + 5))
        g.driver.kick()
        done = g.driver.wait(heads)
    assert all(c.used_len == 32 for c in done)


# --- the rate limit ----------------------------------------------------------------------


def test_the_rate_limit_holds(start_rng: StartRng) -> None:
    """--max-bytes-per-second R: by any time t after the first request the guest has
    had at most R (the bucket) + R*t bytes; everything asked for arrives in the end."""
    rate = 16 * 1024
    d = start_rng("--max-bytes-per-second", str(rate))
    with connect_rng(d) as g:
        heads = g.driver.post([4096] * 16)  # 64 KiB: 4 s at this rate
        start = time.monotonic()
        g.driver.kick()
        arrived: list[tuple[float, int]] = []
        pending = set(heads)
        deadline = start + 15
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} requests never served"
            g.queue.enable_cb()
            g.queue.wait_call(0.05)
            for c in g.driver.collect():
                arrived.append((time.monotonic() - start, c.used_len))
                pending.discard(c.head)
    total = 0
    for t, n in arrived:
        total += n
        assert total <= rate + rate * t + 4096, (t, total)  # one chain of slack: the clock
    assert total == 16 * 4096
    assert arrived[-1][0] >= (total - rate) / rate * 0.9  # it did wait


def test_a_rate_limited_request_larger_than_a_second_is_served_in_pieces(
    start_rng: StartRng,
) -> None:
    d = start_rng("--max-bytes-per-second", "1000")
    with connect_rng(d) as g:
        (head,) = g.driver.post([3000])
        g.driver.kick()
        (c,) = g.driver.wait([head], timeout=5)
    assert c.used_len == 1000  # one bucket's worth; the driver asks again for more


def test_a_disconnect_while_requests_wait_for_the_rate(start_rng: StartRng) -> None:
    """Requests the rate limit holds back are given back when the front end goes, and
    the next front end is served."""
    d = start_rng("--max-bytes-per-second", "100")
    with connect_rng(d) as g:
        g.driver.post([100, 100, 100])
        g.driver.kick()
        time.sleep(0.3)
    d.wait_disconnects(1)
    with connect_rng(d) as g:
        assert len(g.driver.read(50, timeout=5)) == 50


# --- --source FILE -----------------------------------------------------------------------


def test_source_file_is_what_the_guest_reads(start_rng: StartRng, tmp_path: Path) -> None:
    """The guest reads the file in order; once it ends, requests wait (nothing is made
    up), one error line says why, and the daemon still stops cleanly."""
    source = tmp_path / "entropy"
    content = os.urandom(10_000)
    source.write_bytes(content)
    d = start_rng("--source", str(source))
    with connect_rng(d) as g:
        got = b"".join(g.driver.read(n) for n in (1000, 4096, 4096))
        assert got == content[:9192]
        (head,) = g.driver.post([4096])
        g.driver.kick()
        (c,) = g.driver.wait([head])
        assert c.data == content[9192:]  # what was left
        (head,) = g.driver.post([64])
        g.driver.kick()
        with pytest.raises(TimeoutError):
            g.driver.wait([head], timeout=0.5)
    d.wait_log("end of file; no more entropy to give")
    assert d.log_count("end of file") == 1


def test_a_source_with_nothing_to_read_does_not_hold_a_stop(
    start_rng: StartRng, tmp_path: Path
) -> None:
    """A FIFO as the source: requests wait while it is empty and are served when bytes
    come; a SIGTERM while one waits ends the daemon at once and cleanly."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer_ready = threading.Event()
    fds: list[int] = []

    def open_writer() -> None:  # a FIFO opened for reading with no writer reads as EOF
        fds.append(os.open(fifo, os.O_WRONLY))
        writer_ready.set()

    t = threading.Thread(target=open_writer)
    t.start()
    d = start_rng("--source", str(fifo))
    try:
        assert writer_ready.wait(5)
        with connect_rng(d) as g:
            (head,) = g.driver.post([32])
            g.driver.kick()
            with pytest.raises(TimeoutError):
                g.driver.wait([head], timeout=0.3)
            os.write(fds[0], b"x" * 32)
            (c,) = g.driver.wait([head])
            assert c.data == b"x" * 32
            (head,) = g.driver.post([32])
            g.driver.kick()
            time.sleep(0.2)  # it waits on the empty FIFO now
            start = time.monotonic()
            d.check_clean_exit()
            assert time.monotonic() - start < 3
    finally:
        t.join()
        for fd in fds:
            os.close(fd)


# --- hostile chains ----------------------------------------------------------------------


def test_hostile_chains_are_refused_and_the_device_goes_on(guest: Rng, rng: Daemon) -> None:
    """A buffer outside guest memory and a descriptor loop: each returned with nothing
    written and logged; the good chains around them are served."""
    q, ram = guest.queue, guest.ram
    ok1 = guest.driver.add_chain(64)
    outside = q.reserve_descs(1)[0]
    q.write_desc(outside, ram.size + 0x100_0000, 64, VRING_DESC_F_WRITE, 0)
    q.put_avail(outside)
    a, b = q.reserve_descs(2)
    buf = ram.alloc(64)
    q.write_desc(a, buf, 32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, b)
    q.write_desc(b, buf, 32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, a)
    q.put_avail(a)
    ok2 = guest.driver.add_chain(64)
    guest.driver.kick()
    done = guest.driver.wait([ok1, ok2])
    assert [c.used_len for c in done] == [64, 64]
    assert sorted(guest.driver.unexpected_used) == sorted([(outside, 0), (a, 0)])
    rng.wait_log("buffer outside guest memory")
    rng.wait_log("descriptor loop")
    assert len(guest.driver.read(16)) == 16


def test_a_device_readable_buffer_gets_nothing(guest: Rng) -> None:
    """virtio-rng buffers are device-writable; a readable one is returned untouched."""
    q, ram = guest.queue, guest.ram
    d = q.reserve_descs(1)[0]
    buf = ram.alloc(64)
    ram.write(buf, b"r" * 64)
    q.write_desc(d, buf, 64, 0, 0)
    q.drain_call()  # the one signal SET_VRING_CALL gives a new call fd
    q.put_avail(d)
    q.kick()
    q.enable_cb()
    assert q.wait_call(5)
    assert q.get_used() == [(d, 0)]
    assert ram.read(buf, 64) == b"r" * 64


def test_a_bad_head_breaks_that_queue_only(start_rng: StartRng) -> None:
    """A head outside the descriptor table: that connection's queue stops (logged), the
    daemon's other socket serves its guest, and the next connection on the first socket
    is served again."""
    d = start_rng(ports=2)
    second = dataclasses.replace(d, sockets=[d.sockets[1]])  # the same daemon, socket 2
    with connect_rng(d) as g, connect_rng(second) as other:
        g.queue.put_avail(g.queue.num + 5)
        g.queue.kick()
        d.wait_log("ring broken")
        assert len(other.driver.read(100)) == 100
    d.wait_disconnects(2)
    with connect_rng(d) as g:
        assert len(g.driver.read(10)) == 10


def test_indirect_table_with_a_bad_entry(guest: Rng, rng: Daemon) -> None:
    """An indirect table whose entry points outside guest memory: refused in C."""
    q, ram = guest.queue, guest.ram
    table = ram.alloc(32, 16)
    ram.pack("<QIHH", table, ram.alloc(16), 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    ram.pack("<QIHH", table + 16, ram.size * 4, 16, VRING_DESC_F_WRITE, 0)
    head = q.reserve_descs(1)[0]
    q.write_desc(head, table, 32, VRING_DESC_F_INDIRECT, 0)
    q.drain_call()  # the one signal SET_VRING_CALL gives a new call fd
    q.put_avail(head)
    q.kick()
    q.enable_cb()
    assert q.wait_call(5)
    assert q.get_used() == [(head, 0)]
    rng.wait_log("buffer outside guest memory")


# --- the program -------------------------------------------------------------------------


def run_rng(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*device_command("rng"), *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_print_capabilities() -> None:
    r = run_rng("--print-capabilities")
    assert r.returncode == 0 and r.stderr == ""
    assert json.loads(r.stdout) == {"type": "rng"}


def test_python_m_vhost_rng_is_the_same_program() -> None:
    a = run_rng("--help")
    b = subprocess.run(
        [*device_command("rng", module=True), "--help"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert (a.returncode, a.stdout) == (b.returncode, b.stdout) == (0, a.stdout)
    for option in (
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--source",
        "--max-bytes-per-second",
    ):
        assert option in a.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-bytes-per-second", "0"], "--max-bytes-per-second 0"),
        (["--max-bytes-per-second", "-5"], "--max-bytes-per-second -5"),
        (["--source", "/nonexistent/entropy"], "/nonexistent/entropy"),
        ([], "--socket-path"),
    ],
    ids=["zero rate", "negative rate", "missing source", "no socket"],
)
def test_bad_options_are_one_line_and_status_2(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    sock = tmp_path / "rng.sock"
    r = run_rng(*(["--socket-path", str(sock)] if args else []), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhost-user-rng: error: "), r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr
    assert not sock.exists()


def test_the_attach_line_names_the_rng_device(rng: Daemon) -> None:
    line = rng.wait_log("attach with:")[0]
    assert f"-chardev socket,id=rng0,path={rng.socket_path},reconnect=1" in line
    assert "-device vhost-user-rng-pci,chardev=rng0" in line
