"""virtio-net: feature bits, config space, and the host back ends (TAP, switch).

Frames never pass through Python. Each back end owns an *engine*: one thread
looping in C (devices/net/net.c) over a set of queue pairs. A TAP port's engine
serves that port's pairs, each with its own TAP queue; a switch's engine
serves the pairs of every port on the switch, so a frame goes from one
guest's tx ring to another guest's rx ring in one copy. When a queue starts
or stops, the engine is stopped (its pass completes), rebuilt from the active
queues, and started again: queue changes are rare, and the engine never sees
a queue being torn down under it.

Queues of a virtio-net device, as the back end sees them: receiveq0, transmitq0,
receiveq1, ... (QEMU keeps the control queue to itself).

After a live migration the network must learn where the guest went. A guest that
negotiated GUEST_ANNOUNCE announces itself: QEMU sets VIRTIO_NET_S_ANNOUNCE in the
config space it keeps (QEMU never reads ours for vhost-user-net), the guest sends
gratuitous ARPs through its tx ring and acks on the control queue, both QEMU's
business. For a guest that did not, QEMU sends VHOST_USER_SEND_RARP (protocol feature
RARP) and :meth:`NetDevice.announce` sends a RARP frame from the guest's MAC on its
behalf: into the TAP, so the host's bridge learns the guest's new port, or into the
switch, whose MAC table then points at this port and whose other ports get the
broadcast (learning switches behind them learn it too).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devices.net import limits
from devices.net._net import ffi, lib
from vhost.device import RING_FEATURES, Device
from vhost.errors import CORE_ERRORS, ErrorTable
from vhost.memory import GuestMemory
from vhost.metrics import MetricFamily
from vhost.virtqueue import RUN_ERRORS, RUN_STOPPED, VIRTIO_F_VERSION_1, Virtqueue

if TYPE_CHECKING:
    from devices.net._net import net_engine, net_port

log = logging.getLogger("vhost.net")

# virtio-net feature bits (virtio 1.x, 5.1.3)
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
# The guest announces itself after a migration (QEMU drives it over the control
# queue, which QEMU serves itself; it offers CTRL_VQ whatever the back end says).
VIRTIO_NET_F_GUEST_ANNOUNCE = 1 << 21
VIRTIO_NET_F_MQ = 1 << 22
VIRTIO_NET_S_LINK_UP = 1

OFFLOADS = (
    VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
)

DEFAULT_MTU = 1500
MAX_MTU = 65535 - 18
MAX_QUEUE_PAIRS: int = limits.MAX_QUEUE_PAIRS
MAX_ENGINE_PAIRS: int = limits.MAX_ENGINE_PAIRS  # queue pairs one engine (a switch) serves
MAC_AGE_SECONDS = 300
DEFAULT_BUSY_POLL_US = 50  # poll this long after the last frame before sleeping
MAX_BUSY_POLL_US = 1_000_000
ETH_OVERHEAD = 14 + 4  # Ethernet header + one VLAN tag

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETVNETHDRSZ = 0x800454D7
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

#: the frame errors net.c records, then the core's
NET_ERRORS = ErrorTable.from_c(lib.net_error_table, CORE_ERRORS)

# RARP (RFC 903) over Ethernet
ETH_P_RARP = 0x8035
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_RREQUEST = 3  # "request reverse"
RARP_FRAME_LEN = 60  # the shortest Ethernet frame, without its FCS


def rarp_frame(mac: bytes) -> bytes:
    """The frame that announces ``mac`` after a migration, laid out as QEMU's
    announce_self_create (net/announce.c) and DPDK's make_rarp_packet send it: a
    broadcast from ``mac``, a reverse request whose sender and target hardware
    addresses are ``mac`` and whose protocol addresses are 0.0.0.0, padded with zeros
    to the Ethernet minimum. Any learning bridge on the way learns ``mac``'s port from
    its source address; nothing answers it."""
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP)
    rarp = struct.pack(
        "!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_RREQUEST, mac, bytes(4), mac, bytes(4)
    )
    return (eth + rarp).ljust(RARP_FRAME_LEN, b"\0")


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC {text!r}: use six hex bytes like 52:54:00:12:34:56")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC {text!r}: use six hex bytes like 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise ValueError(f"bad MAC {text!r}: a multicast address cannot name a port")
    return mac


def default_mac(socket_path: str) -> bytes:
    """Stable per socket path; locally administered, unicast."""
    digest = hashlib.sha256(os.path.abspath(socket_path).encode()).digest()
    return bytes([0x02]) + digest[:5]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass
class _Slot:
    """One queue pair an engine serves: its port, its queues (None while not active) and
    its TAP queue (-1 on a switch)."""

    port: net_port
    rx: Virtqueue | None = None
    tx: Virtqueue | None = None
    tap_fd: int = -1


class Engine:
    """One C loop thread over a set of (port, pair) queue pairs."""

    def __init__(
        self, name: str, switch_mode: bool, busy_poll_us: int = DEFAULT_BUSY_POLL_US
    ) -> None:
        if not 0 <= busy_poll_us <= MAX_BUSY_POLL_US:
            raise ValueError(f"--busy-poll-us {busy_poll_us} is not in 0..{MAX_BUSY_POLL_US}")
        self.name = name
        self._e = ffi.new("struct net_engine *")
        self._e.busy_poll_us = busy_poll_us
        self._e.switch_mode = int(switch_mode)
        self._e.mac_age = MAC_AGE_SECONDS
        self._e.stop_fd = -1
        self._pairs: dict[tuple[int, int], _Slot] = {}  # by (port id, pair index)
        self._thread: threading.Thread | None = None

    @property
    def handle(self) -> net_engine:
        return self._e

    def set_queue(
        self, port: net_port, pair: int, is_tx: bool, q: Virtqueue | None, tap_fd: int = -1
    ) -> None:
        key = (int(port.id), pair)
        if q is not None and key not in self._pairs and len(self._pairs) >= MAX_ENGINE_PAIRS:
            raise ValueError(
                f"{self.name} is full: one engine serves at most {MAX_ENGINE_PAIRS} queue pairs"
            )
        self.stop()
        slot = self._pairs.setdefault(key, _Slot(port))
        if is_tx:
            slot.tx = q
        else:
            slot.rx = q
        slot.tap_fd = tap_fd
        if slot.rx is None and slot.tx is None:
            del self._pairs[key]
        self.start()

    def start(self) -> None:
        if self._thread is not None:
            return
        e = self._e
        active = [v for _, v in sorted(self._pairs.items())]
        if not active:
            # Nothing runs: an announcement still waiting is for ports that stopped
            # (their front end went); the next start must not act on it.
            lib.net_drop_announcements(e)
            return
        for i, slot in enumerate(active):
            p = e.pairs[i]
            p.port = slot.port
            p.rx = slot.rx.handle if slot.rx is not None else ffi.NULL
            p.tx = slot.tx.handle if slot.tx is not None else ffi.NULL
            p.tap_fd = slot.tap_fd
            p.rx_starved = 0
            p.rx_touched = 0
        e.npairs = len(active)
        lib.net_clear_macs(e)  # entries name pair slots, which just moved
        e.stop = 0
        e.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        queues = [q for slot in active for q in (slot.rx, slot.tx) if q is not None]
        self._thread = threading.Thread(
            target=self._serve, args=(queues,), name=f"net-{self.name}", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def post_announce(self, port: net_port, frame: bytes) -> None:
        """Have the engine thread send ``frame`` as if ``port`` had (switch mode): at its
        next pass, or after a restart when it is being rebuilt meanwhile. One frame per
        port waits at a time (a newer one replaces it)."""
        if lib.net_post_announce(self._e, port.id, frame, len(frame)) != 0:
            raise ValueError(
                f"{self.name}: cannot queue a {len(frame)}-byte announcement "
                f"(at most {lib.NET_ANNOUNCE_MAX_LEN} bytes, one per port)"
            )

    def stop(self) -> None:
        if self._thread is None:
            return
        lib.net_request_stop(self._e)
        self._thread.join()
        self._thread = None
        os.close(self._e.stop_fd)
        self._e.stop_fd = -1

    def _serve(self, queues: list[Virtqueue]) -> None:
        while True:
            rc = lib.net_run(self._e)
            for q in queues:
                q.report_new_errors()
            if rc == RUN_ERRORS:
                continue
            if rc != RUN_STOPPED:
                log.error("net engine %s stopped (code %d)", self.name, rc)
            return


class TapBackend:
    """A TAP device (existing or created), one TAP queue per queue pair."""

    def __init__(self, name: str, pairs: int, busy_poll_us: int = DEFAULT_BUSY_POLL_US) -> None:
        self.name = name
        self.fds: list[int] = []
        if not 0 < len(name.encode()) < 16:
            raise ValueError(f"--tap {name!r}: an interface name has 1 to 15 bytes")
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if pairs > 1 else 0)
        try:
            for _ in range(pairs):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self.fds.append(fd)
                ifr = struct.pack("16sH22x", name.encode(), flags)
                fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            self.close()
            raise ValueError(f"--tap {name}: {e.strerror}") from None
        self.engine = Engine(f"tap-{name}", switch_mode=False, busy_poll_us=busy_poll_us)

    def configure(self, hdr_len: int, features: int) -> None:
        """Header size and the offloads the guest accepts (TAP to guest direction)."""
        offload = 0
        if features & VIRTIO_NET_F_GUEST_CSUM:
            offload |= TUN_F_CSUM
            if features & VIRTIO_NET_F_GUEST_TSO4:
                offload |= TUN_F_TSO4
            if features & VIRTIO_NET_F_GUEST_TSO6:
                offload |= TUN_F_TSO6
        for fd in self.fds:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", hdr_len))
            fcntl.ioctl(fd, TUNSETOFFLOAD, offload)

    def write_frame(self, frame: bytes) -> None:
        """Send ``frame`` to the host through the TAP, as if the guest had sent it.
        The fd is non-blocking and a TAP write never waits (the kernel takes the frame
        or drops it), so this may run on the event loop. The virtio-net header in front
        is the size the TAP expects now (set at queue start; until then the kernel's
        default, or what the last user of a persistent TAP left)."""
        if not self.fds:
            raise ValueError(f"TAP {self.name} is closed")
        fd = self.fds[0]
        try:
            got = fcntl.ioctl(fd, TUNGETVNETHDRSZ, struct.pack("i", 0))
            (hdr_len,) = struct.unpack("i", got)
            os.write(fd, bytes(hdr_len) + frame)  # flags 0, GSO_NONE: a plain frame
        except OSError as e:
            raise ValueError(f"TAP {self.name}: cannot send a frame: {e.strerror}") from None

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class Switch:
    """A learning L2 switch: every port naming it shares one engine."""

    _ids = 0

    def __init__(self, name: str, busy_poll_us: int = DEFAULT_BUSY_POLL_US) -> None:
        self.name = name
        self.engine = Engine(f"switch-{name}", switch_mode=True, busy_poll_us=busy_poll_us)

    def next_port_id(self) -> int:
        Switch._ids += 1
        return Switch._ids


@dataclass(frozen=True)
class NetOptions:
    mac: bytes
    num_queue_pairs: int = 1
    mtu: int = DEFAULT_MTU


class NetDevice(Device):
    errors = NET_ERRORS
    supports_rarp = True

    def __init__(
        self, opts: NetOptions, tap: TapBackend | None = None, switch: Switch | None = None
    ) -> None:
        if (tap is None) == (switch is None):
            raise ValueError("a net port needs exactly one of a TAP or a switch")
        if not 1 <= opts.num_queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"--num-queues {opts.num_queue_pairs} is not in 1..{MAX_QUEUE_PAIRS}")
        if not 68 <= opts.mtu <= MAX_MTU:
            raise ValueError(f"--mtu {opts.mtu} is not in 68..{MAX_MTU}")
        self.opts = opts
        self.tap = tap
        self.switch = switch
        self.engine = tap.engine if tap else switch.engine  # type: ignore[union-attr]
        self.port = ffi.new("struct net_port *")
        self.port.id = switch.next_port_id() if switch else 0

    @property
    def features(self) -> int:
        f = (
            RING_FEATURES
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MTU
            | VIRTIO_NET_F_GUEST_ANNOUNCE
        )
        if self.opts.num_queue_pairs > 1:
            f |= VIRTIO_NET_F_MQ
        if self.tap is not None:
            f |= OFFLOADS  # the TAP does checksums and segmentation, not us
        return f

    @property
    def num_queues(self) -> int:
        return 2 * self.opts.num_queue_pairs

    @property
    def queue_num_reply(self) -> int:
        return self.opts.num_queue_pairs  # for net, GET_QUEUE_NUM counts queue pairs

    def config_space(self) -> bytes:
        # status: LINK_UP only. VIRTIO_NET_S_ANNOUNCE lives in QEMU's own copy of the
        # config space (virtio-net reads a back end's only for vDPA), set and cleared
        # there around the guest's announcement.
        return struct.pack(
            "<6sHHH", self.opts.mac, VIRTIO_NET_S_LINK_UP, self.opts.num_queue_pairs, self.opts.mtu
        )

    def buffers_wait_for_data(self, queue_index: int) -> bool:
        return queue_index % 2 == 0  # rx queues: 0, 2, 4, ...

    def start_queue(self, q: Virtqueue, memory: GuestMemory, features: int) -> None:
        self.queue_counters.attach(q)
        self.engine.stop()  # it reads the port settings changed below
        try:
            self._configure_port(features)
            q.activate(memory, features)
        except BaseException:
            self.engine.start()
            raise
        tap_fd = self.tap.fds[q.index // 2] if self.tap else -1
        self.engine.set_queue(self.port, q.index // 2, bool(q.index % 2), q, tap_fd)
        log.debug("%s: queue %d served (pair %d)", self.engine.name, q.index, q.index // 2)

    def stop_queue(self, q: Virtqueue) -> int:
        if q.active:
            tap_fd = self.tap.fds[q.index // 2] if self.tap else -1
            self.engine.set_queue(self.port, q.index // 2, bool(q.index % 2), None, tap_fd)
        return q.deactivate()

    def announce(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP: the guest with ``mac`` now runs behind this port and
        does not announce itself (it did not negotiate GUEST_ANNOUNCE), so QEMU asks
        us to (a few times: QEMU's announce rounds, 50 ms apart and growing)."""
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"SEND_RARP: {mac.hex(':')} is not a unicast MAC")
        frame = rarp_frame(mac)
        if self.tap is not None:
            self.tap.write_frame(frame)
            log.info("%s: announced %s (RARP into the TAP)", self.engine.name, format_mac(mac))
            return
        if not self.engine.running:
            # No port of the switch runs: no ring to deliver to, and the MAC table is
            # cleared when the engine starts again anyway.
            log.info(
                "%s: nothing to announce %s to (no port is running)",
                self.engine.name,
                format_mac(mac),
            )
            return
        self.engine.post_announce(self.port, frame)
        log.info(
            "%s: announced %s on port %d (MAC table, RARP to the other ports)",
            self.engine.name,
            format_mac(mac),
            self.port.id,
        )

    def _configure_port(self, features: int) -> None:
        hdr_len = 12 if features & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) else 10
        p = self.port
        p.hdr_len = hdr_len
        p.max_frame = self.opts.mtu + ETH_OVERHEAD
        p.mergeable = int(bool(features & VIRTIO_NET_F_MRG_RXBUF))
        p.guest_gso = int(bool(features & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6)))
        p.host_gso = int(bool(features & (VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6)))
        if self.tap is not None:
            self.tap.configure(hdr_len, features)

    def port_stats(self) -> dict[str, int]:
        s = self.port.stats
        return {
            k: getattr(s, k)
            for k in (
                "tx_packets",
                "tx_bytes",
                "tx_dropped",
                "rx_packets",
                "rx_bytes",
                "rx_dropped",
                "rx_no_buffers",
                "flooded",
            )
        }

    def queue_stats(self, queue_index: int) -> dict[str, Any]:
        return self.port_stats() if queue_index == 0 else {}

    def metrics(self) -> list[MetricFamily]:
        """The port's counters (the engine counts per port, not per queue pair), and
        the switch's MAC table."""
        s = self.port.stats
        frames = MetricFamily(
            "vhost_net_frames_total",
            "frames moved (direction tx: sent by the guest, rx: delivered to the guest)",
            "counter",
        )
        frames.add(s.tx_packets, direction="tx")
        frames.add(s.rx_packets, direction="rx")
        nbytes = MetricFamily(
            "vhost_net_bytes_total",
            "bytes of those frames (Ethernet header on, virtio-net header off)",
            "counter",
        )
        nbytes.add(s.tx_bytes, direction="tx")
        nbytes.add(s.rx_bytes, direction="rx")
        drops = MetricFamily(
            "vhost_net_dropped_frames_total", "frames dropped, by reason", "counter"
        )
        for reason, n in (
            ("tx_invalid", s.drop_tx_invalid),
            ("tx_tap_refused", s.drop_tx_tap),
            ("rx_no_buffers", s.drop_rx_no_buffers),
            ("rx_queue_down", s.drop_rx_queue_down),
            ("rx_buffers_too_small", s.drop_rx_small_buffers),
            ("rx_truncated", s.drop_rx_truncated),
        ):
            drops.add(n, reason=reason)
        starved = MetricFamily(
            "vhost_net_rx_no_buffers_total",
            "times a frame was ready for the guest and it had no rx buffers posted "
            "(a TAP keeps the frame, a switch drops it)",
            "counter",
        )
        starved.add(s.rx_no_buffers)
        fams = [frames, nbytes, drops, starved]
        if self.switch is not None:
            flooded = MetricFamily(
                "vhost_net_flooded_frames_total",
                "frames the guest sent that the switch flooded to every other port "
                "(broadcast, multicast or an unknown destination)",
                "counter",
            )
            flooded.add(s.flooded)
            macs = MetricFamily(
                "vhost_net_switch_mac_entries",
                "MAC addresses the switch has learnt and not aged out",
                "gauge",
                shared=True,
            )
            macs.add(lib.net_mac_table_size(self.engine.handle), switch=self.switch.name)
            fams += [flooded, macs]
        return fams

    def stats_line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.port_stats().items())

    def close(self) -> None:
        if self.tap is not None:
            self.engine.stop()
            self.tap.close()
