"""The pieces the real-QEMU tests put together: the ``vhost-user-blk`` daemon as a
subprocess, and QEMU guests attached to it through ``vhost-user-blk-pci``.

Boundary: no assertions about virtio-blk behaviour here (the tests make those);
what is checked here is the daemon's lifecycle contract -- it starts, accepts a
connection, and on SIGTERM exits 0 with no traceback and removes its socket.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.guest import build, qemu

START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0

# Host binaries for the guest image (when present on the host): e2fsprogs' mke2fs as
# mkfs.ext4 (real journalled ext4), and util-linux blkdiscard for ``-z`` (BLKZEROOUT,
# i.e. VIRTIO_BLK_T_WRITE_ZEROES), kept off PATH so busybox's blkdiscard stays the
# default.  No fio: it makes the image 15x bigger and each boot ~2.5 s slower.
UL_BLKDISCARD = "/usr/libexec/ul/blkdiscard"
GUEST_BINARIES: tuple[tuple[str, str], ...] = (
    ("/sbin/mke2fs", "/usr/sbin/mkfs.ext4"),
    ("/usr/sbin/blkdiscard", UL_BLKDISCARD),
)

#: the ``blk_daemon`` fixture: ``start(*args, image=None, image_size=None, socket_path=None)``
StartDaemon = Callable[..., "BlkDaemon"]
#: the ``guests`` fixture: ``boot(script, extra_args, *, name="guest", files=None)``
BootGuest = Callable[..., qemu.Guest]

needs_qemu = pytest.mark.skipif(
    not qemu.qemu_available() or not list(Path("/boot").glob("vmlinuz-*")),
    reason="needs qemu-system-x86_64 and a guest kernel in /boot",
)


def daemon_command() -> list[str]:
    """The installed ``vhost-user-blk`` next to this Python, else ``python -m vhost blk``."""
    script = Path(sys.executable).with_name("vhost-user-blk")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vhost", "blk"]


def guest_binaries() -> list[tuple[str, str]]:
    return [(h, g) for h, g in GUEST_BINARIES if Path(h).exists()]


@dataclass
class BlkDaemon:
    """A running ``vhost-user-blk``; its stderr (the log) goes to ``log_path``."""

    socket_path: Path
    image_path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def name(self) -> str:
        """The connection-name prefix in log lines (``<socket basename>#<n>``)."""
        return self.socket_path.name

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self, needle: str | re.Pattern[str]) -> list[str]:
        return [
            ln
            for ln in self.log_text().splitlines()
            if (needle.search(ln) if isinstance(needle, re.Pattern) else needle in ln)
        ]

    def wait_log(
        self, needle: str | re.Pattern[str], count: int = 1, timeout: float = 10.0
    ) -> list[str]:
        """Wait until ``count`` log lines contain ``needle``; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(needle)
            if len(lines) >= count:
                return lines
            if time.monotonic() >= deadline or not self.alive():
                raise AssertionError(
                    f"expected {count} daemon log line(s) with {needle!r}, got {len(lines)} "
                    f"(daemon {'running' if self.alive() else 'exited'}); log:\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.02)

    def wait_disconnect(self, conn: int, timeout: float = 10.0) -> str:
        """Wait for connection number ``conn`` (1 = the start-up probe) to be torn down."""
        return self.wait_log(f"{self.name}#{conn}: disconnected:", 1, timeout)[0]

    def qemu_args(self, num_queues: int = 1, chardev_opts: str = "") -> list[str]:
        """QEMU options attaching a vhost-user-blk-pci device to this daemon."""
        return [
            "-chardev",
            f"socket,id=vub0,path={self.socket_path}{chardev_opts}",
            "-device",
            f"vhost-user-blk-pci,chardev=vub0,num-queues={num_queues}",
        ]

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL (and fail) on timeout.  Returns the exit status."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon {self.pid} did not exit within {timeout}s of SIGTERM; log:\n"
                f"{self.log_text()}"
            ) from None

    def check_clean_exit(self) -> None:
        """SIGTERM: exit status 0, no traceback logged, socket removed."""
        rc = self.terminate()
        log = self.log_text()
        assert rc == 0, f"daemon exited with {rc}; log:\n{log}"
        assert "Traceback" not in log, f"traceback in the daemon log:\n{log}"
        assert not self.socket_path.exists(), f"daemon left {self.socket_path} behind"


def start_daemon(
    workdir: Path,
    name: str,
    args: Sequence[str] = (),
    *,
    image: Path | None = None,
    image_size: int | None = None,
    socket_path: Path | None = None,
) -> BlkDaemon:
    """Start ``vhost-user-blk --socket-path SOCKET --blk-file IMAGE ARGS``; the log
    goes to ``<workdir>/<name>.daemon.log``.

    ``socket_path`` defaults to ``<workdir>/<name>.sock`` and ``image`` to
    ``<workdir>/<name>.img``; the image is created sparse with ``image_size`` bytes
    when that is given and the file is missing.  Returns once the daemon has
    accepted a probe connection (its connection #1) and logged its teardown, i.e.
    its event loop and signal handlers are up."""
    sock = socket_path or workdir / f"{name}.sock"
    img = image or workdir / f"{name}.img"
    if image_size is not None and not img.exists():
        with open(img, "wb") as f:
            f.truncate(image_size)
    log_path = workdir / f"{name}.daemon.log"
    argv = [*daemon_command(), "--socket-path", str(sock), "--blk-file", str(img), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    d = BlkDaemon(sock, img, proc, log_path, argv)
    try:
        _probe(d, time.monotonic() + START_TIMEOUT)
    except BaseException:
        if d.alive():
            d.proc.kill()
            d.proc.wait()
        raise
    return d


def _probe(d: BlkDaemon, deadline: float) -> None:
    while True:
        if not d.alive():
            raise AssertionError(
                f"daemon exited with {d.proc.returncode} at start-up; log:\n{d.log_text()}"
            )
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(d.socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"daemon socket {d.socket_path} never accepted; log:\n{d.log_text()}"
                ) from None
            time.sleep(0.02)
            continue
        finally:
            s.close()
        break
    # The first accepted connection means the loop (and its signal handlers) is up. It
    # is usually the probe, but a QEMU reconnecting to a restarted daemon can win the
    # race; the probe then waits in the backlog, and waiting for its teardown would hang.
    d.wait_log(f"{d.name}#1: front end connected", 1, max(0.5, deadline - time.monotonic()))


def boot_guest(
    base: Path,
    script: str,
    workdir: Path,
    name: str,
    extra_args: Sequence[str],
    *,
    files: dict[str, bytes] | None = None,
    mem_mb: int = 512,
) -> qemu.Guest:
    """Start (not wait for) a TCG guest with shared memory running ``script``;
    initrd and console log are ``<workdir>/<name>.initrd`` / ``.console.log``."""
    initrd = build.make_initrd(base, script, workdir / f"{name}.initrd", files)
    return qemu.Guest(
        build.kernel_path(),
        initrd,
        extra_args,
        mem_mb=mem_mb,
        shared_mem=True,
        log_path=workdir / f"{name}.console.log",
    )
