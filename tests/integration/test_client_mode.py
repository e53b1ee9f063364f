"""Client mode (``--client``): the daemon connects to a front end that listens, as QEMU
does with ``-chardev socket,server=on`` (docs/client-mode.md).

The test front end plays the listening QEMU (:class:`~tests.support.frontend.
FrontEndListener`). What must hold: the daemon connects once the socket appears,
retrying with capped exponential backoff and logging the failures at a limited rate;
it serves real I/O on each connection; when the connection drops (the front end quit
or restarted) it connects again the same way and serves again; with several
--socket-path each connects on its own; every device program has the option; SIGTERM
stops it cleanly while it retries or while it is connected, and it never removes the
front end's socket file. The backoff and the log's rate limit are also checked in
process on :class:`vhost.server.Connector`, with short intervals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.blk import (
    RAM_SIZE,
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    BlkDriver,
    Guest,
    check_io_works,
    disk_read,
    pattern,
)
from tests.support.daemon import (
    Daemon,
    DaemonGroup,
    check_usage_error,
    daemons,
    device_command,
    run_program,
    spawn_blk,
    spawn_device,
)
from tests.support.frontend import FrontEndListener, GuestRam, KiB, MiB
from vhost import cli, registry
from vhost.server import RETRY_LOG_INTERVAL, RETRY_MAX_DELAY, Connector

CONNECTED = re.compile(r"client: connected to ")
FIRST_FAILURE = "client: cannot connect to "
STILL_FAILING = "client: still cannot connect to "
#: the options each of this project's devices needs besides its sockets
DEVICE_ARGS: dict[str, list[str]] = {"net": ["--switch", "sw0"], "rng": []}


@pytest.fixture
def group(tmp_path: Path) -> Iterator[DaemonGroup]:
    """Client-mode blk daemons in tmp_path; each must exit cleanly at teardown."""
    with daemons(spawn_blk, tmp_path, "client", client=True) as g:
        yield g


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[FrontEndListener]:
    """The front end's socket, ``tmp_path/qemu.sock``, not listening yet."""
    fl = FrontEndListener(tmp_path / "qemu.sock")
    yield fl
    fl.close()


def accept_guest(fl: FrontEndListener, d: Daemon, timeout: float = 5.0) -> Guest:
    """The next connection of ``d`` to ``fl``, negotiated, memory described and queue 0
    set up: what tests.support.blk.connect_guest makes, with the daemon connecting."""
    ram = GuestRam(RAM_SIZE, 2)
    try:
        fe = fl.accept(ram, timeout)
    except BaseException:
        ram.close()
        raise
    try:
        fe.negotiate()
        fe.set_mem_table()
        driver = BlkDriver(fe.setup_queue(0, 128))
    except BaseException:
        fe.close()
        ram.close()
        raise
    return Guest(fe, ram, [driver], d)


def failed_attempts(line: str) -> int:
    m = re.search(r"after (\d+) failed attempts", line)
    assert m, line
    return int(m[1])


# --- serving, and serving again after a disconnect --------------------------------------


def test_client_serves_and_reconnects_after_the_front_end_hangs_up(
    group: DaemonGroup, listener: FrontEndListener
) -> None:
    listener.listen()
    d = group.start(socket_path=Path(listener.socket_path))
    with accept_guest(listener, d) as g:
        check_io_works(g, d, sector=100)
        first = pattern("first", 8 * KiB)
        assert g.blk.write(200, first) == VIRTIO_BLK_S_OK
    # the front end hung up: the daemon tears the session down and connects again
    d.wait_connection_closed(1)
    with accept_guest(listener, d) as g:
        assert g.blk.read(200, len(first)) == first
        check_io_works(g, d, sector=300)
    d.wait_connection_closed(2)
    assert d.log_count(CONNECTED) >= 2
    assert d.log_count(FIRST_FAILURE) == 0  # it was listening every time
    assert "Traceback" not in d.log_text()


def test_client_reconnects_to_a_restarted_front_end(
    group: DaemonGroup, listener: FrontEndListener
) -> None:
    """The front end quits (its socket file goes) and comes back later on the same
    path: the daemon retries meanwhile and serves the new one."""
    listener.listen()
    d = group.start(socket_path=Path(listener.socket_path))
    with accept_guest(listener, d) as g:
        data = pattern("before restart", 16 * KiB)
        assert g.blk.write(64, data) == VIRTIO_BLK_S_OK
        listener.close()  # "QEMU quits": no more listening socket, then the connection
    d.wait_connection_closed(1)
    d.wait_log(FIRST_FAILURE)
    time.sleep(0.5)
    listener.listen()
    with accept_guest(listener, d, timeout=RETRY_MAX_DELAY + 5) as g:
        assert g.blk.read(64, len(data)) == data
        check_io_works(g, d)
    line = d.wait_log(CONNECTED, 2)[1]
    assert failed_attempts(line) >= 2


