"""Network workloads for busybox test guests, and their host-side peers.

Guest side (shell for the busybox initramfs of :mod:`tests.guest.build`):

* :func:`host_peer_script` -- static address on the guest NIC, wait for carrier,
  ping the host side (the TAP/bridge address in the test's namespace), send
  ``/data/up`` to a host TCP receiver and/or fetch a file from a host TCP sender.
* :func:`pair_script` -- for two guests on one L2 segment (a bridge, later our
  ``--switch``): each listens with nc, pings the other, sends ``/data/tx`` to it
  and reports the md5 of what it received.

Both print ``RESULT key=value`` lines (:func:`tests.guest.qemu.results`):
``driver``, ``mac``, ``link`` (``up``), ``link_wait_ms``, ``reach_tries``,
``ping_tx``/``ping_rx``/``ping_loss`` (percent)/``ping_rtt`` (min/avg/max ms),
``<key>_md5``/``<key>_bytes``/``<key>_rc``/``<key>_tries`` per transfer
(``up``/``down`` for the host peer script, ``tx``/``rx`` for the pair), ``done=1``.

Host side: :class:`HostTcp` runs a one-connection TCP receiver or sender inside
the namespace (``ip netns exec NS python -c ...``) and reports the md5 of what
it received or sent.  The guest always connects to the host (the host listener
is up before the guest boots, so no guessing when the guest is listening).

NIC options for QEMU: :func:`tap_nic_args` (QEMU's own TAP back end with
virtio-net-pci or e1000, the baseline) and :func:`vhost_user_net_args` (our
vhost-user-net back end, ``vectors=0`` as FACTS.md requires under TCG).

busybox nc pitfall (the small nc of Debian's busybox): it exits as soon as the
*socket* reaches EOF, even with stdin not yet sent, and it shuts down its write
side when *stdin* reaches EOF.  So a listener whose stdin is at EOF (``</dev/null``)
half-closes at once and a sending peer nc would then quit early.  The guest's
listener therefore reads stdin from a FIFO nobody writes to (fd 3, opened
read-write so the open does not block); a guest that only *receives* as a
client may use ``</dev/null``.
"""

from __future__ import annotations

import hashlib
import json
import select
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.netns import NetNs

UP_FILE = "/data/up"  # host_peer_script: sent to the host
TX_FILE = "/data/tx"  # pair_script: sent to the peer guest

