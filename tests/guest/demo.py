"""The first run: a QEMU guest (TCG) writes to a disk that our vhost-user-blk serves, and
both sides check the bytes. ``scripts/try`` and ``scripts/run-daemon --demo`` run it
(``python3 -m tests.guest.demo [--workdir DIR] [--no-setup]``).

The demo, in order, one line on the terminal per step (everything else goes to files in
the work directory, ``var/demo/`` by default):

1. ``scripts/setup`` (Debian packages, hugepages, the project installed) -> setup.log;
2. the guest: Debian's kernel and a busybox initramfs with the virtio-blk and ext4
   modules only (tests/guest/build.py, cached between runs), plus the workload below;
3. ``vhost-user-blk`` on a fresh sparse 1 GiB image, disk.img -> daemon.log;
4. QEMU under TCG attached to it (``vhost-user-blk-pci``; guest RAM is a shared memfd)
   -> console.log (the command is in qemu-command.txt). The guest writes a known 64 MiB
   pattern to /dev/vda in 1 MiB O_DIRECT writes and a flush, reads it back the same way,
   checks both checksums, and powers off;
5. SIGTERM to the daemon: it must exit 0 and remove its socket;
6. on the host: the image must hold the pattern where the guest wrote it, and nothing
   anywhere else.

The exit status is 0 only if every step passed. A lock on the work directory keeps two
demos from sharing one image.

``python3 -m tests.guest.demo qemu-line SOCKET`` prints the complete QEMU command that
scripts/run-daemon shows: a guest with a busybox shell on the disk served on SOCKET (its
initrd is built into ``var/guest/``).

Boundary: this module starts, watches and stops the demo's processes and judges what the
guest reported; it imports only the standard library and tests/guest, since it runs
before scripts/setup has installed anything.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from . import build, qemu

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

#: what the demo's guests load: the virtio PCI transport and virtio-blk, and ext4 (with
#: its crc32c: see /work/shared/FACTS.md) for the shell guest; dependencies come first
#: automatically. Fewer modules than the tests' image: the guest boots faster.
MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "libcrc32c",
    "ext4",
)

IMAGE_SIZE = 1 << 30
#: the known pattern: PATTERN_MIB distinct pseudo-random MiBs, repeated COPIES times
PATTERN_MIB = 4
COPIES = 16
WRITE_MIB = PATTERN_MIB * COPIES
GUEST_MEM_MB = 512
SOCKET_NAME = "vhost-user-blk.sock"
#: hang guards, far above what each step takes here (the whole demo: ~30 s)
SETUP_TIMEOUT = 600.0
DAEMON_START_TIMEOUT = 20.0
GUEST_TIMEOUT = 120.0
DAEMON_STOP_TIMEOUT = 20.0

WORKLOAD = r"""
fail() { echo "FAIL: $*"; exit 1; }
cs() { awk '{ printf "%d", $1 * 100 }' /proc/uptime; }      # guest uptime, 1/100 s
written() { set -- $(cat /sys/block/vda/stat); echo "$7"; }  # sectors written so far
DEV=/dev/vda
[ -b $DEV ] || fail "no /dev/vda: the virtio-blk device did not appear"
echo "RESULT dev_size=$(blockdev --getsize64 $DEV)"
echo "RESULT uptime_cs=$(cs)"
n=0
while [ $n -lt @COPIES@ ]; do cat /demo/pattern; n=$((n + 1)); done > /tmp/src
w0=$(written)
t0=$(cs)
dd if=/tmp/src of=$DEV bs=1M oflag=direct conv=fsync 2>/tmp/dd.err \
    || { cat /tmp/dd.err; fail "writing $DEV"; }
t1=$(cs)
w1=$(written)
dd if=$DEV of=/tmp/back bs=1M count=@MIB@ iflag=direct 2>/tmp/dd.err \
    || { cat /tmp/dd.err; fail "reading $DEV"; }
