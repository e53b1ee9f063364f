"""A back-end daemon as a subprocess: how the tests and the benchmarks start, watch and
stop any device program of this project (``vhost-user-blk``, ``vhost-user-net``,
``vhost-user-rng``; each also ``python -m vhost DEVICE``) or another back end.

* :class:`Launch` -- how to start one: the argv (an exec prefix such as ``ip netns exec
  NS`` or ``taskset -c N`` included), the sockets it serves, inherited fds, umask,
  session, environment, and when start-up counts as done (:class:`Ready`). A launch can
  be started again and again (a daemon killed and restarted on the same sockets).
* :class:`Daemon` -- one running process: its log (all of it, or a *view* from an
  offset on), its fds, memfd mappings, threads and CPU time from /proc, and the ways to
  stop it: SIGTERM with a deadline (:meth:`Daemon.terminate`, :meth:`Daemon.stop`),
  SIGKILL (:meth:`Daemon.kill9`), and :meth:`Daemon.check_clean_exit` (exit status 0,
  no traceback logged, its socket files removed).
* :func:`spawn_blk`, :func:`spawn_net`, :func:`spawn_rng` (any device:
  :func:`spawn_device`) -- the launches of this project's daemons with files named
  after the test; :func:`spawn_blk_for_qemu` and
  :func:`spawn_net_for_qemu` the ones QEMU guests and benchmarks attach to.
* :class:`DaemonGroup` and :func:`daemons` -- the daemons a test started, stopped and
  checked together: what a conftest fixture yields.
* :func:`run_program` and :func:`check_usage_error` -- a program run to its end, and
  the check of how it refuses bad arguments.

Start-up (:class:`Ready`) differs on purpose between callers: most tests connect a probe
and wait until the daemon logged its teardown (its event loop and signal handlers are
then in place, and the probe is connection #1); under a live QEMU with ``reconnect=1``
QEMU may connect first, and since a socket serves one front end at a time a probe would
wait behind it, so there the first logged connection, whoever made it, is the proof. A
daemon in client mode (``--client``, :attr:`Launch.client`) connects out to sockets a
front end listens on: nothing is probed, its first connection attempt logged is the
proof (:attr:`Ready.CONNECTING`), or the connection the front end accepted.

tests/dpdk.py keeps ``process_backend`` for the packet-rate benchmarks: it pins *any*
back end (ours, another checkout's, one that is not ours at all) with ``taskset``, learns
that it listens from /proc/net/unix without connecting to it, and asserts nothing about
how it ends -- a benchmark harness, not a test of our daemon. tests/integration/
test_net_dpdk.py tests our daemon and so starts it here, with ``taskset`` as its exec
prefix.

Boundary: this module starts, watches and stops processes; the only things it asserts
are the lifecycle contract of a backend program (it starts, it stops cleanly, bad
arguments are one line and exit status 2). What the daemon does for a front end is for
the tests to check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.frontend import MiB

if TYPE_CHECKING:
    from tests.netns import NetNs

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: how long :meth:`Daemon.wait_log` waits by default
WAIT_TIMEOUT = 5.0
#: the image :func:`spawn_blk` creates (sparse) unless told otherwise
IMAGE_SIZE = 64 * MiB
#: QEMU guests run under TCG on a busy machine: their daemons get more time
QEMU_STOP_TIMEOUT = 15.0
QEMU_WAIT_TIMEOUT = 10.0

Popen = Callable[..., "subprocess.Popen[bytes]"]
#: a fixture's ``start(*args, **options)``: see :func:`spawn_blk` / :func:`spawn_net`
StartDaemon = Callable[..., "Daemon"]
Needle = str | re.Pattern[str]


# =========================================================================================
# The programs
# =========================================================================================


def script(device: str) -> Path:
    """The console script ``vhost-user-DEVICE`` installed next to this Python."""
    return Path(sys.executable).with_name(f"vhost-user-{device}")


def device_command(device: str, *, module: bool = False) -> list[str]:
    """``DEVICE``'s program: its console script, or (``module``) ``python -m vhost DEVICE``."""
    return [sys.executable, "-m", "vhost", device] if module else [str(script(device))]