# shell helpers; the per-guest parameters are variables set before this text
NET_SH_LIB = r"""
. /lib/vhtest.sh
fail() { echo "FAIL: $*"; exit 1; }
# a long-lived listener must never see EOF on stdin (see the module docstring)
hold_stdin() { [ -p /tmp/hold ] || { mkfifo /tmp/hold && exec 3<>/tmp/hold; }; }

# net_up: address $ADDR on $IF (first non-lo interface if empty), optional $MTU,
# link up, wait up to $LINK_TIMEOUT s for carrier
net_up() {
    [ -n "$IF" ] || IF=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
    [ -n "$IF" ] && [ -d /sys/class/net/$IF ] \
        || fail "no network interface (have: $(ls /sys/class/net | tr '\n' ' '))"
    [ -w /proc/sys/net/ipv6/conf/$IF/disable_ipv6 ] \
        && echo 1 > /proc/sys/net/ipv6/conf/$IF/disable_ipv6
    result iface $IF
    result driver "$(basename "$(readlink /sys/class/net/$IF/device/driver)")"
    result mac "$(cat /sys/class/net/$IF/address)"
    [ -z "$MTU" ] || ip link set $IF mtu $MTU || fail "mtu $MTU"
    ip addr add $ADDR dev $IF || fail "ip addr add $ADDR dev $IF"
    ip link set $IF up || fail "ip link set $IF up"
    _t=0
    while [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" != 1 ]; do
        _t=$((_t + 1))
        [ $_t -le $((LINK_TIMEOUT * 10)) ] || { result link down; fail "no carrier on $IF"; }
        usleep 100000
    done
    result link up
    result link_wait_ms $((_t * 100))
}

# wait_reachable HOST TRIES: ping (1 s timeout) until HOST answers
wait_reachable() {
    _n=0
    until ping -c 1 -W 1 $1 >/dev/null 2>&1; do
        _n=$((_n + 1))
        [ $_n -lt $2 ] || { result reach_tries $_n; echo "FAIL: $1 unreachable"; return 1; }
        usleep 300000  # in case ping failed at once (no route yet)
    done
    result reach_tries $_n
}

# ping_report KEY HOST COUNT: KEY_tx, KEY_rx, KEY_loss (percent), KEY_rtt
ping_report() {
    ping -q -c $3 -i 0.2 -W 3 $2 > /tmp/ping.$1 2>&1
    _tx=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' /tmp/ping.$1)
    _rx=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping.$1)
    [ -n "$_tx" ] && [ -n "$_rx" ] || { cat /tmp/ping.$1; _tx=0; _rx=0; }
    result $1_tx $_tx
    result $1_rx $_rx
    if [ $_tx -gt 0 ]; then result $1_loss $(( (_tx - _rx) * 100 / _tx ))
    else result $1_loss 100; fi
    result $1_rtt "$(sed -n 's/^round-trip .* = \([^ ]*\) ms$/\1/p' /tmp/ping.$1)"
}

file_report() {
    result $1_md5 "$(md5sum < $2 | cut -d' ' -f1)"
    result $1_bytes "$(wc -c < $2)"
}

# send_file KEY FILE HOST PORT TRIES: connect (retrying while refused) and send FILE
send_file() {
    file_report $1 $2
    _n=0
    while :; do
        _n=$((_n + 1))
        timeout $NC_TIMEOUT nc -w 3 $3 $4 < $2 > /dev/null 2>/tmp/nc.$1.err && break
        _rc=$?
        [ $_n -lt $5 ] || { cat /tmp/nc.$1.err; result $1_rc $_rc; result $1_tries $_n; return 1; }
        sleep 1
    done
    result $1_rc 0
    result $1_tries $_n
}

# fetch_file KEY HOST PORT DEST TRIES: connect and store what the peer sends
fetch_file() {
    _n=0
    while :; do
        _n=$((_n + 1))
        timeout $NC_TIMEOUT nc -w 3 $2 $3 < /dev/null > $4 2>/tmp/nc.$1.err && break
        _rc=$?
        [ $_n -lt $5 ] || { cat /tmp/nc.$1.err; result $1_rc $_rc; result $1_tries $_n; return 1; }
        sleep 1
    done
    result $1_rc 0
    result $1_tries $_n
    file_report $1 $4
}

# recv_start PORT DEST: one-connection listener in the background ($RECV_PID)
recv_start() {
    hold_stdin
    timeout $LISTEN_TIMEOUT nc -l -p $1 <&3 > $2 2>/tmp/nc.listen.err &
    RECV_PID=$!
}

# recv_finish KEY DEST: wait for the listener, report what it got
recv_finish() {
    wait $RECV_PID
    _rc=$?
    [ $_rc = 0 ] || cat /tmp/nc.listen.err
    result $1_rc $_rc
    file_report $1 $2
}
"""

HOST_PEER_BODY = r"""
net_up
wait_reachable $HOST 20 || exit 1
ping_report ping $HOST $PINGS
[ -z "$SEND_PORT" ] || send_file up @UP_FILE@ $HOST $SEND_PORT 10
[ -z "$RECV_PORT" ] || fetch_file down $HOST $RECV_PORT /tmp/down 10
result done 1
"""

PAIR_BODY = r"""
net_up
recv_start $PORT /tmp/rx
wait_reachable $PEER $REACH_TRIES || exit 1
ping_report ping $PEER $PINGS
send_file tx @TX_FILE@ $PEER $PORT 30
recv_finish rx /tmp/rx
result done 1
"""


def _vars(**kv: object) -> str:
    return "".join(f"{k}={shlex.quote('' if v is None else str(v))}\n" for k, v in kv.items())


def host_peer_script(
    addr_cidr: str,
    host_ip: str,
    *,
    ping_count: int = 5,
    send_port: int | None = None,
    recv_port: int | None = None,
    iface: str = "",
    mtu: int | None = None,
    link_timeout: int = 20,
    nc_timeout: int = 60,
) -> str:
    """Guest talking to the host side: ``addr_cidr`` on ``iface`` (default: the
    first non-lo interface), ping ``host_ip`` ``ping_count`` times, then send
    :data:`UP_FILE` to ``host_ip:send_port`` (results ``up_*``) and/or fetch a
    file from ``host_ip:recv_port`` (results ``down_*``)."""
    head = _vars(
        IF=iface,
        ADDR=addr_cidr,
        MTU=mtu,
        LINK_TIMEOUT=link_timeout,
        NC_TIMEOUT=nc_timeout,
        LISTEN_TIMEOUT=nc_timeout,
        HOST=host_ip,
        PINGS=ping_count,
        SEND_PORT=send_port,
        RECV_PORT=recv_port,
    )
    return head + NET_SH_LIB + HOST_PEER_BODY.replace("@UP_FILE@", UP_FILE)