def test_client_reconnects_when_the_front_end_is_killed(
    group: DaemonGroup, listener: FrontEndListener
) -> None:
    """A killed QEMU leaves its socket file behind (connect: ECONNREFUSED) and a new
    one binds the same path again."""
    listener.listen()
    d = group.start(socket_path=Path(listener.socket_path))
    with accept_guest(listener, d) as g:
        check_io_works(g, d)
        listener.close(unlink=False)
    d.wait_connection_closed(1)
    assert "Connection refused" in d.wait_log(FIRST_FAILURE)[0]
    listener.listen()  # replaces the stale file, as QEMU does
    with accept_guest(listener, d, timeout=RETRY_MAX_DELAY + 5) as g:
        check_io_works(g, d)


# --- before the front end exists: backoff and a rate-limited log -----------------------


def test_client_started_before_the_front_end_backs_off(
    group: DaemonGroup, listener: FrontEndListener
) -> None:
    """No socket yet: the daemon retries (0.05 s doubling to 1 s) and logs the first
    failure only; once the front end listens it connects within the capped delay and
    says how many attempts failed."""
    d = group.start(socket_path=Path(listener.socket_path))
    time.sleep(1.7)
    assert d.alive()
    assert d.log_count(FIRST_FAILURE) == 1, d.log_text()
    assert "No such file or directory" in d.log_lines(FIRST_FAILURE)[0]
    assert d.log_count(STILL_FAILING) == 0  # RETRY_LOG_INTERVAL (10 s) not reached
    listener.listen()
    t = time.monotonic()
    with accept_guest(listener, d, timeout=RETRY_MAX_DELAY + 5) as g:
        assert time.monotonic() - t < RETRY_MAX_DELAY + 1.0
        check_io_works(g, d)
    line = d.wait_log(CONNECTED)[0]
    # attempts at 0, 0.05, 0.15, 0.35, 0.75, 1.55 s: six in 1.7 s, maybe one more before
    # the listener was found, not hundreds; and one line for all of them
    n = failed_attempts(line)
    assert 4 <= n <= 8, line
    assert d.log_count(" ERROR ") == 0, d.log_text()


