"""Boot throw-away QEMU guests (TCG) and collect what their workload prints.

Typical use::

    base = build.build_base_initramfs(cache_dir)
    initrd = build.make_initrd(base, script, tmp_path / "initrd")
    dev = ["-device", "..."]
    with Guest(build.kernel_path(), initrd, dev, log_path=tmp_path / "console.log") as g:
        rc, text = g.run_workload(timeout=120)
    assert rc == 0, text
    res = results(text)

or, in one call, ``rc, text = run_workload(script, extra_args, workdir=tmp_path)``.

The guest's /init prints ``=== WORKLOAD START ===``, runs /workload.sh, prints
``=== WORKLOAD EXIT <rc> ===`` and powers off, which makes QEMU exit
(``-no-reboot``).  Workloads report values as lines ``RESULT key=value``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from . import build

QEMU = "qemu-system-x86_64"
START_MARKER = "=== WORKLOAD START ==="
EXIT_RE = re.compile(r"=== WORKLOAD EXIT (\d+) ===")
RESULT_RE = re.compile(r"^RESULT ([A-Za-z0-9_.:/-]+)=(.*?)\s*$", re.MULTILINE)
TAIL_CHARS = 3000


class GuestError(RuntimeError):
    """The guest/QEMU failed (exited early, bad output)."""


class GuestTimeout(GuestError, TimeoutError):
    """A wait on the guest timed out."""


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def qemu_base_args(
    kernel: Path,
    initrd: Path,
    mem_mb: int = 512,
    shared_mem: bool = True,
    append_extra: str = "",
) -> list[str]:
    """Command line for a quiet, serial-console-only TCG guest.

    With ``shared_mem`` guest RAM is a shared memfd (needed by vhost-user
    back ends, which map guest memory)."""
    append = "console=ttyS0 quiet panic=-1"
    if append_extra:
        append += " " + append_extra
    args = [
        QEMU,
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-m",
        str(mem_mb),
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
    ]
    if shared_mem:
        args += [
            "-object",
            f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
            "-numa",
            "node,memdev=mem",
        ]
    return args


def results(text: str) -> dict[str, str]:
    """Parse ``RESULT key=value`` lines (one key per line; the value is the
    rest of the line, stripped).  A later line overrides an earlier key."""
    return {k: v for k, v in RESULT_RE.findall(text.replace("\r", ""))}


def _tail(text: str, n: int = TAIL_CHARS) -> str:
    return text[-n:]


def console_text(path: Path) -> str:
    """A guest's console log as text so far (CRLF normalised to LF; "" before it exists)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ""
    return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")


