"""Pieces of the crash test (test_blk_crash.py): a guest console read as it grows,
daemon incarnations started on one socket without a probe, and the record of each
SIGKILL and of how long the guest's I/O took to resume after it.

Boundary: this module starts, kills and watches processes and keeps times; the test
decides what passes.

Why the daemons start with ``Ready.STARTED`` (tests/support/daemon.py), no probe at all:
under a live QEMU with ``reconnect=1`` QEMU may connect first, and a probe connection
would be the daemon's connection #1 of an incarnation that should see QEMU alone. Here
the daemon is started bare, :func:`wait_serving` waits for its "serving" line, and
QEMU's own connection is the proof that it serves.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest import qemu
from tests.support.daemon import Daemon, Ready, spawn_blk_for_qemu

#: one line of the guest's I/O monitor: guest uptime, completed reads and writes of
#: /dev/vda, requests in flight (fields 1, 5 and 9 of /sys/block/vda/stat)
TICK_RE = re.compile(r"^IO (\d+\.\d+) (\d+) (\d+) (\d+)$")
PASS_START_RE = re.compile(r"^FIO PASS (\d+) START$")
PASS_END_RE = re.compile(r"^FIO PASS (\d+) END rc=(\d+)$")
#: a /dev/kmsg record as busybox grep prints it: "prio,seq,usec,flags;text"
KMSG_RE = re.compile(r"^\d+,\d+,\d+,[^;]*;(.*)$")
CONNECTED_RE = re.compile(r"#(\d+): front end connected")
QUEUE_STARTED_RE = re.compile(r"#(\d+)/vq(\d+): started \(size (\d+), base (\d+)\)")
RESUBMITTED_RE = re.compile(r"/vq0: inflight region: (\d+) requests? in flight before")
SERVING = "serving "

#: what a guest kernel must not say about its disk
BAD_DISK_KMSG = (
    "I/O error",
    "not a head",
    "blk_update_request",
    "Call Trace",
    "blocked for more than",
    "BUG:",
    "Oops",
)
#: ... nor, with a NIC, about that
BAD_KMSG = (*BAD_DISK_KMSG, "NETDEV WATCHDOG")


def bad_kmsg(lines: list[str], bad: Sequence[str] = BAD_KMSG) -> list[str]:
    """The guest kernel messages among ``lines`` that name a problem in ``bad``."""
    return [m for m in lines if any(b in m for b in bad)]


@dataclass(frozen=True)
class Tick:
    seen: float  # host monotonic time the line was read
    uptime: float  # guest seconds since boot
    reads: int
    writes: int
    inflight: int

    @property
    def done(self) -> int:
        return self.reads + self.writes


class Console:
    """The guest's serial console, read incrementally; every complete line is kept
    with the host time at which it was first read."""

    def __init__(self, guest: qemu.Guest) -> None:
        self.guest = guest
        self._offset = 0
        self._partial = b""
        self.lines: list[tuple[float, str]] = []
        self.ticks: list[Tick] = []
        self.pass_started = 0  # last "FIO PASS n START"
        self.pass_ended = 0  # last "FIO PASS n END"
        self.pass_rcs: dict[int, int] = {}
        self.exit_rc: int | None = None

    def poll(self) -> None:
        try:
            with open(self.guest.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._offset += len(data)
        now = time.monotonic()
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.lines.append((now, line))
            self._parse(now, line)

    def _parse(self, now: float, line: str) -> None:
        if m := TICK_RE.match(line):
            self.ticks.append(Tick(now, float(m[1]), int(m[2]), int(m[3]), int(m[4])))
        elif m := PASS_START_RE.match(line):
            self.pass_started = int(m[1])
        elif m := PASS_END_RE.match(line):
            self.pass_ended = int(m[1])
            self.pass_rcs[int(m[1])] = int(m[2])
        elif m := qemu.EXIT_RE.search(line):
            self.exit_rc = int(m[1])

    # --- state ---
    def fio_running(self) -> bool:
        return self.pass_started > self.pass_ended

    def failed_pass(self) -> int | None:
        return next((n for n, rc in self.pass_rcs.items() if rc != 0), None)

    def finished(self) -> bool:
        return self.exit_rc is not None

    def last_tick(self) -> Tick | None:
        return self.ticks[-1] if self.ticks else None

    def ticks_between(self, t0: float, t1: float) -> list[Tick]:
        return [t for t in self.ticks if t0 <= t.seen < t1]

    def io_flowing(self, window: float = 0.8) -> bool:
        """Whether completions went up between the last two ticks read within
        ``window`` seconds."""
        now = time.monotonic()
        recent = [t for t in self.ticks[-2:] if now - t.seen <= window]
        return len(recent) == 2 and recent[1].done > recent[0].done

    # --- views ---
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def kmsg(self) -> list[str]:
        return [text for _, text in self.kmsg_seen()]

    def kmsg_seen(self) -> list[tuple[float, str]]:
        """(host time read, text) of each kernel message the guest echoed."""
        return [(seen, m[1]) for seen, line in self.lines if (m := KMSG_RE.match(line))]

    def fio_json(self) -> dict[int, dict[str, object]]:
        """pass -> fio's JSON report (the guest prints each on one line)."""
        out: dict[int, dict[str, object]] = {}
        for _, line in self.lines:
            if line.startswith("FIOJSON "):
                _, n, body = line.split(" ", 2)
                try:
                    out[int(n)] = json.loads(body)
                except ValueError:
                    out[int(n)] = {"unparsable": body[:500]}
        return out

    def fio_stderr(self) -> list[str]:
        return [line for _, line in self.lines if line.startswith("FIOERR ")]

    def fio_pass_problems(self, size: int) -> list[str]:
        """What is wrong with the fio passes the guest ran (none: every pass exited 0
        and reported no error, wrote and read back all ``size`` bytes of its region,
        and fio printed no verify complaint)."""
        problems = [f"pass {n} exited {rc}" for n, rc in sorted(self.pass_rcs.items()) if rc]
        reports = self.fio_json()
        if set(reports) != set(range(1, self.pass_ended + 1)):
            problems.append(f"reports for passes {sorted(reports)}; {self.pass_ended} ended")
        for n, rep in sorted(reports.items()):
            jobs = rep.get("jobs")
            if not isinstance(jobs, list) or not jobs:
                problems.append(f"pass {n}: no fio report")
                continue
            job = jobs[0]
            if job["error"] != 0:
                problems.append(f"pass {n}: fio error {job['error']}")
            for kind in ("write", "read"):  # every block written was read back and verified
                if job[kind]["io_bytes"] != size:
                    problems.append(f"pass {n}: {kind} {job[kind]['io_bytes']} of {size} bytes")
        complaints = ("verify", "crc")
        problems += [ln for ln in self.fio_stderr() if any(w in ln.lower() for w in complaints)]
        return problems

    def section(self, name: str) -> list[str]:
        """Lines between ``=== NAME BEGIN ===`` and ``=== NAME END ===``."""
        begin, end = f"=== {name} BEGIN ===", f"=== {name} END ==="
        out: list[str] = []
        inside = False
        for _, line in self.lines:
            if line == begin:
                inside = True
            elif line == end:
                inside = False
            elif inside:
                out.append(line)
        return out

    def tail(self, n: int = 60, ticks: int = 8) -> str:
        """The last ``n`` lines other than monitor ticks and fio JSON, then the last
        ``ticks`` ticks (the I/O monitor would otherwise fill any tail)."""
        other = [
            line
            for _, line in self.lines
            if not TICK_RE.match(line) and not line.startswith("FIOJSON ")
        ]
        last = [f"{t.seen:.2f} {t}" for t in self.ticks[-ticks:]]
        return "\n".join([*other[-n:], "--- last I/O monitor ticks (host time) ---", *last])