def available_command(device: str) -> list[str]:
    """The console script when it is installed, else ``python -m vhost DEVICE``."""
    return device_command(device, module=not script(device).exists())


def installed_command(device: str) -> list[str] | None:
    """The console script next to this Python or on PATH; None when there is neither."""
    if script(device).exists():
        return [str(script(device))]
    found = shutil.which(f"vhost-user-{device}")
    return [found] if found else None


def run_program(
    device: str,
    *args: str,
    module: bool = False,
    exec_prefix: Sequence[str] = (),
    cwd: Path | None = None,
    pass_fds: Sequence[int] = (),
    timeout: float = 20.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``DEVICE``'s program with ``args`` to its end (no stdin, output as text): what
    the tests of its options and of ``--print-capabilities`` do."""
    return subprocess.run(
        [*exec_prefix, *device_command(device, module=module), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def check_usage_error(r: subprocess.CompletedProcess[str], program: str, *needles: str) -> None:
    """The backend program convention for bad arguments: exit status 2, one line on
    stderr (``PROGRAM: error: ...``, naming each of ``needles``), nothing on stdout, no
    traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert r.stdout == ""


def this_tree_env() -> dict[str, str]:
    """Environment additions that make the daemon import this tree's ``vhost`` and
    ``devices``, whatever an editable install points at (maybe another checkout)."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), path]))}


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "pid (comm)": state is field 3, utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _label(argv: Sequence[str]) -> str:
    """What to call the program in messages: ``vhost-user-net``, ``vhost blk``, ..."""
    for k, a in enumerate(argv):
        name = Path(a).name
        if name.startswith("vhost-user-"):
            return name
        if a == "-m" and k + 1 < len(argv):
            return " ".join(argv[k + 1 : k + 3])
    return Path(argv[0]).name if argv else "daemon"


# =========================================================================================
# Starting
# =========================================================================================


class Ready(enum.Enum):
    """When :meth:`Launch.start` returns."""

    #: every socket accepted a probe connection (closed at once) and the daemon logged
    #: each teardown ("disconnected:"): its loop and signal handlers are up, and the
    #: probes are connections #1 of their sockets
    PROBED = "probed"
    #: every socket accepted a probe and the daemon logged its connection #1 as
    #: connected -- the probe's, or a reconnecting QEMU's that won the race (waiting for
    #: the probe's teardown would then hang behind QEMU)
    FIRST_CONNECTION = "first connection"
    #: every socket accepts a connection (closed at once); nothing logged is awaited
    ACCEPTS = "accepts"
    #: at once: no connection is made, the caller waits for a sign of its own
    STARTED = "started"
    #: client mode (:attr:`Launch.client`): every socket's client logged its first
    #: attempt, made or failed ("client: connected to" / "client: cannot connect to"):
    #: its loop and signal handlers are up. Nothing connects to the daemon
    CONNECTING = "connecting"


@dataclass(frozen=True)
class Launch:
    """How to start a daemon (everything but its log file); :meth:`start` may be called
    again for a new incarnation on the same sockets."""

    argv: tuple[str, ...]
    #: where it accepts connections (what the start-up probes connect to)
    sockets: tuple[Path, ...] = ()
    #: False when the socket files are not the daemon's to remove (``--fd N``, or a
    #: front end's in client mode)
    owns_sockets: bool = True
    #: client mode (``--client``): the daemon connects to :attr:`sockets`, where a front
    #: end listens; they are never probed (Ready.CONNECTING, or Ready.FIRST_CONNECTION
    #: for the connection the front end accepted)
    client: bool = False
    #: a blk daemon's image file
    image: Path | None = None
    ready: Ready = Ready.PROBED
    pass_fds: tuple[int, ...] = ()
    umask: int = -1
    start_new_session: bool = False
    #: added to this process's environment
    env: Mapping[str, str] | None = None
    #: how the process is made (``NetNs.popen`` runs it inside a namespace and kills it
    #: with the namespace)
    popen: Popen = subprocess.Popen
    start_timeout: float = START_TIMEOUT
    stop_timeout: float = STOP_TIMEOUT
    wait_timeout: float = WAIT_TIMEOUT

    def start(self, log_path: Path) -> Daemon:
        """Start the process with stdout and stderr to ``log_path`` (truncated) and wait
        as :attr:`ready` says; on a failed start-up it is killed and the error raised."""
        env = {**os.environ, **self.env} if self.env is not None else None
        with open(log_path, "wb") as log:
            proc = self.popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=self.pass_fds,
                umask=self.umask,
                start_new_session=self.start_new_session,
                env=env,
            )
        d = Daemon(self, proc, log_path, list(self.sockets), self.image)
        try:
            _wait_ready(d, self.ready, time.monotonic() + self.start_timeout)
        except BaseException:
            if d.alive():
                d.kill9()
            raise
        return d


def spawn(
    argv: Sequence[str], log_path: Path, sockets: Sequence[Path] = (), **options: Any
) -> Daemon:
    """``Launch(argv, sockets, **options).start(log_path)``."""
    return Launch(tuple(argv), tuple(sockets), **options).start(log_path)


def _connect_once(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def _wait_accepts(d: Daemon, path: Path, deadline: float) -> None:
    while not _connect_once(path):
        if not d.alive():
            raise AssertionError(
                f"{d.label} exited with {d.proc.returncode} at start-up; log:\n{d.log_text()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never accepted; log:\n{d.log_text()}")
        time.sleep(0.01)


def _wait_client_ready(d: Daemon, ready: Ready, deadline: float) -> None:
    for path in d.sockets:
        left = max(0.5, deadline - time.monotonic())
        if ready is Ready.CONNECTING:
            attempt = re.compile(rf"{re.escape(path.name)}: client: (connected|cannot connect) to ")
            d.wait_log(attempt, 1, left)
        elif ready is Ready.FIRST_CONNECTION:
            d.wait_log(f"{d.connection(1, path)}: front end connected", 1, left)
        else:
            raise ValueError(f"a client-mode daemon connects out: {ready} cannot be awaited")


def _wait_ready(d: Daemon, ready: Ready, deadline: float) -> None:
    if ready is Ready.STARTED:
        return
    if d.launch.client:
        _wait_client_ready(d, ready, deadline)
        return
    for n, path in enumerate(d.sockets, 1):
        _wait_accepts(d, path, deadline)
        left = deadline - time.monotonic()
        if ready is Ready.PROBED:
            d.wait_log("disconnected:", n, max(0.1, left))
        elif ready is Ready.FIRST_CONNECTION:
            d.wait_log(f"{d.connection(1, path)}: front end connected", 1, max(0.5, left))
    if ready is Ready.PROBED:
        d.probe_disconnects = len(d.sockets)


# =========================================================================================
# A running daemon
# =========================================================================================


@dataclass
class Daemon:
    """A running back end; its stdout and stderr (the log) go to ``log_path``."""

    launch: Launch
    proc: subprocess.Popen[bytes]
    log_path: Path
    #: where it accepts connections (a view may name one disk of several)
    sockets: list[Path]
    image: Path | None = None
    #: "disconnected" lines the start-up probes caused (not counted by wait_disconnects)
    probe_disconnects: int = 0
    #: where this view of the log starts (a shared daemon's view for one test)
    log_start: int = 0
    #: check_clean_exit() passed already (a test stopped the daemon itself)
    checked: bool = False

    # --- identity ------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def argv(self) -> list[str]:
        return list(self.launch.argv)

    @property
    def label(self) -> str:
        return _label(self.launch.argv)

    @property
    def socket_path(self) -> Path:
        if not self.sockets:
            raise AttributeError(f"{self.label} {self.pid} has no socket path")
        return self.sockets[0]

    @property
    def image_path(self) -> Path:
        if self.image is None:
            raise AttributeError(f"{self.label} {self.pid} has no image")
        return self.image

    def connection(self, n: int, socket_path: Path | None = None) -> str:
        """How log lines name connection ``n`` (from 1) of a socket: ``blk0.sock#2``."""
        return f"{(socket_path or self.socket_path).name}#{n}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def respawn(self, log_path: Path) -> Daemon:
        """The same launch again (same argv and sockets), logging to ``log_path``."""
        return self.launch.start(log_path)

    # --- the log -------------------------------------------------------------------------
    def log_text(self) -> str:
        """The log (from ``log_start``: what happened since this view was made)."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def view(self) -> Daemon:
        """This daemon, with a log (and disconnect count) starting now."""
        return dataclasses.replace(
            self, log_start=self.log_path.stat().st_size, probe_disconnects=0, checked=False
        )

    def log_lines(self, needle: Needle) -> list[str]:
        """The log lines containing ``needle`` (a substring, or a regex searched for)."""
        return [
            ln
            for ln in self.log_text().splitlines()
            if (needle.search(ln) if isinstance(needle, re.Pattern) else needle in ln)
        ]

    def log_count(self, needle: Needle) -> int:
        return len(self.log_lines(needle))

    def wait_log(self, needle: Needle, count: int = 1, timeout: float | None = None) -> list[str]:
        """Wait until ``count`` log lines contain ``needle``; returns them. Fails at the
        deadline, or as soon as the daemon has exited without logging them."""
        t = self.launch.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while True:
            exited = not self.alive()  # before the read: an exit after it is seen next turn
            lines = self.log_lines(needle)
            if len(lines) >= count:
                return lines
            if exited or time.monotonic() >= deadline:
                state = f"exited with {self.proc.returncode}" if exited else "running"
                raise AssertionError(
                    f"expected {count} log line(s) of {self.label} with {needle!r}, got "
                    f"{len(lines)} within {t}s ({state}); log:\n{self.log_text()}"
                )
            time.sleep(0.01)

    def wait_disconnects(self, n: int, timeout: float | None = None) -> None:
        """Wait until the daemon has torn down ``n`` connections after its start-up
        probes (counted in this view of the log)."""
        self.wait_log("disconnected:", self.probe_disconnects + n, timeout)

    def wait_connection_closed(self, n: int, timeout: float | None = None) -> str:
        """Wait until connection ``n`` of the first socket (1: the first one, often the
        start-up probe) is torn down; returns its "disconnected:" line."""
        return self.wait_log(f"{self.connection(n)}: disconnected:", 1, timeout)[0]

    # --- resources, from /proc -----------------------------------------------------------
    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memfd_maps(self) -> int:
        with open(f"/proc/{self.pid}/maps") as f:
            return sum("memfd:" in line for line in f)

    def thread_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def resources(self) -> dict[str, int]:
        return {
            "fds": self.fd_count(),
            "memfd_maps": self.memfd_maps(),
            "threads": self.thread_count(),
        }

    def settled_resources(self, expect: dict[str, int], timeout: float = 2.0) -> dict[str, int]:
        """The resources once they equal ``expect``, or as they are after ``timeout``
        (a joined thread can linger in /proc/PID/task for a moment after join)."""
        deadline = time.monotonic() + timeout
        while (now := self.resources()) != expect and time.monotonic() < deadline:
            time.sleep(0.01)
        return now

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    # --- stopping ------------------------------------------------------------------------
    def _sigterm_and_wait(self, timeout: float) -> bool:
        """SIGTERM (unless it exited) and wait; SIGKILL after ``timeout``. Returns
        whether it exited by itself."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return False
        return True

    def terminate(self, timeout: float | None = None) -> int:
        """SIGTERM and wait; kills it and fails on timeout. Returns the exit status."""
        t = self.launch.stop_timeout if timeout is None else timeout
        if not self._sigterm_and_wait(t):
            raise AssertionError(
                f"{self.label} {self.pid} did not exit within {t}s of "
                f"SIGTERM; log:\n{self.log_text()}"
            )
        return self.proc.returncode

    def stop(self, timeout: float | None = None) -> int:
        """Like :meth:`terminate`, but a daemon that had to be killed is no failure
        (benchmarks); returns the exit status (-9 then)."""
        self._sigterm_and_wait(self.launch.stop_timeout if timeout is None else timeout)
        return self.proc.returncode

    def kill9(self) -> int:
        """SIGKILL and reap it; returns its exit status (-9, unless it had exited)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        return self.proc.wait(10)

    def check_clean_exit(self, timeout: float | None = None) -> None:
        """SIGTERM: exit status 0, no traceback in the log, its socket files removed."""
        rc = self.terminate(timeout)
        log = self.log_text()
        assert rc == 0, f"{self.label} exited with {rc}; log:\n{log}"
        assert "Traceback" not in log, f"traceback in the {self.label} log:\n{log}"
        if self.launch.owns_sockets:
            left = [p for p in self.sockets if os.path.lexists(p)]
            assert not left, f"{self.label} left socket files behind: {left}; log:\n{log}"
        self.checked = True


@contextlib.contextmanager
def borrowed(shared: Daemon) -> Iterator[Daemon]:
    """A view of ``shared`` for one test (its log and disconnect count start now). The
    test must leave the daemon as it found it: running, every connection it made torn
    down, nothing like a traceback logged."""
    view = shared.view()
    yield view
    # Let the daemon finish with this test's connections before the next view starts.
    view.wait_disconnects(view.log_count("front end connected"))
    assert shared.alive(), f"shared daemon exited; log:\n{shared.log_text()}"
    assert "Traceback" not in view.log_text(), view.log_text()


# =========================================================================================
# This project's daemons
# =========================================================================================


def blk_argv(
    command: Sequence[str],
    image: Path,
    *args: str,
    socket_path: Path | None = None,
    listen_fd: int | None = None,
) -> list[str]:
    """``COMMAND (--socket-path S | --fd N) --blk-file IMAGE ARGS``."""
    where = (
        ["--fd", str(listen_fd)] if listen_fd is not None else ["--socket-path", str(socket_path)]
    )
    return [*command, *where, "--blk-file", str(image), *args]


def sockets_argv(command: Sequence[str], sockets: Sequence[Path], *args: str) -> list[str]:
    """``COMMAND --socket-path S1 [--socket-path S2 ...] ARGS`` (net, rng: a device that
    needs nothing but its sockets and its own options)."""
    return [*command, *(a for s in sockets for a in ("--socket-path", str(s))), *args]


def make_image(path: Path, size: int) -> None:
    """A sparse image of ``size`` bytes at ``path``, unless the file exists."""
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size)


def spawn_blk(
    directory: Path,
    name: str,
    *args: str,
    image_size: int | None = IMAGE_SIZE,
    image: Path | None = None,
    socket_path: Path | None = None,
    listen_fd: int | None = None,
    pass_fds: Sequence[int] = (),
    command: Sequence[str] | None = None,
    log_path: Path | None = None,
    client: bool = False,
    **options: Any,
) -> Daemon:
    """Start ``vhost-user-blk`` with ``args`` added, files named after ``name`` in
    ``directory`` (``NAME.sock``, ``NAME.img``, ``NAME.log``). The image is created
    sparse with ``image_size`` bytes unless it exists (``image_size=None``: leave it
    missing). With ``listen_fd`` the daemon gets ``--fd N`` instead of
    ``--socket-path`` (``socket_path`` then names where that socket is bound, for the
    probe; the file is not the daemon's to remove). With ``client`` it gets
    ``--client`` and connects to the socket (a front end's: see :attr:`Launch.client`;
    ready at Ready.CONNECTING unless told). ``command`` replaces the console script;
    ``options`` go to :class:`Launch`."""
    sock = socket_path or directory / f"{name}.sock"
    img = image or directory / f"{name}.img"
    if image_size is not None:
        make_image(img, image_size)
    argv = blk_argv(
        command or device_command("blk"), img, *args, socket_path=sock, listen_fd=listen_fd
    )
    if client:
        argv.append("--client")
        options.setdefault("ready", Ready.CONNECTING)
    inherit = tuple(pass_fds) or (() if listen_fd is None else (listen_fd,))
    launch = Launch(
        tuple(argv),
        (sock,),
        owns_sockets=listen_fd is None and not client,
        image=img,
        pass_fds=inherit,
        client=client,
        **options,
    )
    return launch.start(log_path or directory / f"{name}.log")


def spawn_device(
    device: str,
    directory: Path,
    name: str,
    *args: str,
    ports: int = 1,
    sockets: Sequence[Path] | None = None,
    exec_prefix: Sequence[str] = (),
    command: Sequence[str] | None = None,
    log_path: Path | None = None,
    client: bool = False,
    **options: Any,
) -> Daemon:
    """Start ``DEVICE``'s program with ``ports`` sockets named after ``name`` in
    ``directory`` (``NAME-a.sock``, ``NAME-b.sock``, ...; or ``sockets``) and ``args``
    added; ``exec_prefix`` runs it inside a namespace (``ip netns exec NS``) or pinned
    (``taskset -c N``), both of which exec, so the pid is the daemon's own. ``client``:
    as for :func:`spawn_blk`. ``command`` replaces the console script; ``options`` go
    to :class:`Launch`."""
    socks = (
        list(sockets)
        if sockets is not None
        else [directory / f"{name}-{chr(ord('a') + i)}.sock" for i in range(ports)]
    )
    argv = [*exec_prefix, *sockets_argv(command or device_command(device), socks, *args)]
    if client:
        argv.append("--client")
        options.setdefault("ready", Ready.CONNECTING)
        options.setdefault("owns_sockets", False)
    launch = Launch(tuple(argv), tuple(socks), client=client, **options)
    return launch.start(log_path or directory / f"{name}.log")


def spawn_net(directory: Path, name: str, *args: str, **options: Any) -> Daemon:
    """``vhost-user-net`` (``--tap X`` or ``--switch X`` among ``args``): see
    :func:`spawn_device`."""
    return spawn_device("net", directory, name, *args, **options)


def spawn_rng(directory: Path, name: str, *args: str, **options: Any) -> Daemon:
    """``vhost-user-rng`` (``--source F``, ``--max-bytes-per-second N`` among ``args``):
    see :func:`spawn_device`."""
    return spawn_device("rng", directory, name, *args, **options)


def spawn_blk_for_qemu(
    workdir: Path,
    name: str,
    *args: str,
    image: Path | None = None,
    image_size: int | None = None,
    socket_path: Path | None = None,
    ready: Ready = Ready.FIRST_CONNECTION,
    env: Mapping[str, str] | None = None,
    client: bool = False,
) -> Daemon:
    """``vhost-user-blk --socket-path SOCKET --blk-file IMAGE ARGS`` for a QEMU guest (or
    a benchmark): in its own session, with the longer timeouts of TCG guests, up once
    its connection #1 is logged (see :class:`Ready`). The log goes to
    ``<workdir>/<name>.daemon.log``; ``socket_path`` defaults to ``<workdir>/<name>.sock``
    and ``image`` to ``<workdir>/<name>.img``, created sparse with ``image_size`` bytes
    when that is given and the file is missing. ``client``: ``--client``, connecting to
    a QEMU that listens (``server=on``); Ready.FIRST_CONNECTION then waits for QEMU to
    accept, Ready.CONNECTING only for the first attempt."""
    return spawn_blk(
        workdir,
        name,
        *args,
        image_size=image_size,
        image=image,
        socket_path=socket_path,
        command=available_command("blk"),
        log_path=workdir / f"{name}.daemon.log",
        ready=ready,
        env=env,
        client=client,
        start_new_session=True,
        stop_timeout=QEMU_STOP_TIMEOUT,
        wait_timeout=QEMU_WAIT_TIMEOUT,
    )


def spawn_net_for_qemu(
    ns: NetNs,
    workdir: Path,
    *args: str,
    tap: str | None = None,
    switch: str | None = None,
    ports: int = 1,
) -> Daemon:
    """``vhost-user-net --socket-path SOCK... --tap TAP | --switch NAME ARGS`` inside ``ns``
    (a TAP is opened in the back end's namespace, and the namespace kills it when it
    goes), sockets ``<workdir>/net<i>.sock``, log ``<workdir>/vhost-user-net.log``;
    returns once every socket accepts a connection (closed at once)."""
    command = installed_command("net")
    if command is None or (tap is None) == (switch is None):
        raise ValueError("needs the vhost-user-net command, and one of tap and switch")
    backend = ["--tap", tap] if tap is not None else ["--switch", str(switch)]
    return spawn_net(
        workdir,
        "vhost-user-net",
        *backend,
        *args,
        sockets=[workdir / f"net{i}.sock" for i in range(ports)],
        command=command,
        popen=ns.popen,
        ready=Ready.ACCEPTS,
        start_new_session=True,
        stop_timeout=QEMU_STOP_TIMEOUT,
        wait_timeout=QEMU_WAIT_TIMEOUT,
    )


# =========================================================================================
# Daemons of one test
# =========================================================================================


@dataclass
class DaemonGroup:
    """The daemons one test (or module) started with ``spawner`` (:func:`spawn_blk`,
    :func:`spawn_net`), files in ``directory`` named ``PREFIX0``, ``PREFIX1``, ...;
    ``defaults`` go to every start."""

    spawner: Callable[..., Daemon]
    directory: Path
    prefix: str
    defaults: dict[str, Any] = field(default_factory=dict)
    started: list[Daemon] = field(default_factory=list)

    def start(self, *args: str, name: str | None = None, **options: Any) -> Daemon:
        """Start one with ``args``; the same ``name`` gives the same file names."""
        d = self.spawner(
            self.directory,
            name or f"{self.prefix}{len(self.started)}",
            *args,
            **{**self.defaults, **options},
        )
        self.started.append(d)
        return d

    def stop_all(self) -> list[str]:
        """Stop each daemon still unchecked with :meth:`Daemon.check_clean_exit`, newest
        first (a later daemon may serve an earlier one's socket, which the earlier one
        must not be blamed for); returns what went wrong."""
        errors: list[str] = []
        for d in reversed(self.started):
            if d.checked:
                continue
            try:
                d.check_clean_exit()
            except AssertionError as e:
                errors.append(str(e))
        self.started.clear()
        return errors


@contextlib.contextmanager
def daemons(
    spawner: Callable[..., Daemon], directory: Path, prefix: str, **defaults: Any
) -> Iterator[DaemonGroup]:
    """A :class:`DaemonGroup` for a fixture: yield its ``start``; at the end every
    daemon must exit cleanly, or the test fails with every daemon's complaint."""
    group = DaemonGroup(spawner, directory, prefix, dict(defaults))
    try:
        yield group
    except BaseException:
        group.stop_all()  # the error in flight says more than how the daemons ended
        raise
    errors = group.stop_all()
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)
