"""Live migration between QEMU processes on this host, for the real-QEMU tests.

A :class:`Migration` boots a guest in a *source* QEMU and moves it, hop after hop, to a
fresh *destination* QEMU: the same command line plus ``-incoming defer``, each QEMU with
back ends of its own (a back-end process per device and per QEMU, started before that
QEMU, on a disk image both share), driven over QMP (:class:`Qmp`):

1. start the destination's back ends, then the destination QEMU (``-incoming defer``,
   its own QMP socket), and ``migrate-incoming unix:PATH`` on it;
2. ``migrate unix:PATH`` on the source (an answer of ``GenericError`` with "Migration
   disabled: ..." is a migration blocker: :class:`MigrationBlocked`);
3. poll ``query-migrate`` on the source until ``completed`` or ``failed`` and the
   destination until it runs; keep ``downtime``, ``total-time`` and the RAM figures
   (:class:`HopStats`);
4. ``quit`` the source and stop its back ends (a back end of ours must exit 0 on
   SIGTERM and log no traceback).

Guest RAM is a shared memfd (``qemu.qemu_base_args(shared_mem=True)``, what vhost-user
needs) and the accelerator TCG. Each QEMU's serial console goes to its own file
(``<workdir>/vm<N>.console.log``, QEMU's stderr in it too); the guest's output moves
with it, so the workload's result markers are read from the last destination's file,
and :class:`MigratingConsole` reads the files of every hop in order as one console
(a line cut by the switch-over continues in the next file).

Back ends are :data:`BackendFactory` callables ``(hop, directory) -> Backend``:
:func:`ours_blk` and :func:`qsd_blk` (qemu-storage-daemon with ``locking=off``, the
known-good peer), :func:`ours_net` and :func:`qemu_tap_net` (QEMU's own TAP back end:
the QEMU then runs in the namespace). A net back end puts a new TAP of its own on the
namespace's bridge for every hop, so source and destination share the L2 segment and
the bridge has to learn the guest's new port after the move.

Boundary: this module starts, migrates, watches and stops processes and keeps figures;
the tests decide what passes.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.guest import build, qemu
from tests.guest import net_workloads as nw
from tests.netns import NetNs
from tests.support.daemon import (
    QEMU_STOP_TIMEOUT,
    Daemon,
    Ready,
    spawn,
    spawn_blk_for_qemu,
    spawn_net_for_qemu,
)

from .crash_harness import Console
from .harness import blk_qemu_args

QMP_TIMEOUT = 30.0
#: from ``migrate`` until the source reports ``completed`` (TCG, a busy 2-core host)
MIGRATE_TIMEOUT = 120.0
#: from the source's ``completed`` until the destination reports ``running``
RESUME_TIMEOUT = 30.0
QEMU_QUIT_TIMEOUT = 30.0
#: migration parameters for a unix socket on one host: no bandwidth cap worth the name
#: (QEMU's default is 128 MiB/s); ``downtime-limit`` stays QEMU's default, 300 ms
MIGRATE_PARAMETERS: dict[str, Any] = {"max-bandwidth": 4 << 30}
QSD = "qemu-storage-daemon"
#: a guest's heartbeat line: its uptime
HEARTBEAT_RE = re.compile(r"^HB (\d+\.\d+)$")


# =========================================================================================
# QMP
# =========================================================================================


class QmpError(RuntimeError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(f"{command}: {cls}: {desc}")
        self.command, self.cls, self.desc = command, cls, desc


class MigrationBlocked(QmpError):
    """``migrate`` refused: QEMU has a migration blocker (``desc`` says which)."""


class Qmp:
    """A synchronous QMP client on a unix socket (QEMU's ``-qmp unix:PATH,server=on,
    wait=off``): connects (retrying while QEMU creates the socket), negotiates, and runs
    commands one at a time; events that arrive meanwhile are kept in :attr:`events`."""

    def __init__(
        self, path: Path, timeout: float = QMP_TIMEOUT, alive: Callable[[], bool] | None = None
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._id = 0
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if alive is not None and not alive():
                    raise RuntimeError(
                        f"QEMU exited before its QMP socket {path} accepted"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QMP socket {path} not there after {timeout}s") from None
                time.sleep(0.05)
        s.settimeout(timeout)
        self._sock = s
        self._file = s.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting on {path}: {greeting}")
        self.version: dict[str, Any] = greeting["QMP"].get("version", {})
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError(f"QMP {self.path}: QEMU closed the connection")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value; raises :class:`QmpError`
        (:class:`MigrationBlocked` for a blocked ``migrate``)."""
        self._id += 1
        req: dict[str, Any] = {"execute": command, "id": self._id}
        if arguments:
            req["arguments"] = arguments
        self._file.write(json.dumps(req).encode() + b"\n")
        self._file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != self._id:
                continue
            if "error" in msg:
                cls, desc = msg["error"].get("class", "?"), msg["error"].get("desc", "?")
                if command == "migrate" and "disabled" in desc.lower():
                    raise MigrationBlocked(command, cls, desc)
                raise QmpError(command, cls, desc)
            return msg.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._sock.close()


