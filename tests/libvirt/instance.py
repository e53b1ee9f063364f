"""libvirt's daemons for the tests, started by hand (no systemd here, nor in CI) in a
mount namespace of their own: a private configuration and private state, and nothing
of the machine's /etc/libvirt, /run/libvirt, /var/lib/libvirt or /var/log/libvirt
touched.

Why a mount namespace: root's libvirtd is always the "system" instance and its QEMU
driver reads /etc/libvirt/qemu.conf; no option or variable points it at another file
(``libvirtd --config`` names libvirtd.conf only). Inside ``unshare --mount`` a private
copy bind-mounted over /etc/libvirt is what the daemons (and the QEMUs they start) see,
and nobody else. Their state directories are bind mounts of ours as well, so their
sockets land in our directory and virsh, outside, connects with
``qemu:///system?socket=ROOT/run/libvirt-sock``. When the daemons and their QEMUs are
gone, so are the namespace and its mounts: the machine is as it was, but for an empty
mount point made where one was missing (/run/libvirt on a machine that never ran
libvirtd), removed again by :meth:`PrivateLibvirt.stop`.

Layout of ROOT (traversable by everyone: QEMU runs as libvirt-qemu)::

    etc/    copy of /etc/libvirt; qemu.conf + QEMU_CONF, libvirtd.conf + logging
    run/    over /run/libvirt      libvirt-sock, virtlogd-sock, qemu/NAME.pid
    lib/    over /var/lib/libvirt  per-domain state, QEMU's HOME
    log/    over /var/log/libvirt  libvirtd.log, virtlogd.log, qemu/NAME.log
    and a cache directory over /var/cache/libvirt: QEMU's capabilities, probed once
    (~8 s) and kept across sessions (libvirt checks them against the binaries).

The daemons run in the foreground as our children (``virtlogd`` is the process that
makes the namespace; ``libvirtd`` joins it with nsenter), logging to files in ROOT.

Boundary: starts, queries and stops libvirt; the tests decide what passes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

#: the qemu.conf lines libvirt 9.0 needs on these machines (docs/libvirt.md says why)
QEMU_CONF = (
    "cgroup_controllers = [ ]",
    "namespaces = [ ]",
    'security_driver = "none"',
    "remember_owner = 0",
)
#: libvirtd.conf: warnings to a file, and libvirt's reading of the vhost-user back-end
#: descriptors at debug level (it logs each file's type and binary as it parses it)
LIBVIRTD_CONF = (
    'log_filters = "1:qemu.qemu_vhost_user 1:qemu.qemu_interop_config"',
    'log_outputs = "1:file:/var/log/libvirt/libvirtd.log"',
)
VIRTLOGD_CONF = ('log_outputs = "3:file:/var/log/libvirt/virtlogd.log"',)
#: ROOT subdirectory -> where the daemons see it
MOUNTS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
}
CACHE_MOUNT = "/var/cache/libvirt"
START_TIMEOUT = 60.0  # the first connection probes QEMU's capabilities: ~8 s here
STOP_TIMEOUT = 15.0
VIRSH_TIMEOUT = 60.0


class LibvirtError(RuntimeError):
    """A daemon did not start or stop, or a virsh command failed."""


def why_not_supported() -> str | None:
    """None if the daemons can be run here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (libvirt's system instance, mount namespaces)"
    for tool in ("libvirtd", "virtlogd", "virsh", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup installs libvirt)"
    return None


def _mount_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def pids_in_mount_namespace(ns: str) -> list[int]:
    """Every process whose mount namespace is ``ns`` (as /proc/PID/ns/mnt reads)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                pids.append(int(entry))
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class PrivateLibvirt:
    """libvirtd and virtlogd with their configuration and state under ``root``;
    ``cache`` holds QEMU's capabilities across sessions. ``qemu_conf`` lines are
    appended to the copy of qemu.conf."""

    def __init__(self, root: Path, cache: Path, qemu_conf: Sequence[str] = QEMU_CONF) -> None:
        self.root = root
        self.cache = cache
        self.qemu_conf = tuple(qemu_conf)
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None
        self.namespace = ""
        self.made_mount_points: list[Path] = []
        self.started_in = 0.0  # seconds until virsh got an answer

    # --- paths ---------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "libvirtd.log"

    def domain_log_path(self, name: str) -> Path:
        return self.root / "log" / "qemu" / f"{name}.log"

    # --- start ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        for sub in ("run", "lib", "log"):
            (self.root / sub).mkdir(mode=0o755, exist_ok=True)
        self.cache.mkdir(mode=0o755, parents=True, exist_ok=True)
        etc = self.root / "etc"
        shutil.copytree("/etc/libvirt", etc, symlinks=True)
        # nothing of the machine's starts with our daemons (networks, domains)
        for autostart in etc.glob("**/autostart"):
            shutil.rmtree(autostart)
        for conf, lines in (
            ("qemu.conf", self.qemu_conf),
            ("libvirtd.conf", LIBVIRTD_CONF),
            ("virtlogd.conf", VIRTLOGD_CONF),
        ):
            with open(etc / conf, "a") as f:
                f.write("\n# tests/libvirt\n" + "".join(f"{line}\n" for line in lines))
        for target in [*MOUNTS.values(), CACHE_MOUNT]:
            path = Path(target)
            if not path.exists():
                path.mkdir(mode=0o755, parents=True)
                self.made_mount_points.append(path)

    def _namespace_script(self) -> str:
        binds = [(self.root / sub, target) for sub, target in MOUNTS.items()]
        binds.append((self.cache, CACHE_MOUNT))
        lines = ["set -e"]
        lines += [f"mount --bind '{src}' '{dst}'" for src, dst in binds]
        lines.append(f"exec virtlogd --pid-file '{self.root / 'virtlogd.pid'}'")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start virtlogd (making the namespace) and libvirtd in it; return once virsh
        gets an answer. On failure everything started is stopped and LibvirtError
        raised with the daemons' output."""
        t0 = time.monotonic()
        self._prepare()
        try:
            with open(self.root / "virtlogd.out", "wb") as out:
                self.virtlogd = subprocess.Popen(
                    [
                        "unshare",
                        "--mount",
                        "--propagation",
                        "private",
                        "sh",
                        "-c",
                        self._namespace_script(),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._wait_path(self.root / "run" / "virtlogd-sock", self.virtlogd, "virtlogd")
            self.namespace = _mount_namespace(self.virtlogd.pid)
            with open(self.root / "libvirtd.out", "wb") as out:
                self.libvirtd = subprocess.Popen(
                    [
                        "nsenter",
                        f"--mount=/proc/{self.virtlogd.pid}/ns/mnt",
                        "--",
                        "libvirtd",
                        "--pid-file",
                        str(self.root / "libvirtd.pid"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._wait_path(self.root / "run" / "libvirt-sock", self.libvirtd, "libvirtd")
            self.virsh("version", timeout=START_TIMEOUT)  # probes QEMU once
        except BaseException as e:
            problems = self.stop()
            raise LibvirtError(f"libvirt did not start: {e}; {problems}\n{self.diag()}") from e
        self.started_in = time.monotonic() - t0

    def _wait_path(self, path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not path.exists():
            if proc.poll() is not None:
                raise LibvirtError(f"{what} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise LibvirtError(f"{what}: no {path} after {START_TIMEOUT:.0f}s")
            time.sleep(0.05)

    # --- use -----------------------------------------------------------------------------
    def virsh(
        self, *args: str, check: bool = True, timeout: float = VIRSH_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``virsh -c URI ARGS``; raises LibvirtError on failure when ``check``."""
        r = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and r.returncode != 0:
            raise LibvirtError(
                f"virsh {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}"
            )
        return r

    def domains(self) -> list[str]:
        """Every domain libvirt knows (running or only defined)."""
        r = self.virsh("list", "--all", "--name", check=False)
        return [line.strip() for line in r.stdout.splitlines() if line.strip()]

    def domain_state(self, name: str) -> str:
        """``running``, ``shut off``, ...; ``gone`` for a domain libvirt does not know."""
        r = self.virsh("domstate", name, check=False)
        return r.stdout.strip() if r.returncode == 0 else "gone"

    def qemu_pid(self, name: str) -> int | None:
        """The pid of domain ``name``'s QEMU, from libvirt's pid file (None if none)."""
        try:
            return int((self.root / "run" / "qemu" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def domain_log(self, name: str) -> str:
        try:
            return self.domain_log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command name) of every process in the daemons' mount namespace."""
        if not self.namespace:
            return []
        return [(p, _comm(p)) for p in pids_in_mount_namespace(self.namespace)]

    def diag(self, tail: int = 4000) -> str:
        parts = []
        for name in ("virtlogd.out", "libvirtd.out", "log/libvirtd.log"):
            with contextlib.suppress(OSError):
                text = (self.root / name).read_text(errors="replace")
                parts.append(f"--- {name} ---\n{text[-tail:]}")
        return "\n".join(parts)

    # --- stop ----------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Destroy and undefine every domain, stop libvirtd then virtlogd (SIGTERM,
        SIGKILL after STOP_TIMEOUT), kill whatever else still runs in the namespace
        and remove the mount points made. Returns what went wrong: a daemon that had
        to be killed or exited badly, processes left behind. Idempotent."""
        problems: list[str] = []
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            for name in self.domains():
                if self.domain_state(name) != "shut off":
                    self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, check=False)
        for proc, what in ((self.libvirtd, "libvirtd"), (self.virtlogd, "virtlogd")):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                    problems.append(f"{what} did not exit within {STOP_TIMEOUT:.0f}s of SIGTERM")
            # 0, or the SIGTERM it was sent
            if proc.returncode not in (0, -signal.SIGTERM):
                problems.append(f"{what} exited with {proc.returncode}")
        left = self.processes()
        if left:
            problems.append(f"processes left in libvirt's namespace (killed): {left}")
            for pid, _ in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.05)
        for path in reversed(self.made_mount_points):
            with contextlib.suppress(OSError):
                path.rmdir()
        self.made_mount_points.clear()
        self.libvirtd = self.virtlogd = None
        return problems
