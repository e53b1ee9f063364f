"""vhost-user-net restart under live guests (QEMU 7.2, TCG, ``reconnect=1``).

``test_daemon_killed_and_restarted[switch]``: two guests on the two ports of one
``vhost-user-net --switch`` daemon ping each other in a loop (one ``ping -c1 -W1``
at a time, each printed ``PING n t=ms OK`` or ``FAIL`` on the serial console) while
guest 0 also streams TCP to guest 1 (1 MiB per connection, back to back) so the
rings have chains in flight.  ``[tap]``: one guest on ``--tap`` doing the same
with the TAP's address in the namespace (a host-side sink takes the stream).

The test SIGKILLs the daemon three times while that traffic flows; each time it
checks that the socket files are left behind stale (a socket nobody listens on),
starts the daemon again with the *same* command line (it must replace the stale
files: new inodes), waits for QEMU to reconnect (the new daemon logs ``front end
connected`` on every port) and for every guest to print ``OK`` pings again -- no
guest reboot.  A guest counts link flaps through ``carrier_changes`` (QEMU sets
the link down when the back end goes and up when it is back), so it knows when
the third restart is behind it; then a file crosses (md5 checked on the other
side), the guests print the kernel's warnings (``dmesg``, level <= warning, and
every virtio line) and power off.  Nothing may look like ring corruption in the
guests (``is not a head``, ``Call Trace``, ``WARNING``, virtio_net errors, rx/tx
errors) or in the daemon logs (no WARNING/ERROR line, no ``ring broken``; every
"stopped:" line shows everything taken also used).

Packets in flight at the kill may be lost (that is allowed).  Chains the dead
daemon had taken but not used are offered again: QEMU restores each ring's
``last_avail_idx`` from the used index when the back end is gone ("vhost VQ N
ring restore failed" in QEMU's output is expected), and that is the base the new
daemon gets in SET_VRING_BASE.

Everything runs in a throw-away network namespace (tests/netns.py).  The daemon
runs with this tree on PYTHONPATH, whatever an editable install points at.

Run: ``python -m pytest tests/qemu/test_net_restart.py -q -m qemu -s`` (~20 s per
case under TCG on 2 cores).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.guest import net_workloads as nw
from tests.guest.workloads import pattern
from tests.netns import NetNs, assert_no_leaked_namespaces, list_namespaces
from tests.support.daemon import (
    QEMU_STOP_TIMEOUT,
    Daemon,
    Launch,
    Ready,
    installed_command,
    sockets_argv,
    this_tree_env,
)

from .harness import needs_netns, needs_qemu

pytestmark = [pytest.mark.qemu, needs_qemu, needs_netns]

RESTARTS = 3
IPS = ("10.99.2.2", "10.99.2.3")  # the two guests on the switch
TAP_HOST_IP, TAP_GUEST_IP = "10.99.3.1", "10.99.3.2"  # the TAP case
BULK_PORT, FINAL_PORT, BYE_PORT = 5011, 5012, 5013
BULK_CHUNKS = 16  # 64 KiB each, per bulk connection
FINAL_DATA = pattern(70, 512 * 1024 + 3)
# the guests' own deadline for the whole loop (they exit 1 when it passes)
LOOP_SECONDS = 100
OK_BEFORE_KILL = 3  # OK pings each guest prints before the next kill
OK_AFTER_LAST = 5  # OK pings a guest wants after the last restart before it stops
RING_SIZE = 256  # virtio-net-pci's default rx_queue_size and tx_queue_size
BOOT_TIMEOUT = 60.0
RESUME_TIMEOUT = 30.0
GUEST_TIMEOUT = 150.0

RecordProperty = Callable[[str, object], None]

# guest console lines that mean the virtio-net driver or ring is unhappy
GUEST_BAD = re.compile(
    r"is not a head|Call Trace|WARNING|BUG|Oops|NETDEV WATCHDOG|"
    r"virtio_net.*(error|fail|bad|unexpected)|unexpected used|"
    r"[Vv]irtio.*(corrupt|invalid)|used idx|too many",
)
STOPPED_RE = re.compile(r"stopped: avail idx (\d+), taken (\d+) \(\d+ not taken\), used idx (\d+)")
DAEMON_BAD = re.compile(r" (WARNING|ERROR|CRITICAL) |ring broken|Traceback")

RESTART_BODY = r"""
# ROLE: "sender" (guest 0 on the switch: bulk and the final file to its peer guest,
# then waits for the peer's bye), "receiver" (guest 1: sinks both, then says bye),
# "host" (one guest on the TAP: bulk and the final file to the host's listeners)
net_up
if [ "$ROLE" = receiver ]; then
    recv_start $FINAL_PORT /tmp/final