def pair_script(
    addr_cidr: str,
    peer_ip: str,
    *,
    port: int = 5001,
    ping_count: int = 5,
    iface: str = "",
    mtu: int | None = None,
    link_timeout: int = 20,
    reach_tries: int = 90,
    listen_timeout: int = 150,
    nc_timeout: int = 60,
) -> str:
    """One of two guests on one segment (run the same script on both, with the
    addresses swapped): listen on ``port``, wait until ``peer_ip`` answers pings
    (one a second, ``reach_tries`` times: the peer may boot later), ping it, send
    :data:`TX_FILE` to ``peer_ip:port`` (results ``tx_*``), wait for the peer's
    file (results ``rx_*``).  Neither guest powers off before the other got its
    file: each one's receive only finishes after the other's send."""
    head = _vars(
        IF=iface,
        ADDR=addr_cidr,
        MTU=mtu,
        LINK_TIMEOUT=link_timeout,
        NC_TIMEOUT=nc_timeout,
        LISTEN_TIMEOUT=listen_timeout,
        PEER=peer_ip,
        PORT=port,
        PINGS=ping_count,
        REACH_TRIES=reach_tries,
    )
    return head + NET_SH_LIB + PAIR_BODY.replace("@TX_FILE@", TX_FILE)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def check_ping(res: Mapping[str, str], count: int, key: str = "ping", max_loss: int = 0) -> None:
    """Assert the guest's ``ping_report`` saw ``count`` echoes with at most
    ``max_loss`` percent loss."""
    assert res.get("link") == "up", f"link not up: {res}"
    assert res.get(f"{key}_tx") == str(count), f"ping did not run: {res}"
    assert int(res[f"{key}_loss"]) <= max_loss, f"ping loss {res[f'{key}_loss']}%: {res}"


# ---------------------------------------------------------------------------
# QEMU NIC options
# ---------------------------------------------------------------------------


def mac_addr(n: int) -> str:
    """A locally administered-looking QEMU MAC, distinct per ``n`` (0..65535)."""
    return f"52:54:00:99:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"


def tap_nic_args(
    tap: str, *, model: str = "virtio-net-pci", mac: str, netdev_id: str = "t0"
) -> list[str]:
    """QEMU's own TAP back end on the existing TAP ``tap`` (QEMU must run in the
    namespace holding it) with a ``model`` NIC (``virtio-net-pci`` or ``e1000``)."""
    return [
        "-netdev",
        f"tap,id={netdev_id},ifname={tap},script=no,downscript=no",
        "-device",
        f"{model},netdev={netdev_id},mac={mac}",
    ]


def vhost_user_net_args(
    socket_path: str | Path, *, mac: str, netdev_id: str = "net0", chardev_opts: str = ""
) -> list[str]:
    """virtio-net-pci on a vhost-user back end listening on ``socket_path``
    (``vectors=0``: QEMU 7.2 under TCG segfaults with MSI-X here, see FACTS.md).
    The guest RAM must be shared (``qemu.Guest(shared_mem=True)``, the default).
    ``chardev_opts`` e.g. ``",reconnect=1"``."""
    chardev = f"{netdev_id}c"
    return [
        "-chardev",
        f"socket,id={chardev},path={socket_path}{chardev_opts}",
        "-netdev",
        f"vhost-user,id={netdev_id},chardev={chardev}",
        "-device",
        f"virtio-net-pci,netdev={netdev_id},vectors=0,mac={mac}",
    ]


# ---------------------------------------------------------------------------
# host side: one-connection TCP receiver / sender inside the namespace
# ---------------------------------------------------------------------------

HOST_TCP_HELPER = r"""
import hashlib, json, socket, sys
mode, ip, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port))
srv.listen(1)
srv.settimeout(timeout)
print("READY", flush=True)
conn, peer = srv.accept()
srv.close()
conn.settimeout(timeout)
h = hashlib.md5()
n = 0
if mode == "recv":
    while True:
        b = conn.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
else:
    with open(sys.argv[5], "rb") as f:
        data = f.read()
    conn.sendall(data)
    h.update(data)
    n = len(data)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(1 << 16):  # until the peer closes (busybox nc: right after our EOF)
        pass
conn.close()
print(json.dumps({"md5": h.hexdigest(), "bytes": n, "peer": peer[0]}), flush=True)
"""


@dataclass(frozen=True)
class TcpResult:
    md5: str
    nbytes: int
    peer: str