# =========================================================================================
# Back ends
# =========================================================================================


@dataclass
class Backend:
    """What one QEMU needs for one device: the options that attach it, and the process
    serving it (None when QEMU serves the device itself)."""

    name: str
    qemu_args: list[str]
    daemon: Daemon | None = None
    #: ours: SIGTERM must end it with status 0 and no traceback logged
    check_exit: bool = True
    #: what the test may want to look at (a TAP's name, ...)
    info: dict[str, str] = field(default_factory=dict)

    def stop(self) -> str | None:
        """Stop the process; returns what went wrong, if anything."""
        d = self.daemon
        if d is None or d.checked:
            return None
        if not self.check_exit:
            d.stop()
            d.checked = True
            return None
        try:
            d.check_clean_exit()
        except AssertionError as e:
            return f"{self.name}: {e}"
        return None

    def log_text(self) -> str:
        return self.daemon.log_text() if self.daemon is not None else ""


#: ``factory(hop, directory)``: start one device's back end for the QEMU of ``hop``
#: (0: the first source), its files in ``directory``
BackendFactory = Callable[[int, Path], Backend]


def ours_blk(image: Path, *args: str) -> BackendFactory:
    """Our ``vhost-user-blk --blk-file IMAGE ARGS``, one process per QEMU (it opens the
    image without a lock, so source and destination may both have it open)."""

    def start(hop: int, directory: Path) -> Backend:
        d = spawn_blk_for_qemu(
            directory, "blk", *args, image=image, socket_path=directory / "blk.sock"
        )
        return Backend(f"vhost-user-blk (hop {hop})", blk_qemu_args(d), d)

    return start


def qsd_blk(image: Path) -> BackendFactory:
    """qemu-storage-daemon's vhost-user-blk export of ``image`` (``locking=off``: the
    other hop's qsd has the image open as well)."""

    def start(hop: int, directory: Path) -> Backend:
        sock = directory / "qsd.sock"
        argv = [
            QSD,
            "--blockdev",
            f"driver=file,node-name=f0,filename={image},locking=off",
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
            "writable=on,num-queues=1",
        ]
        d = spawn(
            argv,
            directory / "qsd.log",
            [sock],
            owns_sockets=False,
            image=image,
            ready=Ready.ACCEPTS,
            start_new_session=True,
            stop_timeout=QEMU_STOP_TIMEOUT,
        )
        args = [
            "-chardev",
            f"socket,id=vub0,path={sock}",
            "-device",
            "vhost-user-blk-pci,chardev=vub0,num-queues=1",
        ]
        return Backend(f"qemu-storage-daemon (hop {hop})", args, d, check_exit=False)

    return start


def add_segment(ns: NetNs, bridge: str, addr_cidr: str, mac: str) -> str:
    """The bridge every hop's TAP joins, with the host's address and a MAC of its own.
    Without one a Linux bridge takes the lowest MAC of its ports, so the TAP a new hop
    adds may change it: the guest then sends to the old MAC, the bridge hands those
    frames up as PACKET_OTHERHOST, IP drops them, and the stream stalls until the
    guest's ARP entry expires (30-50 s)."""
    ns.add_bridge(bridge)
    ns.ip("link", "set", bridge, "address", mac)
    ns.add_addr(bridge, addr_cidr)
    return bridge


def _hop_tap(ns: NetNs, bridge: str, hop: int) -> str:
    """A new TAP for this hop's QEMU, on ``bridge``."""
    tap = ns.add_tap(f"mtap{hop}")
    ns.set_master(tap, bridge)
    return tap