class Guest:
    """A QEMU process whose serial console goes to a log file.

    The process starts in the constructor (unless ``start=False``); use as a
    context manager so QEMU is always killed.  QEMU's stderr is merged into the
    same log so its errors show up in diagnostics.
    """

    def __init__(
        self,
        kernel: Path,
        initrd: Path,
        extra_args: Sequence[str] = (),
        *,
        mem_mb: int = 512,
        shared_mem: bool = True,
        append_extra: str = "",
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> None:
        self.args: list[str] = qemu_base_args(kernel, initrd, mem_mb, shared_mem, append_extra)
        self.args += list(extra_args)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="guest-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.path: Path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float = 0.0
        self.exited_at: float | None = None
        # marker -> seconds after start at which wait_for() first saw it
        self.marks: dict[str, float] = {}
        if start:
            self.start()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if self.proc is not None:
            raise GuestError("guest already started")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._proc().pid

    @property
    def returncode(self) -> int | None:
        return self._proc().poll()

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise GuestError("guest not started")
        return self.proc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def elapsed(self) -> float:
        end = self.exited_at if self.exited_at is not None else time.monotonic()
        return end - self.started_at

    def kill(self) -> None:
        """SIGKILL QEMU (if running) and reap it."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
        if self.exited_at is None:
            self.exited_at = time.monotonic()

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    # -- output ------------------------------------------------------------
    def output(self) -> str:
        """Console text so far (CRLF normalised to LF)."""
        return console_text(self.path)

    def _diag(self, what: str) -> str:
        rc = self.proc.poll() if self.proc else None
        state = "running" if rc is None else f"exited rc={rc}"
        return (
            f"{what} (QEMU {state}, {self.elapsed():.1f}s since start, log {self.path})\n"
            f"--- last {TAIL_CHARS} chars of console ---\n{_tail(self.output())}"
        )

    def wait_for(self, marker: str | re.Pattern[str], timeout: float) -> str:
        """Poll the console until ``marker`` (a string or compiled regex)
        appears; returns the whole console text.  Raises GuestTimeout on
        timeout and GuestError if QEMU exits without printing it."""
        deadline = time.monotonic() + timeout
        name = marker if isinstance(marker, str) else marker.pattern
        delay = 0.02
        while True:
            exited = self.proc is not None and self.proc.poll() is not None
            text = self.output()
            found = (marker in text) if isinstance(marker, str) else bool(marker.search(text))
            if found:
                self.marks.setdefault(name, time.monotonic() - self.started_at)
                return text
            if exited:
                if self.exited_at is None:
                    self.exited_at = time.monotonic()
                raise GuestError(self._diag(f"QEMU exited before printing {name!r}"))
            if time.monotonic() >= deadline:
                raise GuestTimeout(
                    self._diag(f"timed out after {timeout:.0f}s waiting for {name!r}")
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit; returns its exit status."""
        p = self._proc()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(self._diag(f"QEMU did not exit within {timeout:.0f}s")) from None
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        return rc

    def run_workload(self, timeout: float = 120.0, exit_timeout: float = 30.0) -> tuple[int, str]:
        """Wait for the workload to finish and QEMU to power off.

        Returns (workload exit code, console text between START and EXIT)."""
        deadline = time.monotonic() + timeout
        try:
            self.wait_for(START_MARKER, timeout)
        except GuestTimeout:
            raise GuestTimeout(
                self._diag(f"guest did not start the workload within {timeout:.0f}s")
            ) from None
        try:
            text = self.wait_for(EXIT_RE, max(0.0, deadline - time.monotonic()))
        except GuestTimeout:
            raise GuestTimeout(
                self._diag(f"workload did not finish within {timeout:.0f}s of QEMU start")
            ) from None
        m = EXIT_RE.search(text)
        assert m is not None
        start = text.index(START_MARKER) + len(START_MARKER)
        body = text[start : m.start()].strip("\n")
        self.wait_exit(exit_timeout)
        return int(m.group(1)), body

    def boot_time(self) -> float | None:
        """Seconds from QEMU start until the START marker was seen (by wait_for)."""
        return self.marks.get(START_MARKER)

    def workload_time(self) -> float | None:
        """Seconds from the START marker to the EXIT marker, as seen by wait_for."""
        s, e = self.marks.get(START_MARKER), self.marks.get(EXIT_RE.pattern)
        return None if s is None or e is None else e - s


def run_workload(
    script: str,
    extra_args: Sequence[str] = (),
    *,
    workdir: Path,
    files: dict[str, bytes] | None = None,
    timeout: float = 120.0,
    mem_mb: int = 512,
    shared_mem: bool = True,
    append_extra: str = "",
    cache_dir: Path | None = None,
    base: Path | None = None,
    kernel: Path | None = None,
) -> tuple[int, str]:
    """Boot a guest that runs ``script``; returns (exit code, console text
    between START and EXIT).  The initrd and console log go into ``workdir``
    (``initrd.img``, ``console.log``)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if base is None:
        base = build.build_base_initramfs(cache_dir or build.default_cache_dir())
    initrd = build.make_initrd(base, script, workdir / "initrd.img", files)
    with Guest(
        kernel or build.kernel_path(),
        initrd,
        extra_args,
        mem_mb=mem_mb,
        shared_mem=shared_mem,
        append_extra=append_extra,
        log_path=workdir / "console.log",
    ) as g:
        return g.run_workload(timeout)