class HostTcp:
    """A one-connection TCP listener on ``ip:port`` inside ``ns``: ``"recv"``
    reads until EOF, ``"send"`` sends the file ``data_path`` and half-closes.
    The constructor returns once it listens; :meth:`result` waits for it to
    finish.  It gives up after ``timeout`` s without a connection or data (and is
    killed with the namespace anyway)."""

    def __init__(
        self,
        ns: NetNs,
        mode: str,
        ip: str,
        port: int,
        data_path: Path | None = None,
        *,
        timeout: float = 120.0,
    ) -> None:
        if mode not in ("recv", "send") or (mode == "send") != (data_path is not None):
            raise ValueError("mode 'recv', or 'send' with data_path")
        self.mode, self.ip, self.port = mode, ip, port
        argv = [sys.executable, "-I", "-c", HOST_TCP_HELPER, mode, ip, str(port), str(timeout)]
        if data_path is not None:
            argv.append(str(data_path))
        self.proc: subprocess.Popen[str] = ns.popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._wait_ready(10.0)

    @classmethod
    def receiver(cls, ns: NetNs, ip: str, port: int, **kw: Any) -> HostTcp:
        return cls(ns, "recv", ip, port, **kw)

    @classmethod
    def sender(cls, ns: NetNs, ip: str, port: int, data_path: Path, **kw: Any) -> HostTcp:
        return cls(ns, "send", ip, port, data_path, **kw)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if ready:
                line = self.proc.stdout.readline()
                if line.strip() == "READY":
                    return
                self.proc.kill()
                _, err = self.proc.communicate()
                raise RuntimeError(f"host tcp {self.mode} {self.ip}:{self.port}: {line}{err}")
            if left <= 0:
                self.proc.kill()
                raise RuntimeError(f"host tcp {self.mode} {self.ip}:{self.port}: not listening")

    def result(self, timeout: float = 30.0) -> TcpResult:
        """Wait for the transfer to end; raises if the helper failed."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(
                f"host tcp {self.mode} {self.ip}:{self.port} not done in {timeout}s: {err}"
            ) from None
        if self.proc.returncode != 0:
            raise AssertionError(
                f"host tcp {self.mode} {self.ip}:{self.port} failed "
                f"(rc={self.proc.returncode}): {err.strip()}"
            )
        d = json.loads(out.strip().splitlines()[-1])
        return TcpResult(str(d["md5"]), int(d["bytes"]), str(d["peer"]))


# ---------------------------------------------------------------------------
# one long TCP stream, guest -> host, verified byte for byte (live migration)
# ---------------------------------------------------------------------------

STREAM_CHUNK_FILE = "/data/chunk"

#: Guest shell (after :data:`NET_SH_LIB`): ``stream_start HOST PORT`` sends
#: :data:`STREAM_CHUNK_FILE` over one TCP connection again and again, ``$STREAM_GAP_US``
#: apart, until the host's :class:`StreamSink` answers on the same connection (a line,
#: ``STOP``); then the guest's nc sees EOF on stdin and half-closes, the sink reads to
#: the end and closes, and nc exits 0. ``stream_finish`` waits for that and prints
#: ``RESULT stream_rc`` (nc's status: not 0 when the connection broke),
#: ``stream_chunks`` (chunks handed to nc: the sink must have received exactly that
#: many) and ``stream_reply``. The sink's end of the connection is up before the guest
#: boots, so one connect suffices.
STREAM_SH_LIB = r"""
stream_start() {
    : > /tmp/stream.reply
    echo 0 > /tmp/stream.sent
    (
        _n=0
        while [ ! -s /tmp/stream.reply ]; do
            cat @CHUNK@ || break
            _n=$((_n + 1))
            echo $_n > /tmp/stream.sent
            usleep $STREAM_GAP_US
        done
    ) | nc $1 $2 > /tmp/stream.reply 2>/tmp/stream.err &
    STREAM_PID=$!
}
stream_finish() {
    wait $STREAM_PID
    _rc=$?
    [ $_rc = 0 ] || cat /tmp/stream.err
    result stream_rc $_rc
    result stream_chunks "$(cat /tmp/stream.sent)"
    result stream_reply "$(head -n 1 /tmp/stream.reply)"
}
""".replace("@CHUNK@", STREAM_CHUNK_FILE)

STREAM_SINK_HELPER = r"""
import hashlib, json, socket, sys, threading, time
ip, port, chunk_path, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
with open(chunk_path, "rb") as f:
    chunk = f.read()