def ours_net(ns: NetNs, bridge: str, mac: str, *args: str) -> BackendFactory:
    """Our ``vhost-user-net --tap mtapN ARGS`` inside ``ns``, on a new TAP on ``bridge``
    for every hop."""

    def start(hop: int, directory: Path) -> Backend:
        tap = _hop_tap(ns, bridge, hop)
        d = spawn_net_for_qemu(ns, directory, *args, tap=tap)
        return Backend(
            f"vhost-user-net (hop {hop})",
            nw.vhost_user_net_args(d.sockets[0], mac=mac),
            d,
            info={"tap": tap},
        )

    return start


def qemu_tap_net(ns: NetNs, bridge: str, mac: str) -> BackendFactory:
    """QEMU's own virtio-net on a new TAP on ``bridge`` for every hop (no process of its
    own; the QEMU must run in ``ns``: :class:`Migration` ``exec_prefix``)."""

    def start(hop: int, directory: Path) -> Backend:
        tap = _hop_tap(ns, bridge, hop)
        return Backend(f"QEMU tap (hop {hop})", nw.tap_nic_args(tap, mac=mac), info={"tap": tap})

    return start


# =========================================================================================
# QEMU processes and hops
# =========================================================================================


@dataclass
class Vm:
    """One QEMU process of the migration: hop 0 booted the guest, every later one was
    started with ``-incoming defer`` and received it."""

    hop: int
    guest: qemu.Guest
    qmp: Qmp
    backends: list[Backend]
    quit_at: float | None = None

    def status(self) -> str:
        st: dict[str, Any] = self.qmp.execute("query-status")
        return str(st.get("status"))

    def running(self) -> bool:
        return self.guest.running()

    def qemu_output(self) -> str:
        """The console file: the guest's serial output and QEMU's own messages."""
        return self.guest.output()