t2=$(cs)
echo "RESULT written_bytes=$(( (w1 - w0) * 512 ))"
echo "RESULT write_cs=$((t1 - t0))"
echo "RESULT read_cs=$((t2 - t1))"
echo "RESULT src_md5=$(md5sum < /tmp/src | cut -d' ' -f1)"
echo "RESULT back_md5=$(md5sum < /tmp/back | cut -d' ' -f1)"
echo "RESULT done=1"
"""

SHELL_WORKLOAD = r"""
echo
echo "A busybox shell in the guest. /dev/vda is the disk vhost-user-blk serves"
echo "($(blockdev --getsize64 /dev/vda) bytes). Try:"
echo "    dd if=/dev/vda bs=1M count=16 iflag=direct | md5sum"
echo "    mke2fs -t ext4 /dev/vda && mount /dev/vda /mnt    (this erases the disk)"
echo "'exit' powers the guest off (Ctrl-A x quits QEMU at once)."
setsid cttyhack sh
"""


def pattern() -> bytes:
    """The known pattern the guest writes once (COPIES times over): seeded, so the host
    knows every byte without asking the guest."""
    return random.Random(0x7E57).randbytes(PATTERN_MIB * MiB)


class StepFailed(Exception):
    """A demo step failed: what went wrong, and the log that tells more."""

    def __init__(self, detail: str, log: Path | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.log = log


def _rel(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (shorter lines)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}" if n % scale == 0 else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def _rate(nbytes: int, centiseconds: int) -> str:
    if centiseconds <= 0:  # faster than the guest's clock shows
        return f"over {nbytes / 0.01 / 1e6:.0f} MB/s"
    return f"{nbytes / (centiseconds / 100) / 1e6:.0f} MB/s"


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(f"    | {line}" for line in text.rstrip("\n").splitlines()[-lines:])


class Demo:
    """One run of the demo in ``workdir``: each step prints its line or raises
    :class:`StepFailed`; :meth:`close` ends whatever is still running."""

    def __init__(self, workdir: Path, *, setup: bool = True) -> None:
        self.workdir = workdir
        self.setup = setup
        self.image = workdir / "disk.img"
        self.socket = workdir / SOCKET_NAME
        self.daemon_log = workdir / "daemon.log"
        self.console_log = workdir / "console.log"
        self.setup_log = workdir / "setup.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.guest: qemu.Guest | None = None
        self.started = time.monotonic()
        #: the step under way (named on the FAIL line)
        self.step = ""

    # --- output --------------------------------------------------------------------------
    @staticmethod
    def say(step: str, detail: str, ok: bool = True) -> None:
        print(f"  {step:<11}{'ok' if ok else 'FAIL':<6}{detail}", flush=True)

    # --- the steps -----------------------------------------------------------------------
    def run_setup(self) -> None:
        if not self.setup:
            self.say("set-up", "skipped (--no-setup)")
            return
        t = time.monotonic()
        with open(self.setup_log, "wb") as log:
            try:
                r = subprocess.run(
                    [str(REPO / "scripts" / "setup")],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=SETUP_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                raise StepFailed(
                    f"scripts/setup ran over {SETUP_TIMEOUT:.0f} s", self.setup_log
                ) from None
        if r.returncode != 0:
            raise StepFailed(f"scripts/setup exited with {r.returncode}", self.setup_log)
        self.say(
            "set-up",
            f"scripts/setup: packages, hugepages, the project ({time.monotonic() - t:.1f} s)",
        )

    def build_guest(self) -> tuple[Path, Path]:
        t, wall = time.monotonic(), time.time()
        try:
            kernel = build.kernel_path()
            base = build.build_base_initramfs(build.default_cache_dir(), MODULES, binaries=())
        except (build.BuildError, OSError, subprocess.CalledProcessError) as e:
            raise StepFailed(f"cannot build the guest: {e}") from None
        script = WORKLOAD.replace("@COPIES@", str(COPIES)).replace("@MIB@", str(WRITE_MIB))
        initrd = build.make_initrd(
            base, script, self.workdir / "initrd.img", {"/demo/pattern": pattern()}
        )
        made = (
            f"built in {time.monotonic() - t:.1f} s" if base.stat().st_mtime >= wall else "cached"
        )
        self.say(
            "guest",
            f"Debian kernel {build.kernel_version(kernel)} and a busybox initramfs ({made})",
        )
        return kernel, initrd

    def start_daemon(self) -> None:
        self.image.unlink(missing_ok=True)  # a fresh, sparse disk every run
        self.socket.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "vhost",
            "blk",
            "--socket-path",
            str(self.socket),
            "--blk-file",
            str(self.image),
            "--size",
            str(IMAGE_SIZE),
        ]
        with open(self.daemon_log, "wb") as log:
            self.daemon = subprocess.Popen(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while not _listening(self.socket):
            if self.daemon.poll() is not None:
                raise StepFailed(
                    f"vhost-user-blk exited with {self.daemon.returncode} at start-up",
                    self.daemon_log,
                )
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"vhost-user-blk did not listen on {self.socket} within "
                    f"{DAEMON_START_TIMEOUT:.0f} s",
                    self.daemon_log,
                )
            time.sleep(0.05)
        self.say(
            "daemon",
            f"vhost-user-blk serves {_rel(self.image)} ({_size(IMAGE_SIZE)}, sparse) "
            f"on {_rel(self.socket)}",
        )

    def run_guest(self, kernel: Path, initrd: Path) -> dict[str, str]:
        attach = qemu_attach_args(self.socket)
        self.guest = qemu.Guest(
            kernel, initrd, attach, mem_mb=GUEST_MEM_MB, log_path=self.console_log, start=False
        )
        (self.workdir / "qemu-command.txt").write_text(shlex.join(self.guest.args) + "\n")
        try:
            self.guest.start()
        except OSError as e:
            raise StepFailed(f"cannot start {qemu.QEMU}: {e}") from None
        try:
            rc, text = self.guest.run_workload(timeout=GUEST_TIMEOUT)
        except qemu.GuestError as e:
            first = str(e).splitlines()[0]
            raise StepFailed(f"the guest: {first}", self.console_log) from None
        res = qemu.results(text)
        if rc != 0 or res.get("done") != "1":
            fail = [line for line in text.splitlines() if line.startswith("FAIL")]
            raise StepFailed(
                f"the guest's workload failed (exit {rc}): {'; '.join(fail) or 'see its console'}",
                self.console_log,
            )
        boot = self.guest.boot_time()
        self.say(
            "boot",
            f"QEMU (TCG) booted the guest in {boot or 0:.1f} s; /dev/vda is "
            f"{_size(int(res['dev_size']))} (vhost-user-blk-pci)",
        )
        return res

    def check_guest(self, res: dict[str, str]) -> str:
        want = hashlib.md5(pattern() * COPIES).hexdigest()
        nbytes = WRITE_MIB * MiB
        if int(res["dev_size"]) != IMAGE_SIZE:
            raise StepFailed(f"/dev/vda is {res['dev_size']} bytes, not {IMAGE_SIZE}")
        if res["src_md5"] != want:
            raise StepFailed(f"the guest's pattern has md5 {res['src_md5']}, not {want}")
        written = int(res["written_bytes"])
        if written != nbytes:
            raise StepFailed(f"the device counted {written} bytes written, not {nbytes}")
        self.say(
            "write",
            f"{_size(nbytes)} of a known pattern, 1 MiB O_DIRECT writes and a flush: "
            f"{_rate(nbytes, int(res['write_cs']))}",
        )
        if res["back_md5"] != want:
            raise StepFailed(f"read back md5 {res['back_md5']}, written {want}")
        self.say(
            "read back",
            f"{_size(nbytes)}: {_rate(nbytes, int(res['read_cs']))}; "
            f"md5 {want[:12]} matches what was written",
        )
        self.say("shut down", "the guest powered off and QEMU exited")
        return want

    def stop_daemon(self) -> None:
        d = self.daemon
        assert d is not None
        d.send_signal(signal.SIGTERM)
        try:
            rc = d.wait(DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise StepFailed(
                f"vhost-user-blk still ran {DAEMON_STOP_TIMEOUT:.0f} s after SIGTERM",
                self.daemon_log,
            ) from None
        self.daemon = None
        if rc != 0:
            raise StepFailed(f"vhost-user-blk exited with {rc} on SIGTERM", self.daemon_log)
        if self.socket.exists():
            raise StepFailed(f"vhost-user-blk left its socket {self.socket}", self.daemon_log)
        if "Traceback" in self.daemon_log.read_text(errors="replace"):
            raise StepFailed("vhost-user-blk logged a traceback", self.daemon_log)
        served = _daemon_counters(self.daemon_log.read_text(errors="replace"))
        self.say(
            "stop",
            "vhost-user-blk exited 0 on SIGTERM, socket removed"
            + (f"; it served {served}" if served else ""),
        )

    def check_image(self, md5: str) -> None:
        nbytes = WRITE_MIB * MiB
        with open(self.image, "rb") as f:
            head = f.read(nbytes)
            size = os.fstat(f.fileno()).st_size
            allocated = os.fstat(f.fileno()).st_blocks * 512
            if hashlib.md5(head).hexdigest() != md5:
                raise StepFailed(f"{self.image}: the first {_size(nbytes)} differ from the guest's")
            try:
                data_after = os.lseek(f.fileno(), nbytes, os.SEEK_DATA) < size
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data_after = False
        if size != IMAGE_SIZE:
            raise StepFailed(f"{self.image} is {size} bytes, not {IMAGE_SIZE}")
        if data_after:
            raise StepFailed(f"{self.image} holds data past the guest's {_size(nbytes)}")
        self.say(
            "image",
            f"{_rel(self.image)}: the guest's {_size(nbytes)} at offset 0 (md5 {md5[:12]}), "
            f"the rest a hole ({_size(allocated)} allocated)",
        )

    def run(self) -> None:
        for old in (self.setup_log, self.daemon_log, self.console_log):
            old.unlink(missing_ok=True)
        print("vhost-py demo: a QEMU guest writes to a disk served by vhost-user-blk", flush=True)
        self.step = "set-up"
        self.run_setup()
        self.step = "guest"
        kernel, initrd = self.build_guest()
        self.step = "daemon"
        self.start_daemon()
        self.step = "boot"
        res = self.run_guest(kernel, initrd)
        self.step = "write"
        md5 = self.check_guest(res)
        self.step = "stop"
        self.stop_daemon()
        self.step = "image"
        self.check_image(md5)

    def close(self) -> None:
        """Kill QEMU, then the daemon, if either still runs (after a failed step)."""
        if self.guest is not None:
            self.guest.kill()
        d, self.daemon = self.daemon, None
        if d is not None and d.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                d.send_signal(signal.SIGTERM)
            try:
                d.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


#: the daemon's per-connection summary (vhost/session.py logs it at disconnect)
_COUNTERS_RE = re.compile(r"counters since start: (.*)$", re.MULTILINE)


def _daemon_counters(log: str) -> str:
    """What the daemon's log says it served (its requests and bytes), in a few words; ""
    when the log has no such line (only shown, never judged: the log is not an API)."""
    m = _COUNTERS_RE.search(log)
    if not m:
        return ""
    counts = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
    one = {"writes": "write", "flushes": "flush", "reads": "read"}
    return ", ".join(f"{counts[k]} {one[k] if counts[k] == '1' else k}" for k in one if k in counts)


def _listening(path: Path) -> bool:
    """Whether a unix socket listens on ``path`` (from /proc/net/unix: no connection is
    made, so the daemon's connection #1 is QEMU's)."""
    want = str(path)
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            # Flags 00010000 is __SO_ACCEPTCON: a listening socket
            if len(fields) >= 8 and fields[7] == want and fields[3] == "00010000":
                return True
    return False


@contextlib.contextmanager
def _locked(workdir: Path) -> Iterator[None]:
    with open(workdir / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"demo: another demo runs in {workdir}")
        yield


def qemu_attach_args(socket_path: Path) -> list[str]:
    """The QEMU options that attach a guest to the vhost-user-blk daemon on ``socket_path``."""
    return [
        "-chardev",
        f"socket,id=vub0,path={socket_path},reconnect=1",
        "-device",
        "vhost-user-blk-pci,chardev=vub0,num-queues=1",
    ]


def shell_guest_command(socket_path: Path, guest_dir: Path) -> list[str]:
    """The complete QEMU command for a guest with a busybox shell on the serial console
    (``-serial mon:stdio``: Ctrl-A x quits) and the disk served on ``socket_path``; its
    initrd is built into ``guest_dir``."""
    guest_dir.mkdir(parents=True, exist_ok=True)
    base = build.build_base_initramfs(build.default_cache_dir(), MODULES, binaries=())
    initrd = build.make_initrd(base, SHELL_WORKLOAD, guest_dir / "shell.initrd")
    args = qemu.qemu_base_args(build.kernel_path(), initrd, GUEST_MEM_MB)
    args[args.index("-serial") + 1] = "mon:stdio"
    return args + qemu_attach_args(socket_path)


def format_command(args: Sequence[str], indent: str = "  ", width: int = 92) -> str:
    """``args`` as a shell command to paste: each option with its value, wrapped with
    backslashes before ``width`` columns."""
    words = [shlex.quote(a) for a in args]
    groups: list[str] = [words[0]]
    i = 1
    while i < len(words):
        if words[i].startswith("-") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            groups.append(f"{words[i]} {words[i + 1]}")
            i += 2
        else:
            groups.append(words[i])
            i += 1
    lines: list[str] = []
    line = indent + groups[0]
    for g in groups[1:]:
        if len(line) + 1 + len(g) + 2 > width:
            lines.append(line + " \\")
            line = indent + "    " + g
        else:
            line += " " + g
    lines.append(line)
    return "\n".join(lines)


def _qemu_line(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m tests.guest.demo qemu-line",
        description="Print a complete QEMU command booting a shell guest on SOCKET's disk.",
    )
    p.add_argument("socket", type=Path)
    p.add_argument("--guest-dir", type=Path, default=REPO / "var" / "guest")
    a = p.parse_args(argv)
    try:
        args = shell_guest_command(a.socket.absolute(), a.guest_dir.absolute())
    except (build.BuildError, OSError, subprocess.CalledProcessError) as e:
        print(f"(no guest to boot: {e}); attach your own with:")
        print(format_command(["qemu-system-x86_64", "-m", "512M", *_memfd_args()]))
        print(format_command(qemu_attach_args(a.socket.absolute()), indent="      "), "...")
        return 1
    print(format_command(args))
    return 0


def _memfd_args() -> list[str]:
    return [
        "-object",
        f"memory-backend-memfd,id=mem,size={GUEST_MEM_MB}M,share=on",
        "-numa",
        "node,memdev=mem",
    ]


def _fail(demo: Demo, e: StepFailed) -> NoReturn:
    Demo.say(demo.step, e.detail, ok=False)
    if e.log is not None:
        print(f"  last lines of {_rel(e.log)}:")
        print(_tail(e.log))
    print(f"demo FAILED after {demo.elapsed():.1f} s; its files are in {_rel(demo.workdir)}/")
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["qemu-line"]:
        return _qemu_line(args[1:])
    p = argparse.ArgumentParser(
        prog="scripts/try",
        description="The first run: a QEMU guest writes to and reads from a disk that "
        "vhost-user-blk serves, and the host checks the image. Exit status 0 if it all "
        "worked.",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "var" / "demo",
        help="where the image, the socket and the logs go (default: var/demo)",
    )
    p.add_argument("--no-setup", action="store_true", help="do not run scripts/setup first")
    a = p.parse_args(args)
    workdir: Path = a.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    with _locked(workdir):
        demo = Demo(workdir, setup=not a.no_setup)
        try:
            demo.run()
        except StepFailed as e:
            demo.close()
            _fail(demo, e)
        except KeyboardInterrupt:
            demo.close()
            print("demo interrupted")
            return 130
        finally:
            demo.close()
        logs = [p.name for p in (demo.setup_log, demo.daemon_log, demo.console_log) if p.exists()]
        print(f"demo passed in {demo.elapsed():.1f} s (under TCG the guest's CPU sets the MB/s)")
        print(f"logs in {_rel(workdir)}/: {', '.join(logs)} (QEMU's console)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