elif [ "$ROLE" = sender ]; then
    hold_stdin
    timeout $LISTEN_TIMEOUT nc -l -p $BYE_PORT <&3 > /tmp/bye 2>/dev/null &
    BYE_PID=$!
fi
wait_reachable $PEER $REACH_TRIES || exit 1

ms() { read _up _rest < /proc/uptime; echo $(( ${_up%.*} * 1000 + 1${_up#*.} * 10 - 1000 )); }
changes() { cat /sys/class/net/$IF/carrier_changes; }

# background bulk traffic to the peer: 1 MiB per TCP connection, back to back, so
# the rings have chains in flight when the daemon dies
if [ "$ROLE" = receiver ]; then
    ( while :; do nc -l -p $BULK_PORT <&3 > /dev/null 2>&1; done ) &
else
    ( n=0; while :; do
        if dd if=/dev/zero bs=64k count=$BULK_CHUNKS 2>/dev/null \
            | timeout 5 nc -w 2 $PEER $BULK_PORT > /dev/null 2>&1; then
            n=$((n + 1)); echo "BULK $n t=$(ms)"
        fi
        usleep 50000
      done ) &
fi
BULK_PID=$!

CH0=$(changes)
result carrier_changes0 $CH0
seq=0; ok=0; fail=0; ups=0; ok_up=0; carrier=1
end=$(( $(ms) + LOOP_SECONDS * 1000 ))
echo "LOOP START t=$(ms)"
while :; do
    c=$(cat /sys/class/net/$IF/carrier 2>/dev/null || echo 0)
    [ "$c" = "$carrier" ] || { carrier=$c; echo "LINK $c t=$(ms)"; }
    u=$(( ($(changes) - CH0) / 2 ))  # a restart is a carrier down and up
    [ $u = $ups ] || { ups=$u; ok_up=0; echo "UPS $ups t=$(ms)"; }
    seq=$((seq + 1))
    t=$(ms)
    if ping -c 1 -W 1 $PEER > /dev/null 2>&1; then
        ok=$((ok + 1)); ok_up=$((ok_up + 1)); echo "PING $seq t=$t OK"
        usleep 150000
    else
        fail=$((fail + 1)); echo "PING $seq t=$t FAIL"
        usleep 100000
    fi
    [ $ups -ge $RESTARTS ] && [ $ok_up -ge $OK_AFTER ] && break
    [ $(ms) -lt $end ] || { echo "LOOP DEADLINE"; break; }
done
echo "LOOP END t=$(ms)"
kill $BULK_PID 2>/dev/null
result pings $seq
result ping_ok $ok
result ping_fail $fail
result ups $ups
result ok_after_last $ok_up
result carrier_changes "$(changes)"

# the data path after the last restart: a file, md5 checked on the other side;
# the receiver then says bye so the sender does not power off under its pings
if [ "$ROLE" = receiver ]; then
    recv_finish final /tmp/final
    _n=0
    until echo bye | timeout 5 nc -w 2 $PEER $BYE_PORT > /dev/null 2>&1; do
        _n=$((_n + 1)); [ $_n -lt 20 ] || break; sleep 1
    done
    result bye_tries $_n
else
    send_file final @TX_FILE@ $PEER $FINAL_PORT 20
    if [ "$ROLE" = sender ]; then
        wait $BYE_PID
        result bye "$(cat /tmp/bye)"
    fi
fi
for _k in rx_packets tx_packets rx_errors tx_errors rx_dropped tx_dropped; do
    result $_k "$(cat /sys/class/net/$IF/statistics/$_k)"
done
echo "=== DMESG ==="
dmesg -r | grep -E '^<[0-4]>|virtio' | grep -v 'Linux version'
echo "=== DMESG END ==="
[ $ups -ge $RESTARTS ] && [ $ok_up -ge $OK_AFTER ] || exit 1
result done 1
"""


def restart_script(role: str, addr: str, peer: str) -> str:
    head = nw._vars(
        IF="",
        ADDR=f"{addr}/24",
        MTU=None,
        LINK_TIMEOUT=20,
        NC_TIMEOUT=60,
        LISTEN_TIMEOUT=int(GUEST_TIMEOUT),
        PEER=peer,
        ROLE=role,
        REACH_TRIES=60,
        BULK_PORT=BULK_PORT,
        BULK_CHUNKS=BULK_CHUNKS,
        FINAL_PORT=FINAL_PORT,
        BYE_PORT=BYE_PORT,
        LOOP_SECONDS=LOOP_SECONDS,
        RESTARTS=RESTARTS,
        OK_AFTER=OK_AFTER_LAST,
    )
    return head + nw.NET_SH_LIB + RESTART_BODY.replace("@TX_FILE@", nw.TX_FILE)


# host side of the TAP case: accepts bulk connections forever and discards them
HOST_SINK = r"""
import socket, sys, threading
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(8)
print("READY", flush=True)
def drain(c):
    with c:
        c.settimeout(30)
        try:
            while c.recv(1 << 16):
                pass
        except OSError:
            pass
while True:
    c, _ = srv.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"""


# --- the daemon, started again and again with the same arguments ----------------

#: logged once per port after the listen: an incarnation is up (it gets no probe)
PORT_RE = re.compile(r" INFO \S+: port \S+ \(MAC ")


class RestartableNet:
    """``vhost-user-net --socket-path net0.sock [--socket-path net1.sock] (--switch sw0 |
    --tap TAP)`` inside ``ns``, started again and again with the same launch (same
    command line, same sockets); every incarnation logs to its own file."""

    def __init__(self, ns: NetNs, workdir: Path, ports: int, backend: list[str]) -> None:
        cmd = installed_command("net")
        assert cmd is not None
        self.workdir = workdir
        self.sockets = [workdir / f"net{i}.sock" for i in range(ports)]
        # -v: the per-queue "stopped:" lines checked below are DEBUG for rx rings
        argv = sockets_argv(cmd, self.sockets, *backend, "-v")
        # No probe connection: the only front end an incarnation sees is QEMU.
        self.launch = Launch(
            tuple(argv),
            tuple(self.sockets),
            ready=Ready.STARTED,
            popen=ns.popen,
            start_new_session=True,
            env=this_tree_env(),
            stop_timeout=QEMU_STOP_TIMEOUT,
        )
        self.lives: list[Daemon] = []

    @property
    def current(self) -> Daemon:
        return self.lives[-1]

    def start(self) -> Daemon:
        """Start an incarnation; returns once it listens on every socket (its "port"
        lines are logged after the listen)."""
        d = self.launch.start(self.workdir / f"vhost-user-net.{len(self.lives)}.log")
        self.lives.append(d)
        d.wait_log(PORT_RE, len(self.sockets), 15.0)
        return d

    def kill(self) -> None:
        rc = self.current.kill9()
        assert rc == -signal.SIGKILL, rc

    def cleanup(self) -> None:
        for d in self.lives:
            if d.alive():
                d.kill9()


def file_id(path: Path) -> tuple[int, int]:
    """Inode and ctime: a file bound later differs even where the inode is reused."""
    st = os.lstat(path)
    return st.st_ino, st.st_ctime_ns


def assert_stale(path: Path) -> tuple[int, int]:
    """``path`` is still there, is a socket, and nobody listens on it; returns its
    :func:`file_id` (the restarted daemon must bind a new file there)."""
    st = os.lstat(path)  # FileNotFoundError: the dead daemon's socket file is gone
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
        pytest.raises(ConnectionRefusedError),
    ):
        s.connect(str(path))
    return file_id(path)


# --- console helpers -------------------------------------------------------------

PING_RE = re.compile(r"^PING (\d+) t=(\d+) (OK|FAIL)$", re.MULTILINE)
OK_RE = re.compile(r"^PING \d+ t=\d+ OK$", re.MULTILINE)
FAIL_RE = re.compile(r"^PING \d+ t=\d+ FAIL$", re.MULTILINE)


def wait_console(
    g: qemu.Guest, since: int, pattern_: re.Pattern[str], timeout: float, what: str
) -> tuple[float, re.Match[str]]:
    """Wait for ``pattern_`` in the console text after offset ``since``; returns
    (seconds waited, match)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        text = g.output()
        m = pattern_.search(text, since)
        if m:
            return time.monotonic() - t0, m
        if not g.running() or time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: no {pattern_.pattern!r} on {g.path.name} after "
                f"{time.monotonic() - t0:.1f}s (QEMU {'running' if g.running() else 'exited'})"
                f"\n--- console tail ---\n{text[-3000:]}"
            )
        time.sleep(0.05)


def count_ok(g: qemu.Guest, since: int) -> int:
    return sum(1 for m in PING_RE.finditer(g.output(), since) if m.group(3) == "OK")


def wait_oks(g: qemu.Guest, since: int, n: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while count_ok(g, since) < n:
        if not g.running() or time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: fewer than {n} OK pings on {g.path.name}\n--- console tail ---\n"
                f"{g.output()[-3000:]}"
            )
        time.sleep(0.05)


def section(text: str, start: str, end: str) -> str:
    i, j = text.find(start), text.find(end)
    return text[i + len(start) : j] if 0 <= i < j else ""


# --- fixtures --------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[NetNs]:
    with NetNs("netrestart") as ns:
        yield ns
    assert ns.name not in list_namespaces(), f"{ns.name} was not deleted"
    assert_no_leaked_namespaces()


# --- the test --------------------------------------------------------------------


@dataclass
class Setup:
    backend: list[str]  # the daemon's back-end arguments
    roles: list[tuple[str, str, str]]  # per guest: role, address, peer address
    final_rx: nw.HostTcp | None = None  # the TAP case: the host receives the file


def setup_switch(ns: NetNs) -> Setup:
    return Setup(["--switch", "sw0"], [("sender", IPS[0], IPS[1]), ("receiver", IPS[1], IPS[0])])


def setup_tap(ns: NetNs) -> Setup:
    tap = ns.add_tap("tap0", f"{TAP_HOST_IP}/24")
    ns.popen(
        [sys.executable, "-I", "-c", HOST_SINK, TAP_HOST_IP, str(BULK_PORT)],
        stdout=subprocess.DEVNULL,
    )
    rx = nw.HostTcp.receiver(ns, TAP_HOST_IP, FINAL_PORT, timeout=GUEST_TIMEOUT)
    return Setup(["--tap", tap], [("host", TAP_GUEST_IP, TAP_HOST_IP)], rx)


@pytest.mark.parametrize("segment", ["switch", "tap"])
def test_daemon_killed_and_restarted(
    segment: str,
    netns: NetNs,
    guest_base: Path,
    tmp_path: Path,
    record_property: RecordProperty,
) -> None:
    """SIGKILL ``vhost-user-net`` three times while its guests ping and stream TCP
    (two guests on a ``--switch``, or one guest and the host on a ``--tap``); the
    same command line each time replaces the stale sockets, QEMU reconnects, pings
    resume without a reboot, a file crosses intact at the end, and neither the
    guests nor the daemon report anything like ring corruption."""
    if installed_command("net") is None:
        pytest.skip("vhost-user-net back end not installed")
    t0 = time.monotonic()
    setup = setup_switch(netns) if segment == "switch" else setup_tap(netns)
    netns.check_isolated()
    daemon = RestartableNet(netns, tmp_path, len(setup.roles), setup.backend)
    guests: list[qemu.Guest] = []
    rounds: list[dict[str, float]] = []
    results: list[tuple[int, str, dict[str, str], str]] = []
    try:
        daemon.start()
        for i, (role, addr, peer) in enumerate(setup.roles):
            initrd = build.make_initrd(
                guest_base,
                restart_script(role, addr, peer),
                tmp_path / f"g{i}.initrd",
                {nw.TX_FILE: FINAL_DATA} if role != "receiver" else None,
            )
            g = qemu.Guest(
                build.kernel_path(),
                initrd,
                nw.vhost_user_net_args(
                    daemon.sockets[i], mac=nw.mac_addr(20 + i), chardev_opts=",reconnect=1"
                ),
                shared_mem=True,
                log_path=tmp_path / f"g{i}.console.log",
                start=False,
            )
            g.args = netns.exec_args(g.args)
            g.start()
            guests.append(g)
        for g in guests:
            wait_console(g, 0, re.compile(r"^LOOP START", re.MULTILINE), BOOT_TIMEOUT, "boot")
        t_loop = time.monotonic() - t0
        marks = [len(g.output()) for g in guests]
        for r in range(1, RESTARTS + 1):
            for g, since in zip(guests, marks, strict=False):
                wait_oks(g, since, OK_BEFORE_KILL, RESUME_TIMEOUT, f"round {r}: before the kill")
            # the kill: pings and bulk TCP in flight
            kill_marks = [len(g.output()) for g in guests]
            t_kill = time.monotonic()
            daemon.kill()
            stale = [assert_stale(sock) for sock in daemon.sockets]
            down = [
                wait_console(g, m, FAIL_RE, 15.0, f"round {r}: traffic stops after the kill")[0]
                for g, m in zip(guests, kill_marks, strict=False)
            ]
            # the same command line again: it replaces the stale socket files
            t_restart = time.monotonic()
            marks = [len(g.output()) for g in guests]
            b = daemon.start()
            t_listen = time.monotonic() - t_restart
            fresh = [file_id(sock) for sock in daemon.sockets]
            assert all(a != b for a, b in zip(stale, fresh, strict=False)), (
                "stale socket files not replaced"
            )
            b.wait_log(
                re.compile(r"net\d\.sock#1: front end connected"), len(guests), RESUME_TIMEOUT
            )
            t_conn = time.monotonic() - t_restart
            resume = []
            for g, m in zip(guests, marks, strict=False):
                wait_console(g, m, OK_RE, RESUME_TIMEOUT, f"round {r}: traffic resumes")
                resume.append(time.monotonic() - t_restart)
            rounds.append(
                {
                    "down_s": max(down),
                    "listen_s": t_listen,
                    "connected_s": t_conn,
                    "resumed_s": max(resume),
                    "outage_s": time.monotonic() - t_kill,
                }
            )
        for g in guests:
            rc, text = g.run_workload(timeout=GUEST_TIMEOUT)
            results.append((rc, text, qemu.results(text), g.output()))
        total = time.monotonic() - t0
    finally:
        for g in guests:
            g.kill()
    logs = "\n".join(f"--- {b.log_path.name} ---\n{b.log_text()}" for b in daemon.lives)
    try:
        daemon.current.check_clean_exit()  # SIGTERM: exit 0, no traceback, sockets removed
    finally:
        daemon.cleanup()

    print(f"\n[{segment}] loop started at {t_loop:.1f}s, total {total:.1f}s")
    for r, d in enumerate(rounds, 1):
        print(f"  restart {r}: " + " ".join(f"{k}={v:.2f}" for k, v in d.items()))
        for k, v in d.items():
            record_property(f"r{r}_{k}", round(v, 2))
    for i, (_, _, res, _) in enumerate(results):
        keys = ("pings", "ping_ok", "ping_fail", "ups", "rx_packets", "tx_packets")
        print(f"  guest {i}: " + " ".join(f"{k}={res.get(k)}" for k in keys))
    record_property("total_s", round(total, 2))

    for i, (rc, text, res, full) in enumerate(results):
        assert rc == 0 and res.get("done") == "1", f"guest {i} failed (rc={rc}):\n{text[-4000:]}"
        assert full.count(qemu.START_MARKER) == 1, f"guest {i} rebooted"
        # every restart showed in the guest: the link went down and came back, once
        ups = re.findall(r"^UPS (\d+)", text, re.MULTILINE)
        assert ups == [str(n) for n in range(1, RESTARTS + 1)], ups
        kernel = section(text, "=== DMESG ===", "=== DMESG END ===")
        bad = [ln for ln in (kernel + "\n" + text).splitlines() if GUEST_BAD.search(ln)]
        assert not bad, f"guest {i} console:\n" + "\n".join(bad)
        for k in ("rx_errors", "tx_errors"):
            assert res.get(k) == "0", res
        assert res.get("final_rc") == "0", text[-3000:]
    if segment == "switch":
        got = results[1][2]
        assert got.get("final_md5") == nw.md5(FINAL_DATA), got
        assert got.get("final_bytes") == str(len(FINAL_DATA)), got
        assert results[0][2].get("bye") == "bye", results[0][2]
    else:
        assert setup.final_rx is not None
        tcp = setup.final_rx.result()
        assert tcp.md5 == nw.md5(FINAL_DATA) and tcp.nbytes == len(FINAL_DATA), tcp
        assert tcp.peer == TAP_GUEST_IP, tcp

    # the daemon: QEMU reconnected to every incarnation on every port, and nothing
    # was logged as a problem (the SIGKILLed ones just stop mid-log)
    assert len(daemon.lives) == RESTARTS + 1
    for b in daemon.lives:
        for sock in daemon.sockets:
            assert f"{sock.name}#1: front end connected" in b.log_text(), b.log_text()
    # where each ring stood when a queue stopped (a call fd swap on reconnect, QEMU's
    # exit): in order, with everything taken also used, and never more than a ring
    stops = STOPPED_RE.findall(logs)
    assert stops, logs
    for avail, taken, used in ((int(a), int(t), int(u)) for a, t, u in stops):
        assert taken == used and (avail - taken) % 65536 <= RING_SIZE, (avail, taken, used)
    problems = [ln for ln in logs.splitlines() if DAEMON_BAD.search(ln)]
    assert not problems, "daemon log problems:\n" + "\n".join(problems) + "\n" + logs