@dataclass
class HopStats:
    """One migration, source QEMU ``hop - 1`` to destination ``hop``; times in ms as
    QEMU reports them (``query-migrate``), wall times in seconds on the host."""

    hop: int
    status: str = ""
    total_ms: int | None = None
    downtime_ms: int | None = None
    setup_ms: int | None = None
    ram_transferred: int | None = None
    ram_total: int | None = None
    ram_normal_pages: int | None = None
    dirty_sync_count: int | None = None
    mbps: float | None = None
    #: destination QEMU + back ends started until it listened for the migration
    dst_start_s: float = 0.0
    #: from ``migrate`` until the source said ``completed``
    migrate_s: float = 0.0
    #: from the source's ``completed`` until the destination said ``running``
    resume_s: float = 0.0
    #: quitting the source QEMU and stopping its back ends
    teardown_s: float = 0.0
    error: str = ""

    def row(self) -> str:
        mib = (self.ram_transferred or 0) / (1 << 20)
        return (
            f"hop {self.hop}: {self.status} total {self.total_ms} ms, downtime "
            f"{self.downtime_ms} ms, setup {self.setup_ms} ms, {mib:.1f} MiB sent, "
            f"{self.dirty_sync_count} dirty syncs; host: dst up {self.dst_start_s:.2f}s, "
            f"migrate {self.migrate_s:.2f}s, dst running +{self.resume_s:.2f}s, "
            f"src down {self.teardown_s:.2f}s" + (f"; {self.error}" if self.error else "")
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


class MigrationFailed(AssertionError):
    """A hop ended in ``failed`` (or did not end)."""


class Migration:
    """A guest moved between QEMU processes: :meth:`boot` starts the first one,
    :meth:`hop` moves it to a fresh one, :meth:`close` kills whatever is left.

    ``backends`` are started for every QEMU, in order, before it (files in
    ``<workdir>/hop<N>/``); ``exec_prefix`` wraps QEMU's argv (``ns.exec_args`` for a
    QEMU that opens TAPs itself); ``accel`` replaces ``-accel tcg`` (e.g.
    ``tcg,thread=single``)."""

    def __init__(
        self,
        workdir: Path,
        base: Path,
        script: str,
        backends: Sequence[BackendFactory],
        *,
        files: dict[str, bytes] | None = None,
        mem_mb: int = 512,
        exec_prefix: Callable[[Sequence[str]], list[str]] | None = None,
        parameters: dict[str, Any] | None = None,
        accel: str = "tcg",
    ) -> None:
        self.workdir = workdir
        self.initrd = build.make_initrd(base, script, workdir / "guest.initrd", files)
        self.factories = list(backends)
        self.mem_mb = mem_mb
        self.exec_prefix = exec_prefix
        self.parameters = dict(MIGRATE_PARAMETERS if parameters is None else parameters)
        self.accel = accel
        self.vms: list[Vm] = []
        self.hops: list[HopStats] = []
        self.stop_errors: list[str] = []
        self.console: MigratingConsole | None = None

    @property
    def current(self) -> Vm:
        return self.vms[-1]

    # --- starting a QEMU ---
    def _start_vm(self, hop: int, incoming: bool) -> Vm:
        directory = self.workdir / f"hop{hop}"
        directory.mkdir(exist_ok=True)
        backends: list[Backend] = []
        try:
            for factory in self.factories:
                backends.append(factory(hop, directory))
            qmp_path = self.workdir / f"q{hop}.qmp"
            extra = [a for b in backends for a in b.qemu_args]
            extra += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
            if incoming:
                extra += ["-incoming", "defer"]
            g = qemu.Guest(
                build.kernel_path(),
                self.initrd,
                extra,
                mem_mb=self.mem_mb,
                shared_mem=True,
                log_path=self.workdir / f"vm{hop}.console.log",
                start=False,
            )
            i = g.args.index("-accel")
            g.args[i + 1] = self.accel
            if self.exec_prefix is not None:
                g.args = self.exec_prefix(g.args)
            g.start()
            try:
                qmp = Qmp(qmp_path, alive=g.running)
            except BaseException:
                g.kill()
                raise RuntimeError(
                    f"QEMU of hop {hop} did not come up:\n{g.output()[-3000:]}"
                ) from None
        except BaseException:
            for b in reversed(backends):
                b.stop()
            raise
        vm = Vm(hop, g, qmp, backends)
        self.vms.append(vm)
        return vm

    def boot(self) -> Vm:
        """Start the first QEMU (hop 0) and its back ends; the guest boots."""
        if self.vms:
            raise RuntimeError("already booted")
        vm = self._start_vm(0, incoming=False)
        self.console = MigratingConsole(vm.guest)
        return vm

    # --- one hop ---
    def hop(self) -> HopStats:
        """Move the guest from the current QEMU to a new one; the old QEMU quits and
        its back ends stop. Raises :class:`MigrationBlocked` when ``migrate`` is
        refused and :class:`MigrationFailed` when it fails (both QEMUs are left for
        :meth:`close`, so their output can be read)."""
        src = self.current
        n = src.hop + 1
        stats = HopStats(n)
        self.hops.append(stats)
        t0 = time.monotonic()
        dst = self._start_vm(n, incoming=True)
        uri = f"unix:{self.workdir / f'm{n}.sock'}"
        dst.qmp.execute("migrate-incoming", uri=uri)
        stats.dst_start_s = time.monotonic() - t0
        if self.parameters:
            src.qmp.execute("migrate-set-parameters", **self.parameters)
        t1 = time.monotonic()
        try:
            src.qmp.execute("migrate", uri=uri)
        except QmpError as e:
            stats.status, stats.error = "refused", e.desc
            raise
        info = self._wait_migrated(src, stats, t1)
        stats.migrate_s = time.monotonic() - t1
        _fill(stats, info)
        if stats.status != "completed":
            stats.error = str(info.get("error-desc", ""))
            raise MigrationFailed(f"hop {n}: migration {stats.status}: {info}")
        t2 = time.monotonic()
        while (st := dst.status()) != "running":
            if time.monotonic() - t2 > RESUME_TIMEOUT or not dst.running():
                raise MigrationFailed(
                    f"hop {n}: destination {st}, not running, after {time.monotonic() - t2:.1f}s"
                )
            time.sleep(0.02)
        stats.resume_s = time.monotonic() - t2
        # the last of the guest's output on the source, then follow the destination's
        if self.console is not None:
            self.console.poll()
            self.console.follow(dst.guest)
        t3 = time.monotonic()
        self._quit(src)
        stats.teardown_s = time.monotonic() - t3
        return stats

    def _wait_migrated(self, src: Vm, stats: HopStats, t1: float) -> dict[str, Any]:
        while True:
            info: dict[str, Any] = src.qmp.execute("query-migrate")
            stats.status = str(info.get("status", ""))
            if stats.status in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() - t1 > MIGRATE_TIMEOUT:
                with contextlib.suppress(QmpError):
                    src.qmp.execute("migrate_cancel")
                raise MigrationFailed(
                    f"hop {stats.hop}: not completed after {MIGRATE_TIMEOUT}s: {info}"
                )
            time.sleep(0.05)

    def _quit(self, vm: Vm) -> None:
        with contextlib.suppress(QmpError, OSError):
            vm.qmp.execute("quit")
        vm.qmp.close()
        try:
            vm.guest.wait_exit(QEMU_QUIT_TIMEOUT)
        finally:
            vm.guest.kill()
            vm.quit_at = time.monotonic()
            for b in reversed(vm.backends):
                if (err := b.stop()) is not None:
                    self.stop_errors.append(err)

    # --- the end ---
    def close(self) -> None:
        """Kill every QEMU still running, then stop the back ends still running."""
        for vm in self.vms:
            vm.qmp.close()
            vm.guest.kill()
        for vm in reversed(self.vms):
            for b in reversed(vm.backends):
                if (err := b.stop()) is not None:
                    self.stop_errors.append(err)

    def blocked_reasons(self) -> list[str]:
        """What ``query-migrate`` of the current QEMU lists as blocking an outgoing
        migration (QEMU 6.0+: ``blocked-reasons``); empty when nothing blocks it."""
        info: dict[str, Any] = self.current.qmp.execute("query-migrate")
        return [str(r) for r in info.get("blocked-reasons", [])]

    def report(self) -> str:
        """Every hop's figures, every QEMU's console tail and every back end's log."""
        parts = [s.row() for s in self.hops]
        parts += [f"back end stop: {e}" for e in self.stop_errors]
        for vm in self.vms:
            rc = vm.guest.returncode if vm.guest.proc is not None else None
            parts.append(
                f"--- QEMU hop {vm.hop} (exit {rc}), {vm.guest.path} (tail) ---\n"
                + vm.qemu_output()[-2500:]
            )
            for b in vm.backends:
                if b.daemon is None:
                    continue
                text = b.log_text()
                lines = text.splitlines()
                if len(lines) > 120:
                    text = "\n".join([*lines[:30], "[...]", *lines[-80:]])
                parts.append(f"--- {b.name}, {b.daemon.log_path} ---\n{text}")
        return "\n".join(parts)


def _fill(stats: HopStats, info: dict[str, Any]) -> None:
    stats.total_ms = info.get("total-time")
    stats.downtime_ms = info.get("downtime")
    stats.setup_ms = info.get("setup-time")
    ram: dict[str, Any] = info.get("ram", {})
    stats.ram_transferred = ram.get("transferred")
    stats.ram_total = ram.get("total")
    stats.ram_normal_pages = ram.get("normal")
    stats.dirty_sync_count = ram.get("dirty-sync-count")
    stats.mbps = ram.get("mbps")


# =========================================================================================
# The console across hops
# =========================================================================================


class MigratingConsole(Console):
    """crash_harness's :class:`Console` (fio passes, I/O monitor ticks, kernel
    messages, fio reports) over the console files of every hop in turn: after a hop,
    :meth:`follow` switches to the destination's file, keeping what was read and a
    line the switch-over cut in two."""

    def __init__(self, guest: qemu.Guest) -> None:
        super().__init__(guest)
        self.switches: list[tuple[float, int]] = []  # (host time, lines read before it)
        #: the guest's uptime in its last I/O monitor tick or heartbeat (``HB uptime``)
        self.uptime = 0.0

    def _parse(self, now: float, line: str) -> None:
        super()._parse(now, line)
        if m := HEARTBEAT_RE.match(line):
            self.uptime = float(m[1])
        elif self.ticks and self.ticks[-1].seen == now:
            self.uptime = max(self.uptime, self.ticks[-1].uptime)

    def follow(self, guest: qemu.Guest) -> None:
        self.guest = guest
        self._offset = 0
        self.switches.append((time.monotonic(), len(self.lines)))

    def lines_since(self, t: float) -> list[str]:
        return [line for seen, line in self.lines if seen >= t]
