"""Our back ends under libvirt 9.0: a TCG domain defined and started with virsh, its
disk a ``<disk type='vhostuser'>`` served by ``vhost-user-blk``, its NIC an
``<interface type='vhostuser'>`` served by ``vhost-user-net`` on a TAP in a network
namespace the test makes (addresses 10.99.14.0/24 exist only there). libvirt runs its
QEMU as user libvirt-qemu, so both daemons give their sockets that group
(``--socket-group libvirt-qemu``: mode 0660).

One defined domain, two boots (docs/libvirt.md has the XML and the figures):

* boot 1 -- the guest pings the TAP's address, then runs fio passes on /dev/vda
  (random writes of mixed sizes, O_DIRECT, libaio, every block verified with crc32c:
  workloads.FIO_VERIFY_LOOP_SH) with one ping every half second alongside. Under the
  running domain the test SIGKILLs vhost-user-blk and starts it again on the same
  socket, then does the same to vhost-user-net: the ``<reconnect>`` of each device's
  ``<source>`` makes QEMU connect again, and the guest's I/O must resume, the pass that
  spanned the restart verify, and the pings be answered again. Then ``virsh destroy``
  in the middle of the next pass.
* boot 2 -- ``virsh start`` with the same daemons still running: they serve the new
  QEMU. The stop block the test wrote into the image ends the fio loop after one pass,
  which must verify; the guest pings again and powers off.

Passing also means: QEMU connected as libvirt-qemu's uid; no I/O error or ring
complaint from the guest kernel; every daemon still running at the end exits 0 on
SIGTERM and removes its socket; the namespace is gone.

Run: ``python -m pytest tests/libvirt -q -m qemu -s`` (``-s`` prints the timings).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import random
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.guest import net_workloads as nw
from tests.guest import workloads as wl
from tests.guest.workloads import MiB
from tests.netns import NetNs, assert_no_leaked_namespaces
from tests.qemu import crash_harness as ch
from tests.qemu.harness import needs_netns, needs_qemu
from tests.support.daemon import Daemon, Ready, spawn_blk_for_qemu, spawn_net_for_qemu

from .domain import DomainSpec, LibvirtGuest, no_msix_override, vhostuser_disk, vhostuser_interface
from .instance import PrivateLibvirt, why_not_supported

pytestmark = [
    pytest.mark.qemu,
    needs_qemu,
    needs_netns,
    pytest.mark.skipif(why_not_supported() is not None, reason=why_not_supported() or ""),
]

GROUP = "libvirt-qemu"  # libvirt's QEMU runs as user libvirt-qemu, group kvm + this
NAME = "vhtest-vhostuser"
IMG_SIZE = 64 * MiB
FIO_SIZE = 16 * MiB
CTL_OFF = IMG_SIZE - 4096  # the stop block, outside fio's region
STOP_MAGIC = b"VHOST-LIBVIRT-TEST-STOP"
HOST_IP, GUEST_IP = "10.99.14.1", "10.99.14.2"
TAP = "tap0"
MAC = nw.mac_addr(140)
PINGS = 5
KILL_DELAY = (0.5, 1.5)  # seconds of flowing I/O before a kill

BOOT_TIMEOUT = 120.0  # virsh start until fio's first pass has I/O flowing
RECONNECT_TIMEOUT = 20.0  # a daemon restarted until QEMU's connection is logged
RESUME_TIMEOUT = 30.0  # ... until the guest's disk I/O or pings resume
PASS_TIMEOUT = 90.0  # the pass in progress until it ends
FINISH_TIMEOUT = 150.0  # boot 2: virsh start until the guest has powered off
DAEMON_TIMEOUT = 15.0

#: the guest's ping monitor: guest uptime, whether the ping was answered
NET_RE = re.compile(r"^NET (\d+\.\d+) (ok|lost)$")
QEMU_CONNECTED_RE = re.compile(r"front end connected: pid \d+ \(qemu-system-x86\), uid (\d+)")

RecordProperty = Callable[[str, object], None]

SCRIPT_BODY = r"""
KMSG='virtio|I/O error|not a head|blk_update_request|Call Trace|blocked for more|BUG|Oops|NETDEV'
grep -iE "$KMSG" /dev/kmsg &
KMSG_PID=$!
[ -b $DEV ] || fail "no $DEV"
net_up
wait_reachable $HOST 20 || exit 1
ping_report ping $HOST $PINGS
# one ping every half second while the disk works: the host sees answers stop and resume
(
    while :; do
        if ping -c 1 -W 1 $HOST >/dev/null 2>&1; then _r=ok; else _r=lost; fi
        read -r _up _idle < /proc/uptime
        echo "NET $_up $_r"
        sleep 0.5
    done
) &
NETMON_PID=$!
io_monitor_start
fio_loop
io_monitor_stop
kill $NETMON_PID 2>/dev/null
ping_report ping2 $HOST $PINGS
kill $KMSG_PID 2>/dev/null
echo "=== DMESG BEGIN ==="
dmesg | grep -iE "$KMSG"
echo "=== DMESG END ==="
[ $FIO_RC = 0 ] && result done 1
exit $FIO_RC
"""


def guest_script() -> str:
    head = nw._vars(
        IF="",
        ADDR=f"{GUEST_IP}/24",
        MTU=None,
        LINK_TIMEOUT=20,
        HOST=HOST_IP,
        PINGS=PINGS,
    )
    head += wl.fio_verify_loop_vars("vda", FIO_SIZE, CTL_OFF, STOP_MAGIC, max_passes=50)
    # NET_SH_LIB sources /lib/vhtest.sh and defines fail()
    return head + nw.NET_SH_LIB + wl.FIO_VERIFY_LOOP_SH + SCRIPT_BODY


def _bad_kmsg(lines: list[str]) -> list[str]:
    return ch.bad_kmsg(lines)


# --- the daemons -----------------------------------------------------------------------


def start_blk(workdir: Path, n: int, sock: Path, image: Path) -> ch.Incarnation:
    """vhost-user-blk incarnation ``n`` on ``sock`` (log ``blk<n>.daemon.log``; -v:
    crash_harness reads where its queue started), up once it logged "ready": no probe,
    QEMU may be reconnecting (crash_harness's module docstring)."""
    d = spawn_blk_for_qemu(
        workdir,
        f"blk{n}",
        "-v",
        "--socket-group",
        GROUP,
        image=image,
        socket_path=sock,
        ready=Ready.STARTED,
    )
    inc = ch.Incarnation(n, d, time.monotonic())
    d.wait_log("ready: ", 1, DAEMON_TIMEOUT)
    return inc


def restart_net(old: Daemon, workdir: Path, n: int) -> Daemon:
    """The same vhost-user-net command line again (in the namespace, same socket),
    without a probe; up once it logged "ready"."""
    d = dataclasses.replace(old.launch, ready=Ready.STARTED).start(
        workdir / f"vhost-user-net.{n}.log"
    )
    d.wait_log("ready: ", 1, DAEMON_TIMEOUT)
    return d


def check_socket_for_libvirt(path: Path) -> None:
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode), path
    assert stat.S_IMODE(st.st_mode) == 0o660, f"{path}: mode {stat.S_IMODE(st.st_mode):o}"
    assert st.st_gid == grp.getgrnam(GROUP).gr_gid, f"{path}: gid {st.st_gid}"


