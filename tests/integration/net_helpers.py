"""The ``vhost-user-net`` daemon as a subprocess, for the socket tests.

:func:`spawn_net_daemon` starts ``vhost-user-net`` (optionally inside a namespace, with
``ip netns exec``) and waits until every socket has accepted (and dropped) a probe
connection; :class:`NetDaemon` reads its log and its CPU time from /proc. The virtio-net
driver and the frames are in :mod:`tests.support.net`.

Boundary: no assertions about the daemon's behaviour here; the tests make those.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

NET_DAEMON = Path(sys.executable).with_name("vhost-user-net")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0



def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "pid (comm)": state is field 3, utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class NetDaemon:
    """A running ``vhost-user-net``; stderr (its log) goes to ``log_path``."""

    sockets: list[Path]
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    #: check_clean_exit() already passed (a test stopped it itself)
    checked: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket_path(self) -> Path:
        return self.sockets[0]

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def log_lines(self, needle: str) -> list[str]:
        return [ln for ln in self.log_text().splitlines() if needle in ln]

    def wait_log(self, needle: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        """Wait until ``count`` log lines contain ``needle``; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(needle)
            if len(lines) >= count:
                return lines
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise AssertionError(f"expected {count} log line(s) with {needle!r}, got "
                                     f"{len(lines)}; log:\n{self.log_text()}")
            time.sleep(0.01)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; kills (and fails) on timeout. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"vhost-user-net {self.pid} ignored SIGTERM for {timeout}s; "
                                 f"log:\n{self.log_text()}") from None

    def check_clean_exit(self) -> None:
        """SIGTERM: exit 0, no traceback in the log, every socket file removed."""
        rc = self.terminate()
        log = self.log_text()
        assert rc == 0, f"vhost-user-net exited with {rc}; log:\n{log}"
        assert "Traceback" not in log, f"traceback in the vhost-user-net log:\n{log}"
        left = [p for p in self.sockets if p.exists()]
        assert not left, f"socket files left behind: {left}"
        self.checked = True


def net_daemon_argv(sockets: Sequence[Path], *args: str) -> list[str]:
    return [str(NET_DAEMON), *(a for s in sockets for a in ("--socket-path", str(s))), *args]


def _probe(d: NetDaemon, deadline: float) -> None:
    """Wait until each socket accepts (the daemon's loop runs, its signal handlers are in
    place), hang up, and wait for the daemon to log each disconnect."""
    for n, path in enumerate(d.sockets, 1):
        while True:
            if d.proc.poll() is not None:
                raise AssertionError(f"vhost-user-net exited with {d.proc.returncode} at "
                                     f"startup; log:\n{d.log_text()}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
                try:
                    s.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} never accepted; log:\n{d.log_text()}")
            time.sleep(0.01)
        d.wait_log("disconnected:", n, max(0.1, deadline - time.monotonic()))


def spawn_net_daemon(directory: Path, name: str, *args: str, ports: int = 1,
                     exec_prefix: Sequence[str] = (), probe: bool = True) -> NetDaemon:
    """Start ``vhost-user-net`` with ``ports`` sockets named after ``name`` in
    ``directory`` and ``args`` added (``--tap X`` or ``--switch X`` among them);
    ``exec_prefix`` runs it inside a namespace (``ip netns exec NS``, which execs, so the
    pid is the daemon's own)."""
    sockets = [directory / f"{name}-{chr(ord('a') + i)}.sock" for i in range(ports)]
    log_path = directory / f"{name}.log"
    argv = [*exec_prefix, *net_daemon_argv(sockets, *args)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    d = NetDaemon(sockets, proc, log_path, argv)
    if probe:
        try:
            _probe(d, time.monotonic() + START_TIMEOUT)
        except BaseException:
            d.proc.kill()
            d.proc.wait()
            raise
    return d


class DaemonGroup:
    """The daemons one test started (files in ``directory``, run under ``exec_prefix``);
    :meth:`stop_all` stops each cleanly and returns what went wrong."""

    def __init__(self, directory: Path, exec_prefix: Sequence[str] = (),
                 prefix: str = "net") -> None:
        self.directory = directory
        self.exec_prefix = list(exec_prefix)
        self.prefix = prefix
        self.started: list[NetDaemon] = []

    def start(self, *args: str, ports: int = 1, name: str | None = None,
              probe: bool = True) -> NetDaemon:
        """``vhost-user-net`` with ``ports`` sockets and ``args``; the same ``name``
        gives the same socket paths."""
        d = spawn_net_daemon(self.directory, name or f"{self.prefix}{len(self.started)}",
                             *args, ports=ports, exec_prefix=self.exec_prefix, probe=probe)
        self.started.append(d)
        return d

    def stop_all(self) -> list[str]:
        errors = []
        for d in self.started:
            if d.checked:
                continue
            try:
                d.check_clean_exit()
            except AssertionError as e:
                errors.append(str(e))
        self.started.clear()
        return errors