@dataclass
class Incarnation:
    """One run of the daemon on the shared socket; ``n`` counts from 0."""

    n: int
    daemon: Daemon
    started: float
    connected: float | None = None
    queue_started: float | None = None
    queue_base: int | None = None
    resubmitted: int | None = None  # requests found in flight in the inflight region

    def log_text(self) -> str:
        return self.daemon.log_text()


def start_incarnation(
    workdir: Path,
    n: int,
    socket_path: Path,
    image: Path,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> Incarnation:
    """Start ``vhost-user-blk --socket-path S --blk-file I ARGS`` without probing it
    (see the module docstring), with ``env`` added to the environment; its log goes
    to ``<workdir>/crash<n>.daemon.log``."""
    d = spawn_blk_for_qemu(
        workdir,
        f"crash{n}",
        *args,
        image=image,
        socket_path=socket_path,
        ready=Ready.STARTED,
        env=env,
    )
    return Incarnation(n, d, time.monotonic())


# An LD_PRELOAD shim that makes each preadv/pwritev of the daemon sleep first.  With a
# page-cached image a request takes microseconds and the TCG guest is the bottleneck,
# so a SIGKILL almost never finds a request taken from the ring and not yet used (40
# kills, none did).  Slowed down, the daemon becomes the bottleneck and always has a
# batch in progress: the kills then land between pop and push, where the inflight
# region matters.
IO_DELAY_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <time.h>

static void io_delay(void)
{
    static long ns = -1;
    if (ns < 0) {
        const char *s = getenv("VHOST_CRASH_IO_DELAY_US");
        ns = s ? atol(s) * 1000L : 0;
    }
    if (ns > 0) {
        struct timespec ts = { ns / 1000000000L, ns % 1000000000L };
        nanosleep(&ts, NULL);
    }
}

ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t off)
{
    static ssize_t (*real)(int, const struct iovec *, int, off_t);
    if (!real)
        real = (ssize_t (*)(int, const struct iovec *, int, off_t))dlsym(RTLD_NEXT, "preadv");
    io_delay();
    return real(fd, iov, cnt, off);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    static ssize_t (*real)(int, const struct iovec *, int, off_t);
    if (!real)
        real = (ssize_t (*)(int, const struct iovec *, int, off_t))dlsym(RTLD_NEXT, "pwritev");
    io_delay();
    return real(fd, iov, cnt, off);
}
"""


def io_delay_env(workdir: Path, delay_us: int) -> dict[str, str]:
    """Environment that slows the daemon's every preadv/pwritev by ``delay_us``
    (the shim is compiled into ``workdir``); empty for 0."""
    if delay_us <= 0:
        return {}
    src = workdir / "io_delay.c"
    lib = workdir / "io_delay.so"
    src.write_text(IO_DELAY_SHIM)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler for the I/O delay shim")
    subprocess.run(
        [cc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"],
        check=True,
        capture_output=True,
    )
    return {"LD_PRELOAD": str(lib), "VHOST_CRASH_IO_DELAY_US": str(delay_us)}


def wait_serving(inc: Incarnation, timeout: float) -> None:
    """Wait until the daemon logged that it listens."""
    inc.daemon.wait_log(SERVING, 1, timeout)


def poll_connection(inc: Incarnation) -> None:
    """Note when QEMU's connection (#1: nothing else connects) and queue 0 started."""
    now = time.monotonic()
    text = inc.log_text()
    if inc.connected is None and CONNECTED_RE.search(text):
        inc.connected = now
    if inc.queue_started is None and (m := QUEUE_STARTED_RE.search(text)):
        inc.queue_started = now
        inc.queue_base = int(m[4])
        # logged before "started" when the inflight region held requests
        r = RESUBMITTED_RE.search(text)
        inc.resubmitted = int(r[1]) if r else 0