def qemu_uids(log: str) -> list[int]:
    """The uid of each QEMU connection a daemon logged."""
    return [int(m) for m in QEMU_CONNECTED_RE.findall(log)]


# --- watching one boot -----------------------------------------------------------------


class Boot:
    """One boot of the domain: its console and the daemons serving it."""

    def __init__(self, guest: LibvirtGuest, blk: list[ch.Incarnation], net: list[Daemon]):
        self.guest = guest
        self.blk = blk  # shared with the test: the last is the live one
        self.net = net
        self.console = ch.Console(guest)  # type: ignore[arg-type]  # reads .path only

    def failed(self) -> str | None:
        c = self.console
        if bad := _bad_kmsg(c.kmsg()):
            return "the guest kernel said:\n" + "\n".join(bad)
        if (n := c.failed_pass()) is not None:
            return f"fio pass {n} failed (rc {c.pass_rcs[n]})"
        if not self.guest.qemu_alive():
            c.poll()
            if not c.finished():
                return f"QEMU is gone (domain {self.guest.state()})"
        if not self.blk[-1].daemon.alive():
            return f"vhost-user-blk exited with {self.blk[-1].daemon.proc.returncode}"
        if not self.net[-1].alive():
            return f"vhost-user-net exited with {self.net[-1].proc.returncode}"
        return None

    def wait_until(self, what: str, cond: Callable[[], bool], timeout: float) -> float:
        """Poll until ``cond()``; returns the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            self.console.poll()
            ch.poll_connection(self.blk[-1])
            if cond():
                return time.monotonic() - t0
            if (why := self.failed()) is not None:
                raise AssertionError(f"while waiting for {what}: {why}\n{self.report()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}\n{self.report()}"
                )
            time.sleep(0.05)

    def pings_since(self, t: float) -> list[str]:
        """The guest's monitor pings ("ok" or "lost") read after host time ``t``."""
        return [
            m[2] for seen, line in self.console.lines if seen >= t and (m := NET_RE.match(line))
        ]

    def disk_moved_since(self, t: float) -> bool:
        ticks = self.console.ticks_between(t, 1e18)
        return len(ticks) >= 2 and ticks[-1].done > ticks[0].done

    def report(self) -> str:
        c = self.console
        parts = [
            f"fio passes started {c.pass_started}, ended {c.pass_ended}, rcs {c.pass_rcs}",
            *c.fio_stderr()[-20:],
            "--- console (tail) ---",
            c.tail(40),
            "--- QEMU log (tail) ---",
            self.guest.lv.domain_log(self.guest.name)[-1500:],
        ]
        for inc in self.blk:
            parts.append(f"--- vhost-user-blk #{inc.n} (tail) ---\n{inc.log_text()[-1500:]}")
        for n, d in enumerate(self.net):
            parts.append(f"--- vhost-user-net #{n} (tail) ---\n{d.log_text()[-1500:]}")
        return "\n".join(parts)


