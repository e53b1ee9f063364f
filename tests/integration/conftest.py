"""Fixtures for the integration tests: the real daemon as a subprocess, and the test
front end (tests/support/) connected to it over its unix socket.

* ``start_daemon`` -- a factory: starts ``vhost-user-blk`` on a socket and image in
  ``tmp_path``, waits until the daemon's event loop has accepted (and dropped) a probe
  connection, and returns a :class:`Daemon`. At teardown every daemon still running gets
  SIGTERM; each must exit 0 with no ``Traceback`` in its log (killed on timeout).
* ``daemon`` -- one daemon with the default options, started for the test; a test
  marked ``@pytest.mark.shared_daemon`` instead gets a view of one daemon shared by the
  module (its log and disconnect counts start where the test started). Only tests that
  leave the daemon as they found it may share it; it saves a daemon start per test.
* ``guest`` -- a :class:`Guest` on ``daemon``: negotiated, memory table sent, queue 0
  set up, with a :class:`BlkDriver` on it. :func:`connect_guest` makes more of them.

Boundary: no assertions about virtio-blk behaviour here; the tests make those.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest

from tests.support.blk import BlkDriver, parse_blk_config
from tests.support.frontend import ALL_FEATURES, DriverQueue, FrontEnd, GuestRam, MiB

DAEMON = Path(sys.executable).with_name("vhost-user-blk")
IMAGE_SIZE = 64 * MiB
RAM_SIZE = 64 * MiB
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


@dataclass
class Daemon:
    """A running ``vhost-user-blk``; stderr (its log) goes to ``log_path``."""

    socket_path: Path
    image_path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)
    #: "disconnected" lines logged by the time the fixture handed the daemon out
    probe_disconnects: int = 0
    #: where this view of the log starts (a shared daemon's view for one test)
    log_start: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        """The log (from ``log_start``: what happened since this view was made)."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def view(self) -> Daemon:
        """This daemon, with a log (and disconnect count) starting now."""
        return dataclasses.replace(self, log_start=self.log_path.stat().st_size,
                                   probe_disconnects=0)

    def log_count(self, needle: str) -> int:
        return sum(needle in line for line in self.log_text().splitlines())

    def wait_log(self, needle: str | re.Pattern[str], count: int = 1,
                 timeout: float = 5.0) -> list[str]:
        """Wait until ``count`` log lines contain ``needle`` (a substring or a regex);
        returns the matching lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.log_text().splitlines()
                     if (needle.search(ln) if isinstance(needle, re.Pattern) else needle in ln)]
            if len(lines) >= count:
                return lines
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise AssertionError(
                    f"expected {count} log line(s) with {needle!r}, got {len(lines)}; "
                    f"log:\n{self.log_text()}")
            time.sleep(0.01)

    def wait_disconnects(self, n: int, timeout: float = 5.0) -> None:
        """Wait until the daemon has torn down ``n`` test connections (probe not counted)."""
        self.wait_log("disconnected:", self.probe_disconnects + n, timeout)

    # --- resources, from /proc ---
    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memfd_maps(self) -> int:
        with open(f"/proc/{self.pid}/maps") as f:
            return sum("memfd:" in line for line in f)

    def thread_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def resources(self) -> dict[str, int]:
        return {"fds": self.fd_count(), "memfd_maps": self.memfd_maps(),
                "threads": self.thread_count()}

    def settled_resources(self, expect: dict[str, int], timeout: float = 2.0) -> dict[str, int]:
        """The resources once they equal ``expect``, or as they are after ``timeout``
        (a joined thread can linger in /proc/PID/task for a moment after join)."""
        deadline = time.monotonic() + timeout
        while (now := self.resources()) != expect and time.monotonic() < deadline:
            time.sleep(0.01)
        return now

    # --- stopping ---
    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; kills (and fails) on timeout. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon {self.pid} did not exit within {timeout}s of SIGTERM; log:\n"
                f"{self.log_text()}") from None

    def check_clean_exit(self) -> None:
        rc = self.terminate()
        log = self.log_text()
        assert rc == 0, f"daemon exited with {rc}; log:\n{log}"
        assert "Traceback" not in log, f"traceback in the daemon log:\n{log}"


StartDaemon = Callable[..., Daemon]


def daemon_command(module: bool = False) -> list[str]:
    """How to run the program: the installed script, or ``python -m vhost blk``."""
    return [sys.executable, "-m", "vhost", "blk"] if module else [str(DAEMON)]


def _probe(d: Daemon, deadline: float) -> None:
    """Wait until the daemon's loop accepts a connection (so its signal handlers are in
    place), then hang up and wait for it to notice."""
    while True:
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode} at startup; log:\n"
                                 f"{d.log_text()}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(d.socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon socket {d.socket_path} never accepted; log:\n"
                                     f"{d.log_text()}") from None
            time.sleep(0.01)
            continue
        s.close()
        break
    d.wait_log("disconnected:", 1, max(0.1, deadline - time.monotonic()))
    d.probe_disconnects = 1


def spawn_daemon(directory: Path, name: str, *args: str, image_size: int | None = IMAGE_SIZE,
                 image: Path | None = None, socket_path: Path | None = None,
                 listen_fd: int | None = None, pass_fds: Sequence[int] = (),
                 module: bool = False, probe: bool = True, umask: int = -1) -> Daemon:
    """Start the daemon with ``args`` added, files named after ``name`` in ``directory``.
    The image is created sparse with ``image_size`` bytes unless it exists
    (``image_size=None``: leave it missing). With ``listen_fd`` the daemon gets
    ``--fd N`` instead of ``--socket-path`` (``socket_path`` then names where that
    socket is bound, for the probe). ``umask`` (if >= 0) is the daemon's umask."""
    sock = socket_path or directory / f"{name}.sock"
    img = image or directory / f"{name}.img"
    if image_size is not None and not img.exists():
        with open(img, "wb") as f:
            f.truncate(image_size)
    log_path = directory / f"{name}.log"
    where = ["--fd", str(listen_fd)] if listen_fd is not None else ["--socket-path", str(sock)]
    argv = [*daemon_command(module), *where, "--blk-file", str(img), *args]
    inherit = tuple(pass_fds) or (() if listen_fd is None else (listen_fd,))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=inherit, umask=umask)
    d = Daemon(sock, img, proc, log_path, argv)
    if probe:
        try:
            _probe(d, time.monotonic() + START_TIMEOUT)
        except BaseException:
            d.proc.kill()
            d.proc.wait()
            raise
    return d


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """``start_daemon(*args, **options)``: see :func:`spawn_daemon`."""
    started: list[Daemon] = []
    counter = iter(range(1000))

    def start(*args: str, **options: Any) -> Daemon:
        d = spawn_daemon(tmp_path, f"blk{next(counter)}", *args, **options)
        started.append(d)
        return d

    yield start

    errors: list[str] = []
    for d in started:
        try:
            d.check_clean_exit()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "shared_daemon: the daemon fixture is the module's shared daemon")