def socket_state(path: Path) -> str:
    """``missing``, ``stale`` (file there, nobody listening) or ``live``."""
    if not path.exists():
        return "missing"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(str(path))
    except ConnectionRefusedError:
        return "stale"
    except OSError as e:
        return f"error {e.strerror}"
    finally:
        s.close()
    return "live"


@dataclass
class KillRecord:
    """One SIGKILL and what followed; times are seconds after the first fio pass
    started (``t_*``) or after the kill (``*_after``)."""

    index: int
    t_kill: float
    fio_pass: int
    delay: float
    exit_status: int | None = None
    socket_after_kill: str = ""
    done_at_kill: int | None = None  # completions the guest had counted (last tick)
    inflight_stalled: list[int] = field(default_factory=list)  # in_flight while down
    restart_after: float | None = None
    connected_after: float | None = None
    queue_base: int | None = None
    queue_started_after: float | None = None
    resubmitted: int | None = None
    resumed_after: float | None = None

    def row(self) -> str:
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:6.2f}"

        stalled = sorted(set(self.inflight_stalled))
        return (
            f"kill {self.index:2d} at {self.t_kill:7.2f}s (pass {self.fio_pass}, "
            f"delay {self.delay:.2f}s): status {self.exit_status}, socket "
            f"{self.socket_after_kill}, done {self.done_at_kill}, in flight while down "
            f"{stalled}; restart +{f(self.restart_after)} connected +{f(self.connected_after)}"
            f" vq0 base {self.queue_base} started +{f(self.queue_started_after)}"
            f" resubmitted {self.resubmitted}"
            f" I/O resumed +{f(self.resumed_after)}"
        )