def test_connector_backoff_and_log_rate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In process, with short intervals: the delays double up to the cap, the log has
    the first failure and then one line per interval, whose counts add up; connected,
    one line with the total."""
    path = tmp_path / "late.sock"
    interval = 0.3
    connector = Connector(
        str(path), "late.sock", first_delay=0.01, max_delay=0.04, log_interval=interval
    )
    attempts: list[float] = []
    real_try = connector.try_connect

    def counting_try() -> socket.socket:
        attempts.append(time.monotonic())
        return real_try()

    connector.try_connect = counting_try  # type: ignore[method-assign]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def scenario() -> socket.socket:
        async def listen_later() -> None:
            await asyncio.sleep(1.35)
            server.bind(str(path))
            server.listen(1)

        later = asyncio.ensure_future(listen_later())
        conn = await asyncio.wait_for(connector.next_connection(), 5)
        await later
        return conn

    caplog.set_level(logging.INFO, logger="vhost.server")
    try:
        conn = asyncio.run(scenario())
        conn.close()
    finally:
        server.close()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02, gaps
    assert max(gaps) < 0.04 + 0.1, gaps  # capped (plus scheduling noise)
    assert len(attempts) >= 20, len(attempts)
    lines = [r.getMessage() for r in caplog.records if r.name == "vhost.server"]
    first = [ln for ln in lines if FIRST_FAILURE in ln]
    still = [ln for ln in lines if STILL_FAILING in ln]
    done = [ln for ln in lines if "client: connected to" in ln]
    assert len(first) == 1 and len(done) == 1, lines
    # 1.35 s of failures at one line per 0.3 s: 3 or 4 more lines, not one per attempt
    assert 3 <= len(still) <= 5, lines
    summed = [re.search(r": (\d+) attempts failed", ln) for ln in still]
    counted = 1 + sum(int(m[1]) for m in summed if m)
    assert len(summed) == len(still) and counted <= len(attempts) - 1, lines
    assert failed_attempts(done[0]) == len(attempts) - 1 == connector.failed_attempts


def test_a_peer_that_hangs_up_at_once_is_not_hammered(
    group: DaemonGroup, listener: FrontEndListener
) -> None:
    """Something accepts and closes before saying a word: the daemon's delay keeps
    growing (to 1 s) instead of reconnecting in a loop."""
    listener.listen(backlog=8)
    d = group.start(socket_path=Path(listener.socket_path))
    deadline = time.monotonic() + 1.7
    accepted = 0
    while time.monotonic() < deadline:
        try:
            conn = listener.accept_socket(timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        conn.close()
        accepted += 1
    # delays 0, 0.05, 0.1, 0.2, 0.4, 0.8: 6 in 1.7 s (a loop would make thousands)
    assert 3 <= accepted <= 8, accepted
    with accept_guest(listener, d, timeout=RETRY_MAX_DELAY + 5) as g:
        check_io_works(g, d)


# --- stopping ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_it_cleanly_while_retrying(
    group: DaemonGroup, listener: FrontEndListener, sig: signal.Signals
) -> None:
    d = group.start(socket_path=Path(listener.socket_path))
    time.sleep(0.3)
    t = time.monotonic()
    d.proc.send_signal(sig)
    assert d.proc.wait(5) == 0, d.log_text()
    assert time.monotonic() - t < 2.0
    assert "Traceback" not in d.log_text()
    assert d.log_count("stopped") == 1
    d.checked = True


def test_sigterm_while_connected_leaves_the_front_ends_socket(
    group: DaemonGroup, listener: FrontEndListener
) -> None:
    listener.listen()
    d = group.start(socket_path=Path(listener.socket_path))
    with accept_guest(listener, d) as g:
        check_io_works(g, d)
        d.check_clean_exit()
        assert g.fe.is_closed_by_peer(2.0)
    assert os.path.lexists(listener.socket_path), "the daemon removed QEMU's socket file"
    assert d.log_count("disconnected: daemon stopping") == 1


# --- several sockets, every device ------------------------------------------------------


def test_each_socket_is_a_client_of_its_own(tmp_path: Path, group: DaemonGroup) -> None:
    """Two disks: disk 1's front end appears late and disk 0's leaves; neither
    disturbs the other."""
    img1 = tmp_path / "disk1.img"
    with open(img1, "wb") as f:
        f.truncate(16 * MiB)
    fl0 = FrontEndListener(tmp_path / "q0.sock").listen()
    fl1 = FrontEndListener(tmp_path / "q1.sock")
    try:
        d = group.start(
            "--socket-path",
            fl1.socket_path,
            "--blk-file",
            str(img1),
            socket_path=Path(fl0.socket_path),
        )
        with accept_guest(fl0, d) as g0:
            check_io_works(g0, d)
            d.wait_log(f"q1.sock: {FIRST_FAILURE}")
            fl1.listen()
            d1 = dataclasses.replace(d, sockets=[Path(fl1.socket_path)], image=img1)
            with accept_guest(fl1, d1, timeout=RETRY_MAX_DELAY + 5) as g1:
                data = pattern("disk1", 8 * KiB)
                assert g1.blk.write(8, data) == VIRTIO_BLK_S_OK
                assert disk_read(d1, 8 * SECTOR_SIZE, len(data)) == data
                g0.close()  # disk 0's front end leaves
                d.wait_connection_closed(1)
                check_io_works(g1, d1)  # disk 1 goes on
            with accept_guest(fl0, d, timeout=RETRY_MAX_DELAY + 5) as g0b:
                check_io_works(g0b, d)
    finally:
        fl0.close()
        fl1.close()


def _registered_devices() -> list[str]:
    return [n for n in registry.names() if n in ("blk", *DEVICE_ARGS)]


@pytest.mark.parametrize("device", _registered_devices())
def test_every_device_program_has_client_mode(
    tmp_path: Path, listener: FrontEndListener, device: str
) -> None:
    """``python -m vhost NAME --client``: connects, answers the front end, and
    connects again after it hangs up."""
    listener.listen()
    if device == "blk":
        img = tmp_path / "d.img"
        img.write_bytes(bytes(MiB))
        args = ["--blk-file", str(img)]
    else:
        args = DEVICE_ARGS[device]
    spawner = functools.partial(spawn_device, device)
    with daemons(spawner, tmp_path, device, command=device_command(device, module=True)) as g:
        d = g.start(*args, sockets=[Path(listener.socket_path)], client=True)
        for n in (1, 2):
            ram = GuestRam(MiB)
            with listener.accept(ram) as fe:
                assert fe.get_features() != 0
                assert fe.get_protocol_features() != 0
            ram.close()
            d.wait_connection_closed(n)
        line = d.wait_log("attach with:")[0]
        # plain server=on: what QEMU 7.2 takes for every device (rng aborts with wait=off)
        assert f"path={listener.socket_path},server=on " in line


# --- the command line --------------------------------------------------------------------


def test_client_with_fd_is_a_usage_error(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    r = run_program("blk", "--client", "--fd", "3", "--blk-file", str(img))
    check_usage_error(r, "vhost-user-blk", "--client", "--fd")
    assert not (tmp_path / "d.sock").exists()


def test_client_socket_path_too_long_is_a_usage_error(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    path = tmp_path / ("x" * 120)
    r = run_program("blk", "--client", "--socket-path", str(path), "--blk-file", str(img))
    check_usage_error(r, "vhost-user-blk", "too long")


@pytest.mark.parametrize("device", registry.names())
def test_help_names_client(device: str) -> None:
    """Every registered device's program has the option (vhost.cli adds it)."""
    assert "--client" in cli.make_parser(registry.load(device)).format_help()


def test_connect_is_quick_for_a_front_end_already_listening(
    group: DaemonGroup, listener: FrontEndListener
) -> None:
    """No retry at all when QEMU listens first (the usual order)."""
    listener.listen()
    got: list[socket.socket] = []
    t = threading.Thread(target=lambda: got.append(listener.accept_socket(5.0)))
    t.start()
    d = group.start(socket_path=Path(listener.socket_path))
    t.join(6)
    assert got, d.log_text()
    got[0].close()
    assert d.log_count(FIRST_FAILURE) == 0
    d.wait_connection_closed(1)
    assert RETRY_LOG_INTERVAL >= 5  # the rate limit the daemon tests above rely on
