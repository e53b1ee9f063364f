"""DPDK ``dpdk-testpmd`` as a vhost-user peer for tests and benchmarks.

Two roles, both run as ``dpdk-testpmd`` subprocesses driven through their
interactive prompt (``-i``; commands written to stdin, output parsed from a log
file that stdout and stderr share, unbuffered through ``stdbuf -o0``):

* front end -- :func:`virtio_user_frontend`: ``net_virtio_user`` ports that
  connect to whatever vhost-user back end listens on the given sockets;
* back end  -- :func:`vhost_backend`: DPDK's own ``net_vhost`` ports listening
  on the given sockets (the reference back end to compare ours with).

:func:`measure_loop` is the switch benchmark: a back end holding two sockets on
cpu 0, and one front end testpmd with two virtio-user ports on cpu 1 in ``io``
forwarding started with ``start tx_first``, so frames circle port0 -> back end
-> port1 -> port0 (and the other way) until stopped. Only two polling processes:
three on two cores starve each other (see /work/shared/FACTS.md).

Each testpmd runs with ``--in-memory`` and a unique ``--file-prefix``, so no
hugepage files survive it; :meth:`TestPmd.close` always ends the process
(``quit``, then SIGTERM, then SIGKILL) and removes any files left with its
prefix. Failures raise :class:`TestPmdError` with the tail of the log.

Machine set-up (packages, hugepages, hugetlbfs mount): ``scripts/setup-dpdk``
or :func:`ensure_hugepages`.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import re
import shutil
import signal
import stat
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypedDict

TESTPMD = "dpdk-testpmd"
HUGEPAGE_MOUNT = Path("/dev/hugepages")
HUGEPAGE_KB = 2048
PROMPT = "testpmd> "
#: lcores for the two roles on a 2-core machine: the main lcore (idle at the
#: prompt) and the forwarding lcore share one cpu.
BACKEND_LCORES = "0@0,1@0"
FRONTEND_LCORES = "0@1,1@1"
BACKEND_CPU = 0

_prefix_counter = itertools.count()


class TestPmdError(RuntimeError):
    """testpmd failed to start, died, or did not answer; the message has the log tail."""


class HugepagesUnavailable(RuntimeError):
    """Not enough 2 MiB hugepages could be reserved or mounted."""


class PortStats(TypedDict):
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_missed: int
    rx_errors: int
    tx_errors: int
    rx_nombuf: int


# --------------------------------------------------------------------------
# machine checks


def testpmd_available() -> bool:
    """True when ``dpdk-testpmd`` (and ``stdbuf``, to unbuffer it) are on PATH."""
    return shutil.which(TESTPMD) is not None and shutil.which("stdbuf") is not None


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])
    return out


def _hugetlbfs_mounted(path: Path = HUGEPAGE_MOUNT) -> bool:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == str(path) and parts[2] == "hugetlbfs":
            return True
    return False


def _mapped_paths() -> set[str]:
    """Paths of files mapped by any live process (to spare hugepage files in use)."""
    paths: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6:
                        paths.add(parts[5].strip().removesuffix(" (deleted)"))
        except OSError:
            continue
    return paths


#: Every testpmd here runs with ``--file-prefix`` :func:`own_file_prefix` unless told
#: otherwise: ``pt<pid>x<n>``, ``<pid>`` being the Python process that started it. DPDK
#: names its hugepage files ``<prefix>map_<k>`` (they outlive a killed run without
#: ``--in-memory``). Nothing else under the mount is ours: libvirt keeps
#: /dev/hugepages/libvirt/qemu there, QEMU its guest RAM, other DPDK applications their
#: own files (scripts/setup-dpdk follows the same rule).
OWN_HUGEPAGE_FILE = re.compile(r"pt(?P<owner>\d+)x\d+map_\d+")


def own_file_prefix() -> str:
    """A ``--file-prefix`` of our own, new on each call (see :data:`OWN_HUGEPAGE_FILE`)."""
    return f"pt{os.getpid()}x{next(_prefix_counter)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, but alive
        return True
    return True


def remove_stale_hugepage_files(path: Path = HUGEPAGE_MOUNT) -> list[str]:
    """Delete the hugepage files our killed testpmd runs left under the hugetlbfs mount
    at ``path`` (they hold pages: "Not enough memory available"), and nothing else: only
    regular files directly under it named with our prefix (:data:`OWN_HUGEPAGE_FILE`)
    whose owner process is gone and that no live process maps. Directories and every
    other file are left alone. Returns the paths removed."""
    if not _hugetlbfs_mounted(path):
        return []
    candidates = []
    with os.scandir(path) as entries:
        for entry in entries:
            m = OWN_HUGEPAGE_FILE.fullmatch(entry.name)
            if m is None or not entry.is_file(follow_symlinks=False):
                continue
            if _pid_alive(int(m["owner"])):  # its run may still be going
                continue
            candidates.append(entry.path)
    if not candidates:
        return []
    in_use = _mapped_paths()
    removed = []
    for f in candidates:
        if f not in in_use:
            with contextlib.suppress(OSError):
                os.unlink(f)
                removed.append(f)
    return removed


def ensure_hugepages(min_free_pages: int = 512, want_pages: int = 1024) -> int:
    """Make at least ``min_free_pages`` 2 MiB hugepages free and hugetlbfs mounted
    at /dev/hugepages: mount it, drop stale files, raise ``nr_hugepages`` (towards
    ``want_pages``, keeping 1 GiB of ordinary memory) if needed. Returns the free
    page count; raises :class:`HugepagesUnavailable` when it cannot be done."""
    if not _hugetlbfs_mounted():
        if os.geteuid() != 0:
            raise HugepagesUnavailable("hugetlbfs is not mounted at /dev/hugepages (not root)")
        HUGEPAGE_MOUNT.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "hugetlbfs", "nodev", str(HUGEPAGE_MOUNT)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise HugepagesUnavailable(f"mount hugetlbfs failed: {r.stderr.strip()}")
    remove_stale_hugepage_files()
    info = _meminfo()
    free = info.get("HugePages_Free", 0)
    if free >= min_free_pages:
        return free
    if os.geteuid() != 0:
        raise HugepagesUnavailable(f"only {free} free hugepages, need {min_free_pages} (not root)")
    total = info.get("HugePages_Total", 0)
    spare = (info.get("MemAvailable", 0) - (1 << 20)) // HUGEPAGE_KB
    target = total + min(max(want_pages - total, min_free_pages - free), max(spare, 0))
    nr = Path("/proc/sys/vm/nr_hugepages")
    with contextlib.suppress(OSError):
        nr.write_text(f"{target}\n")
    free = _meminfo().get("HugePages_Free", 0)
    if free < min_free_pages:
        raise HugepagesUnavailable(
            f"only {free} free 2 MiB hugepages after asking for {target}, need {min_free_pages}"
        )
    return free


# --------------------------------------------------------------------------
# unix sockets


def _listening_unix_paths() -> set[str]:
    """Paths of listening unix sockets, from /proc/net/unix (no probe connection)."""
    out: set[str] = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]; Flags 00010000 = listening
            if len(parts) >= 8 and int(parts[3], 16) & 0x10000:
                out.add(parts[7])
    return out


def wait_for_sockets(
    paths: Sequence[str | os.PathLike[str]],
    timeout: float = 15.0,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Wait until every path is a unix socket something listens on.
    ``alive`` (if given) is polled; when it returns False we give up early."""
    want = [str(p) for p in paths]
    deadline = time.monotonic() + timeout
    while True:
        ok = all(os.path.exists(p) and stat.S_ISSOCK(os.stat(p).st_mode) for p in want)
        if ok and set(want) <= _listening_unix_paths():
            return
        if alive is not None and not alive():
            raise TestPmdError(f"back end exited before listening on {want}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {want} after {timeout} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# testpmd


_STAT_RE = re.compile(r"\b(RX|TX)-(packets|missed|bytes|errors|nombuf):\s+(\d+)")
_BLOCK_RE = re.compile(r"NIC statistics for port (\d+)\s+#+(.*?)#{20,}", re.DOTALL)


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parse the output of testpmd's ``show port stats all``."""
    ports: dict[int, PortStats] = {}
    for m in _BLOCK_RE.finditer(text):
        values = {f"{d.lower()}_{k}": int(v) for d, k, v in _STAT_RE.findall(m.group(2))}
        ports[int(m.group(1))] = PortStats(
            rx_packets=values.get("rx_packets", 0),
            tx_packets=values.get("tx_packets", 0),
            rx_bytes=values.get("rx_bytes", 0),
            tx_bytes=values.get("tx_bytes", 0),
            rx_missed=values.get("rx_missed", 0),
            rx_errors=values.get("rx_errors", 0),
            tx_errors=values.get("tx_errors", 0),
            rx_nombuf=values.get("rx_nombuf", 0),
        )
    return ports


class TestPmd:
    """One interactive ``dpdk-testpmd``. Use as a context manager (or call
    :meth:`launch` and :meth:`close`)::

        with TestPmd(["net_vhost0,iface=/tmp/a.sock,queues=1"], forward_mode="rxonly") as pmd:
            pmd.start()
            ...
            print(pmd.port_stats()[0]["rx_packets"])

    ``vdevs`` -- ``--vdev`` arguments, one port each, in port order;
    ``lcores`` -- EAL ``--lcores`` (main lcore first; one forwarding lcore by default);
    ``forward_mode`` -- testpmd ``--forward-mode`` (io, rxonly, txonly, macswap, ...);
    ``txpkts`` -- ``--txpkts`` (frame size for txonly and ``start tx_first``);
    ``extra_eal`` / ``extra_args`` -- appended before / after ``--``;
    ``memory_mb`` -- ``-m``; ``mbufs`` -- ``--total-num-mbufs``;
    ``single_file_segments`` -- required by virtio-user ("Too many memory regions").
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        vdevs: Sequence[str],
        *,
        lcores: str = FRONTEND_LCORES,
        forward_mode: str = "io",
        txpkts: int | None = None,
        nb_cores: int = 1,
        extra_eal: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        memory_mb: int | None = 256,
        mbufs: int | None = 16384,
        single_file_segments: bool = True,
        in_memory: bool = True,
        file_prefix: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        name: str = "testpmd",
        start_timeout: float = 30.0,
        binary: str = TESTPMD,
    ) -> None:
        self.vdevs = list(vdevs)
        self.name = name
        self.start_timeout = start_timeout
        self.file_prefix = file_prefix or own_file_prefix()
        self._own_log_dir: str | None = None
        if log_path is None:
            self._own_log_dir = tempfile.mkdtemp(prefix=f"{name}-")
            log_path = os.path.join(self._own_log_dir, f"{name}.log")
        self.log_path = Path(log_path)
        eal = [f"--lcores={lcores}", f"--file-prefix={self.file_prefix}", "--no-pci"]
        if in_memory:
            eal.append("--in-memory")
        if single_file_segments:
            eal.append("--single-file-segments")
        if memory_mb is not None:
            eal += ["-m", str(memory_mb)]
        for v in self.vdevs:
            eal += ["--vdev", v]
        eal += list(extra_eal)
        app = ["-i", f"--forward-mode={forward_mode}", f"--nb-cores={nb_cores}"]
        if txpkts is not None:
            app.append(f"--txpkts={txpkts}")
        if mbufs is not None:
            app.append(f"--total-num-mbufs={mbufs}")
        app += list(extra_args)
        self.argv = ["stdbuf", "-o0", "-e0", binary, *eal, "--", *app]
        self.proc: subprocess.Popen[bytes] | None = None
        self._failed = False
        self._stdin: IO[bytes] | None = None

    # -- process ---------------------------------------------------------

    def launch(self) -> Self:
        """Start the process and wait for its first prompt (ports configured)."""
        if self.proc is not None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self._offset0 = log.tell()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._stdin = self.proc.stdin
        try:
            self._wait_prompt(self._offset0, self.start_timeout, "start-up")
            out = self.command("show port summary all")
            m = re.search(r"Number of available ports:\s*(\d+)", out)
            if m is None or int(m.group(1)) < len(self.vdevs):
                found = "?" if m is None else m.group(1)
                raise self._error(f"{found} of {len(self.vdevs)} ports came up")
        except BaseException:
            self.close()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _error(self, what: str) -> TestPmdError:
        self._failed = True  # keep the log
        rc = None if self.proc is None else self.proc.poll()
        state = "running" if rc is None else f"exited with {rc}"
        return TestPmdError(
            f"{self.name}: {what} ({state}); log {self.log_path}:\n{self.log_tail()}"
        )

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _wait_prompt(self, since: int, timeout: float, what: str) -> str:
        """Wait for a prompt written after byte ``since``; return the text before it."""
        deadline = time.monotonic() + timeout
        with open(self.log_path, "rb") as f:
            buf = b""
            f.seek(since)
            while True:
                buf += f.read()
                i = buf.find(PROMPT.encode())
                if i >= 0:
                    return buf[:i].decode(errors="replace")
                if not self.running:
                    raise self._error(f"died during {what}")
                if time.monotonic() > deadline:
                    raise self._error(f"no prompt after {what} within {timeout} s")
                time.sleep(0.02)

    def command(self, cmd: str, timeout: float = 15.0) -> str:
        """Send one interactive command; return its output (up to the next prompt)."""
        if not self.running or self._stdin is None:
            raise self._error(f"not running for {cmd!r}")
        since = self._log_size()
        try:
            self._stdin.write(cmd.encode() + b"\n")
            self._stdin.flush()
        except OSError as e:
            raise self._error(f"writing {cmd!r}: {e}") from e
        return self._wait_prompt(since, timeout, repr(cmd))

    # -- forwarding ------------------------------------------------------

    def start(self, tx_first: int = 0) -> None:
        """``start`` forwarding; ``tx_first=N`` sends N bursts first (``start tx_first N``)."""
        self.launch()
        if tx_first > 0:
            out = self.command("start tx_first" + ("" if tx_first == 1 else f" {tx_first}"))
        else:
            out = self.command("start")
        if "forwards packets on" not in out and "Packet forwarding already started" not in out:
            raise self._error(f"start failed: {out.strip()[-500:]}")

    def stop(self) -> None:
        """``stop`` forwarding (the ports stay up; counters keep their values)."""
        self.command("stop")

    def port_stats(self) -> dict[int, PortStats]:
        """Counters of every port, from ``show port stats all``."""
        out = self.command("show port stats all")
        stats = parse_port_stats(out)
        if len(stats) < len(self.vdevs):
            raise self._error(f"stats for {len(stats)} of {len(self.vdevs)} ports: {out!r}")
        return stats

    # -- teardown --------------------------------------------------------

    def close(self, timeout: float = 10.0) -> int | None:
        """End the process whatever its state (quit, SIGTERM, SIGKILL) and remove
        hugepage/runtime files with its prefix. Returns the exit status."""
        proc, self.proc = self.proc, None
        rc: int | None = None
        if proc is not None:
            if proc.poll() is None and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write(b"quit\n")
                    proc.stdin.flush()
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
                    try:
                        rc = proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        self._remove_files()
        if rc is not None and rc != 0:
            self._remove_stale_sockets()
        if rc == 0 and not self._failed and self._own_log_dir is not None:  # keep failed logs
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
        return rc

    def _remove_files(self) -> None:
        for f in glob.glob(str(HUGEPAGE_MOUNT / f"{self.file_prefix}map_*")):
            with contextlib.suppress(OSError):
                os.unlink(f)
        for base in ("/var/run/dpdk", "/run/dpdk"):
            shutil.rmtree(os.path.join(base, self.file_prefix), ignore_errors=True)

    def _remove_stale_sockets(self) -> None:
        """A killed ``net_vhost`` leaves its listening socket file behind; the next
        bind on that path would fail."""
        listening = _listening_unix_paths()
        for v in self.vdevs:
            m = re.search(r"(?:^|,)iface=([^,]+)", v)
            if m and m.group(1) not in listening:
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(m.group(1)).st_mode):
                        os.unlink(m.group(1))

    def __enter__(self) -> Self:
        return self.launch()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                os.killpg(self.proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# the two roles


def virtio_user_frontend(
    sock_paths: Sequence[str | os.PathLike[str]],
    forward_mode: str = "io",
    txpkts: int | None = 64,
    lcores: str = FRONTEND_LCORES,
    **kwargs: object,
) -> TestPmd:
    """A testpmd front end: one ``net_virtio_user{i},path=SOCK,queues=1`` port per
    socket (connecting to a listening back end). Not launched yet: use ``with``."""
    vdevs = [f"net_virtio_user{i},path={p},queues=1" for i, p in enumerate(sock_paths)]
    kwargs.setdefault("name", "frontend")
    return TestPmd(vdevs, lcores=lcores, forward_mode=forward_mode, txpkts=txpkts, **kwargs)  # type: ignore[arg-type]


def vhost_backend(
    sock_paths: Sequence[str | os.PathLike[str]],
    forward_mode: str = "io",
    lcores: str = BACKEND_LCORES,
    **kwargs: object,
) -> TestPmd:
    """DPDK's own back end: one ``net_vhost{i},iface=SOCK,queues=1`` port per socket
    (it listens on SOCK). With two ports in ``io`` mode testpmd forwards
    port0 <-> port1. Not launched yet: use ``with``."""
    vdevs = [f"net_vhost{i},iface={p},queues=1" for i, p in enumerate(sock_paths)]
    kwargs.setdefault("name", "backend")
    return TestPmd(vdevs, lcores=lcores, forward_mode=forward_mode, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def dpdk_vhost_switch(
    a_sock: str | os.PathLike[str],
    b_sock: str | os.PathLike[str],
    log_dir: str | os.PathLike[str] | None = None,
) -> Iterator[TestPmd]:
    """``backend_start`` for :func:`measure_loop` with DPDK's back end: testpmd io
    forwarding between ``net_vhost0`` (a_sock) and ``net_vhost1`` (b_sock) on cpu 0,
    forwarding already started."""
    log = None if log_dir is None else Path(log_dir) / "backend-dpdk.log"
    with vhost_backend([a_sock, b_sock], "io", BACKEND_LCORES, log_path=log) as be:
        be.start()
        yield be


@contextlib.contextmanager
def process_backend(
    argv: Sequence[str],
    sock_paths: Sequence[str | os.PathLike[str]],
    *,
    cpu: int = BACKEND_CPU,
    log_path: str | os.PathLike[str] | None = None,
    start_timeout: float = 15.0,
    stop_timeout: float = 10.0,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run any (non-DPDK) back end pinned with ``taskset -c CPU``, wait until it
    listens on every socket, and end it (SIGTERM, then SIGKILL) on exit.

    For the packet-rate benchmarks, which is why this is not tests/support/daemon.py's
    Daemon: the back end may be ours, another checkout's or someone else's, so it is
    never probed (it listens, as /proc/net/unix shows, and testpmd is its first front
    end) and how it ends is not checked. A test of our daemon pinned to a cpu starts it
    through the support package with ``taskset`` as its exec prefix
    (tests/integration/test_net_dpdk.py)."""
    log_file = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="backend-")) / "log"
    cmd = ["taskset", "-c", str(cpu), *argv]
    with open(log_file, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    try:
        try:
            wait_for_sockets(sock_paths, start_timeout, alive=lambda: proc.poll() is None)
        except (TestPmdError, TimeoutError) as e:
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
            raise TestPmdError(f"{argv[0]}: {e}; log {log_file}:\n{tail}") from e
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# --------------------------------------------------------------------------
# the forwarding loop


BackendStart = Callable[[str, str], contextlib.AbstractContextManager[object]]


@dataclass
class LoopResult:
    """What :func:`run_loop` measured at the front end."""

    pkt_size: int
    seconds: float  #: measured interval
    rx_packets: int  #: received on both front-end ports during the interval
    tx_packets: int  #: sent on both front-end ports during the interval
    rx_bytes: int = 0  #: received bytes on both ports (``pkt_size * rx_packets`` if intact)
    per_port_rx_pps: dict[int, float] = field(default_factory=dict)
    #: rx packets/s of both ports over each ``sample_period`` of the interval
    samples: list[float] = field(default_factory=list)
    frontend_log: str = ""

    @property
    def pps(self) -> float:
        """Frames per second through the back end, both directions together (the
        sum of the front end's rx on port 0 and port 1) over the whole interval."""
        return self.rx_packets / self.seconds if self.seconds > 0 else 0.0

    @property
    def mpps(self) -> float:
        return self.pps / 1e6

    @property
    def median_pps(self) -> float:
        """Median of the per-sample rates: less sensitive to a noisy neighbour."""
        return statistics.median(self.samples) if self.samples else self.pps

    @property
    def gbps(self) -> float:
        """Frame bits per second (frame = ``pkt_size`` bytes; no wire overhead)."""
        return self.pps * self.pkt_size * 8 / 1e9


def _stats_at(fe: TestPmd) -> tuple[dict[int, PortStats], float]:
    t0 = time.monotonic()
    stats = fe.port_stats()
    return stats, (t0 + time.monotonic()) / 2


def _rx(stats: dict[int, PortStats]) -> int:
    return sum(s["rx_packets"] for s in stats.values())


def run_loop(
    backend_start: BackendStart,
    pkt_size: int = 64,
    seconds: float = 5.0,
    *,
    warmup: float = 1.0,
    sample_period: float = 1.0,
    tx_first_bursts: int = 1,
    frontend_lcores: str = FRONTEND_LCORES,
    log_dir: str | os.PathLike[str] | None = None,
) -> LoopResult:
    """Run the two-socket forwarding loop and measure it at the front end.

    ``backend_start(a_sock, b_sock)`` must return a context manager that, on
    entry, has a back end listening on both sockets (pinned to cpu 0) and
    forwarding a <-> b; it is left when the measurement is over. The front end is
    one testpmd with ``net_virtio_user0`` (a_sock) and ``net_virtio_user1``
    (b_sock) in io mode (port0 <-> port1) on cpu 1, ``--txpkts=pkt_size``, started
    with ``start tx_first [N]`` (N = ``tx_first_bursts`` bursts of 32 frames per
    port circle the loop); after ``warmup`` seconds the rx counters of both ports
    are read every ``sample_period`` for ``seconds``. Logs go to ``log_dir`` (by
    default a temporary directory, removed unless the run fails)."""
    sock_dir = tempfile.mkdtemp(prefix="dpdk-loop-")  # short path: sun_path is 108 bytes
    own_logs = log_dir is None  # a temporary one, kept only if the run fails
    logs = Path(log_dir or tempfile.mkdtemp(prefix="dpdk-loop-logs-"))
    a_sock, b_sock = os.path.join(sock_dir, "a.sock"), os.path.join(sock_dir, "b.sock")
    try:
        with backend_start(a_sock, b_sock):
            wait_for_sockets([a_sock, b_sock])
            fe = virtio_user_frontend(
                [a_sock, b_sock],
                "io",
                txpkts=pkt_size,
                lcores=frontend_lcores,
                log_path=logs / f"frontend-{pkt_size}.log",
            )
            with fe:
                fe.start(tx_first=tx_first_bursts)
                time.sleep(warmup)
                s0, t0 = _stats_at(fe)
                prev, t_prev = s0, t0
                samples: list[float] = []
                end = t0 + seconds
                while (now := time.monotonic()) < end - 0.01:
                    time.sleep(min(sample_period, end - now))
                    cur, t_cur = _stats_at(fe)
                    samples.append((_rx(cur) - _rx(prev)) / (t_cur - t_prev))
                    prev, t_prev = cur, t_cur
                s1, t1 = prev, t_prev
                fe.stop()
            dt = t1 - t0
            result = LoopResult(
                pkt_size=pkt_size,
                seconds=dt,
                rx_packets=_rx(s1) - _rx(s0),
                rx_bytes=sum(s1[p]["rx_bytes"] - s0[p]["rx_bytes"] for p in s1),
                tx_packets=sum(s1[p]["tx_packets"] - s0[p]["tx_packets"] for p in s1),
                per_port_rx_pps={p: (s1[p]["rx_packets"] - s0[p]["rx_packets"]) / dt for p in s1},
                samples=samples,
                frontend_log=str(fe.log_path),
            )
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    if own_logs:
        shutil.rmtree(logs, ignore_errors=True)
        result.frontend_log = ""
    return result


def measure_loop(
    backend_start: BackendStart,
    pkt_size: int = 64,
    seconds: float = 5.0,
    *,
    warmup: float = 1.0,
    tx_first_bursts: int = 1,
    log_dir: str | os.PathLike[str] | None = None,
) -> float:
    """Packets per second the back end forwards in the two-socket loop (the sum of
    the front end's rx over both ports). See :func:`run_loop` for the set-up."""
    return run_loop(
        backend_start,
        pkt_size,
        seconds,
        warmup=warmup,
        tx_first_bursts=tx_first_bursts,
        log_dir=log_dir,
    ).pps