# --- the scenario -----------------------------------------------------------------------


class Scenario:
    """The daemons, the domain and the figures of one run of the test."""

    def __init__(self, lv: PrivateLibvirt, ns: NetNs, workdir: Path) -> None:
        self.lv, self.ns, self.w = lv, ns, workdir
        self.image = workdir / "disk.img"
        self.blk_sock = workdir / "blk.sock"
        self.blk: list[ch.Incarnation] = []
        self.net: list[Daemon] = []
        self.guest: LibvirtGuest | None = None
        self.boot: Boot | None = None
        self.qemu_uid = pwd.getpwnam("libvirt-qemu").pw_uid
        self.times: dict[str, float] = {}
        self.lost_pings = 0
        self.passes_boot1 = 0
        self.rng = random.Random()

    @property
    def net_sock(self) -> Path:
        return self.net[0].socket_path

    def start_daemons(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(IMG_SIZE)
        self.ns.add_tap(TAP, f"{HOST_IP}/24")
        self.ns.check_isolated()
        self.blk.append(start_blk(self.w, 0, self.blk_sock, self.image))
        self.net.append(spawn_net_for_qemu(self.ns, self.w, "--socket-group", GROUP, tap=TAP))
        for sock in (self.blk_sock, self.net_sock):
            check_socket_for_libvirt(sock)

    def define(self, kernel: Path, base: Path) -> LibvirtGuest:
        initrd = build.make_initrd(base, guest_script(), self.w / "guest.initrd")
        spec = DomainSpec(
            NAME,
            kernel,
            initrd,
            self.w / f"{NAME}.console.log",
            devices=[vhostuser_disk(self.blk_sock), vhostuser_interface(self.net_sock, mac=MAC)],
            overrides=[no_msix_override()],
        )
        xml = self.w / "domain.xml"
        xml.write_text(spec.xml())
        self.lv.virsh("define", str(xml))
        self.guest = LibvirtGuest(self.lv, NAME, spec.console)
        return self.guest

    def start_boot(self) -> Boot:
        assert self.guest is not None
        self.guest.start()
        self.boot = Boot(self.guest, self.blk, self.net)
        return self.boot

    # --- boot 1 ---
    def boot1_restarts_then_destroy(self) -> None:
        boot = self.start_boot()
        c = boot.console
        self.times["boot1_io"] = boot.wait_until(
            "the first fio pass with I/O flowing",
            lambda: c.pass_started >= 1 and c.io_flowing(),
            BOOT_TIMEOUT,
        )
        res = qemu.results(c.text())
        assert res.get("driver") == "virtio_net" and res.get("mac") == MAC, res
        nw.check_ping(res, PINGS)
        # libvirt's QEMU, as libvirt-qemu, got through the sockets' group
        assert qemu_uids(self.blk[0].log_text()) == [self.qemu_uid], self.blk[0].log_text()
        assert qemu_uids(self.net[0].log_text()) == [self.qemu_uid], self.net[0].log_text()

        pass_at_kill = self.restart_blk(boot)
        self.restart_net(boot)
        # the pass that spanned the blk restart verified; destroy in the middle of the next
        boot.wait_until(
            f"fio pass {pass_at_kill} (across the restart) to end",
            lambda: c.pass_ended >= pass_at_kill,
            PASS_TIMEOUT,
        )
        boot.wait_until(
            "the next fio pass with I/O flowing",
            lambda: c.fio_running() and c.io_flowing(),
            PASS_TIMEOUT,
        )
        self.passes_boot1 = c.pass_ended
        problems = c.fio_pass_problems(FIO_SIZE)
        assert not problems, "\n".join(problems) + "\n" + boot.report()
        self.destroy(boot)

    def restart_blk(self, boot: Boot) -> int:
        """SIGKILL vhost-user-blk while fio runs and start it again on its socket; wait
        for QEMU to come back and the guest's I/O to resume. Returns the fio pass the
        kill landed in."""
        c = boot.console
        end = time.monotonic() + self.rng.uniform(*KILL_DELAY)
        boot.wait_until("I/O before the kill", lambda: time.monotonic() >= end, 10)
        boot.wait_until(
            "fio running with I/O flowing", lambda: c.fio_running() and c.io_flowing(), 30
        )
        pass_at_kill = c.pass_started
        done_at_kill = (c.last_tick() or ch.Tick(0, 0, 0, 0, 0)).done
        t_kill = time.monotonic()
        assert self.blk[-1].daemon.kill9() == -9
        assert ch.socket_state(self.blk_sock) == "stale"
        inc = start_blk(self.w, len(self.blk), self.blk_sock, self.image)
        self.blk.append(inc)
        check_socket_for_libvirt(self.blk_sock)
        boot.wait_until(
            "QEMU to reconnect to vhost-user-blk and start its queue",
            lambda: inc.queue_started is not None,
            RECONNECT_TIMEOUT,
        )
        self.times["blk_reconnected"] = (inc.connected or 0) - t_kill

        def resumed() -> bool:
            return any(t.done > done_at_kill for t in c.ticks_between(inc.connected or 0, 1e18))

        boot.wait_until("disk I/O after the vhost-user-blk restart", resumed, RESUME_TIMEOUT)
        self.times["blk_io_resumed"] = time.monotonic() - t_kill
        return pass_at_kill

    def restart_net(self, boot: Boot) -> None:
        """SIGKILL vhost-user-net and start it again on its socket; wait for QEMU to
        come back and the guest's pings to be answered again."""
        t_kill = time.monotonic()
        assert self.net[-1].kill9() == -9
        assert ch.socket_state(self.net_sock) == "stale"
        nd = restart_net(self.net[-1], self.w, len(self.net))
        self.net.append(nd)
        check_socket_for_libvirt(self.net_sock)
        boot.wait_until(
            "QEMU to reconnect to vhost-user-net",
            lambda: bool(qemu_uids(nd.log_text())),
            RECONNECT_TIMEOUT,
        )
        t_back = time.monotonic()
        self.times["net_reconnected"] = t_back - t_kill
        boot.wait_until(
            "pings answered after the vhost-user-net restart",
            lambda: "ok" in boot.pings_since(t_back),
            RESUME_TIMEOUT,
        )
        self.times["net_pings_resumed"] = time.monotonic() - t_kill
        self.lost_pings = boot.pings_since(t_kill).count("lost")

    def destroy(self, boot: Boot) -> None:
        """``virsh destroy`` mid-pass: both daemons see QEMU go and keep running."""
        t = time.monotonic()
        boot.guest.destroy()
        self.times["destroy"] = time.monotonic() - t
        for d in (self.blk[-1].daemon, self.net[-1]):
            d.wait_log("disconnected:", 1, DAEMON_TIMEOUT)
            assert d.alive(), d.log_text()
        c = boot.console
        c.poll()
        bad = _bad_kmsg(c.kmsg())
        assert not bad, "guest kernel:\n" + "\n".join(bad) + "\n" + boot.report()

    # --- boot 2 ---
    def boot2_same_daemons(self) -> None:
        """``virsh start`` again: the same daemons serve the new QEMU; one fio pass
        (the stop block is in the image) verifies, pings are answered, it powers off."""
        wl.request_stop(self.image, CTL_OFF, STOP_MAGIC)
        boot = self.start_boot()
        c = boot.console
        self.times["boot2_done"] = boot.wait_until(
            "the guest's workload to end", c.finished, FINISH_TIMEOUT
        )
        boot.guest.wait_shut_off(30)
        res = qemu.results(c.text())
        assert c.exit_rc == 0 and res.get("done") == "1", boot.report()
        assert res.get("passes") == "1" and res.get("fio_rc") == "0", res
        problems = c.fio_pass_problems(FIO_SIZE)
        assert not problems, "\n".join(problems) + "\n" + boot.report()
        nw.check_ping(res, PINGS)
        nw.check_ping(res, PINGS, key="ping2")
        bad = _bad_kmsg(c.kmsg() + c.section("DMESG"))
        assert not bad, "guest kernel:\n" + "\n".join(bad) + "\n" + boot.report()
        # boot 1's QEMU after the restart, then boot 2's
        for d in (self.blk[-1].daemon, self.net[-1]):
            assert qemu_uids(d.log_text()) == [self.qemu_uid] * 2, d.log_text()

    # --- the end ---
    def stop_daemons(self) -> None:
        """The live daemons must exit 0 on SIGTERM and remove their sockets; no daemon
        may have logged an error."""
        for d in (self.blk[-1].daemon, self.net[-1]):
            d.check_clean_exit()
        errors = [
            line
            for d in [*(i.daemon for i in self.blk), *self.net]
            for line in d.log_text().splitlines()
            if " ERROR " in line or "Traceback" in line
        ]
        assert not errors, "\n".join(errors)

    def cleanup(self) -> None:
        """After a failure too: no QEMU, no domain, no daemon of ours left (the net
        daemons go with the namespace)."""
        if self.guest is not None and self.guest.running():
            self.guest.destroy()
        self.lv.virsh("undefine", NAME, check=False)
        for inc in self.blk:
            if inc.daemon.alive():
                inc.daemon.stop()

    def summary(self, total: float) -> str:
        t = self.times
        return (
            f"[libvirt] boot 1 to flowing I/O {t['boot1_io']:.1f}s; blk killed: QEMU back "
            f"+{t['blk_reconnected']:.2f}s, I/O +{t['blk_io_resumed']:.2f}s; net killed: QEMU "
            f"back +{t['net_reconnected']:.2f}s, pings +{t['net_pings_resumed']:.2f}s "
            f"({self.lost_pings} lost); {self.passes_boot1} pass(es) verified; virsh destroy "
            f"{t['destroy']:.2f}s; boot 2 start to powered off {t['boot2_done']:.1f}s; "
            f"total {total:.1f}s"
        )


# --- the test ---------------------------------------------------------------------------


def test_domain_on_our_disk_and_nic_survives_restarts_and_a_destroy(
    libvirt: PrivateLibvirt,
    lv_workdir: Path,
    lv_kernel: Path,
    fio_base: Path,
    record_property: RecordProperty,
) -> None:
    t0 = time.monotonic()
    with NetNs("lv") as ns:
        run = Scenario(libvirt, ns, lv_workdir)
        try:
            run.start_daemons()
            run.define(lv_kernel, fio_base)
            run.boot1_restarts_then_destroy()
            run.boot2_same_daemons()
            run.stop_daemons()
        except BaseException:
            if run.boot is not None:
                print("\n" + run.boot.report())
            raise
        finally:
            run.cleanup()
    assert_no_leaked_namespaces()
    total = time.monotonic() - t0
    print("\n" + run.summary(total))
    for k, v in run.times.items():
        record_property(k, round(v, 2))
    record_property("lost_pings", run.lost_pings)
    record_property("total_s", round(total, 1))