@pytest.fixture(scope="module")
def _module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = spawn_daemon(tmp_path_factory.mktemp("shared"), "shared")
    yield d
    d.check_clean_exit()


@pytest.fixture
def daemon(request: pytest.FixtureRequest, start_daemon: StartDaemon) -> Iterator[Daemon]:
    if request.node.get_closest_marker("shared_daemon") is None:
        yield start_daemon()
        return
    shared: Daemon = request.getfixturevalue("_module_daemon")
    view = shared.view()
    yield view
    # Let the daemon finish with this test's connections before the next view starts.
    view.wait_disconnects(view.log_count("front end connected"))
    # The test must leave the shared daemon running, with a clean log.
    assert shared.proc.poll() is None, f"shared daemon exited; log:\n{shared.log_text()}"
    assert "Traceback" not in view.log_text(), view.log_text()


@dataclass
class Guest:
    """One front-end connection with its guest RAM and a BlkDriver per queue."""

    fe: FrontEnd
    ram: GuestRam
    drivers: list[BlkDriver]
    daemon: Daemon

    @property
    def blk(self) -> BlkDriver:
        return self.drivers[0]

    @property
    def queue(self) -> DriverQueue:
        return self.drivers[0].queue

    def capacity(self) -> int:
        return parse_blk_config(self.fe.get_config())["capacity"]

    def close(self) -> None:
        self.fe.close()
        self.ram.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_guest(d: Daemon, *, queues: int | None = 1, queue_size: int = 128,
                  features: int = ALL_FEATURES, regions: int = 2, ram_size: int = RAM_SIZE,
                  add_mem_reg: bool = False, start_idx: int = 0,
                  buf_regions: Sequence[int] = (0,)) -> Guest:
    """Connect to ``d``, negotiate ``features`` (masked by what is offered), describe
    the RAM (SET_MEM_TABLE, or one ADD_MEM_REG per region) and set up ``queues``
    queues (None: as many as GET_QUEUE_NUM says)."""
    ram = GuestRam(ram_size, regions)
    fe = FrontEnd(d.socket_path, ram)
    try:
        fe.connect()
        fe.negotiate(features)
        if add_mem_reg:
            fe.add_mem_regions()
        else:
            fe.set_mem_table()
        n = fe.queue_num if queues is None else queues
        drivers = [BlkDriver(fe.setup_queue(i, queue_size, start_idx=start_idx),
                             buf_regions=buf_regions) for i in range(n)]
    except BaseException:
        fe.close()
        ram.close()
        raise
    return Guest(fe, ram, drivers, d)


@pytest.fixture
def guest(daemon: Daemon) -> Iterator[Guest]:
    with connect_guest(daemon) as g:
        yield g