L = len(chunk)
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port))
srv.listen(1)
srv.settimeout(timeout)
print("READY", flush=True)
conn, peer = srv.accept()
srv.close()
conn.settimeout(timeout)
t0 = time.monotonic()
print(f"CONNECTED {peer[0]} {t0}", flush=True)
def control():  # a line on stdin: ask the guest to stop
    if sys.stdin.readline():
        conn.sendall(b"STOP\n")
        print(f"STOP SENT {time.monotonic()}", flush=True)
threading.Thread(target=control, daemon=True).start()
pos, bad, error = 0, None, None
h = hashlib.md5()
last = t0
gaps = []  # (seconds after connect, seconds without data) over 0.5 s
reported = 0.0
while True:
    try:
        b = conn.recv(1 << 16)
    except OSError as e:
        error = repr(e)
        break
    now = time.monotonic()
    if not b:
        break
    if now - last > 0.5:
        gaps.append((round(last - t0, 3), round(now - last, 3)))
    last = now
    h.update(b)
    view = memoryview(b)
    while view and bad is None:
        i = pos % L
        n = min(len(view), L - i)
        if view[:n] != chunk[i : i + n]:
            bad = pos + next(k for k in range(n) if view[k] != chunk[i + k])
        pos += n
        view = view[n:]
    pos += len(view)
    if now - reported >= 0.2:
        print(f"RX {pos} {now}", flush=True)
        reported = now
conn.close()
print(f"RX {pos} {time.monotonic()}", flush=True)
print("DONE " + json.dumps({"bytes": pos, "chunks": pos / L, "first_bad": bad, "error": error,
      "md5": h.hexdigest(), "peer": peer[0], "gaps": gaps}), flush=True)
"""


@dataclass(frozen=True)
class StreamResult:
    nbytes: int
    chunks: float
    first_bad: int | None  # offset of the first byte that differs from the chunk pattern
    error: str | None  # the receive error that ended the stream (a reset, a timeout)
    md5: str
    peer: str
    gaps: list[tuple[float, float]]  # (seconds after connect, seconds without data)


class StreamSink:
    """The host end of :data:`STREAM_SH_LIB`: listens on ``ip:port`` inside ``ns`` (up
    when the constructor returns), takes one connection and checks every byte against
    ``chunk`` repeated; :meth:`stop` asks the guest to stop, :meth:`result` waits for
    the end. While it runs, :meth:`received` and :meth:`flowing_since` tell the test
    how far the stream got (host monotonic time, the same clock as the test's)."""

    def __init__(
        self, ns: NetNs, ip: str, port: int, chunk: bytes, workdir: Path, *, timeout: float = 60.0
    ) -> None:
        self.chunk = chunk
        path = workdir / "stream.chunk"
        path.write_bytes(chunk)
        argv = [sys.executable, "-I", "-c", STREAM_SINK_HELPER, ip, str(port), str(path)]
        self.proc: subprocess.Popen[str] = ns.popen(
            [*argv, str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.progress: list[tuple[float, int]] = []  # (host time, bytes so far)
        self.lines: list[str] = []
        self.connected_at: float | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(10.0):
            self.proc.kill()
            raise RuntimeError(f"stream sink {ip}:{port}: not listening: {self.lines}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            self.lines.append(line)
            if line == "READY":
                self._ready.set()
            elif line.startswith("RX "):
                _, n, t = line.split()
                self.progress.append((float(t), int(n)))
            elif line.startswith("CONNECTED "):
                self.connected_at = float(line.split()[2])
        self._ready.set()

    def received(self) -> int:
        return self.progress[-1][1] if self.progress else 0

    def flowing_since(self, t: float, nbytes: int = 1) -> bool:
        """Whether at least ``nbytes`` more arrived after host time ``t``."""
        before = [n for s, n in self.progress if s <= t]
        base = before[-1] if before else 0
        return self.received() - base >= nbytes and self.progress[-1][0] > t

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 30.0) -> StreamResult:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"stream sink not done in {timeout}s; last lines {self.lines[-5:]}"
            ) from None
        self._reader.join(5.0)
        err = self.proc.stderr.read() if self.proc.stderr is not None else ""
        done = [ln for ln in self.lines if ln.startswith("DONE ")]
        if self.proc.returncode != 0 or not done:
            raise AssertionError(
                f"stream sink failed (rc={self.proc.returncode}): {err.strip()} {self.lines[-5:]}"
            )
        d = json.loads(done[-1][5:])
        return StreamResult(
            int(d["bytes"]),
            float(d["chunks"]),
            d["first_bad"],
            d["error"],
            str(d["md5"]),
            str(d["peer"]),
            [(float(a), float(b)) for a, b in d["gaps"]],
        )
