"""The virtio-net driver of the test front end, and the Ethernet/IP frames it carries.

* Frames: Ethernet, IPv4/UDP (checksums filled in), ARP, and "tagged" frames of the
  IEEE 802 experimental ethertype whose payload names their sender and sequence number.
* :class:`VnetHdr` / :class:`NetConfig` -- struct virtio_net_hdr_mrg_rxbuf and
  struct virtio_net_config.
* :class:`NetPort` plays the guest's virtio-net driver: it connects a
  :class:`~tests.support.frontend.FrontEnd`, sets up receiveq/transmitq pairs, posts rx
  buffers (poisoned, so a header the device did not write shows), sends frames and
  reassembles received ones from their mergeable rx chains (:class:`RxFrame`). It kicks
  only when the device's avail_event asks for it, as Linux does, and waits on call
  notifications, so a device that forgets to ask or to signal makes a test time out.

Boundary: no assertions about the device here (only about this driver's own
bookkeeping); the tests make those. Frames on a TAP inside a namespace are
:mod:`tests.support.packet_agent`'s.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.frontend import ALL_FEATURES, BufferPool, DriverQueue, FrontEnd, GuestRam, MiB

# --- virtio-net (virtio 1.x, 5.1.3), as feature masks ----------------------------------
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
VIRTIO_NET_F_MQ = 1 << 22
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_NET_S_LINK_UP = 1
#: checksum and segmentation offloads (offered on a TAP port only)
NET_OFFLOADS = (
    VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
)
#: everything offered except the offloads: headers stay all-zero but for num_buffers
NO_OFFLOADS = ALL_FEATURES & ~NET_OFFLOADS

VNET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_*, num_buffers
VNET_HDR_LEN = VNET_HDR.size  # 12 with VERSION_1 or MRG_RXBUF
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
ETH_HLEN = 14
ETH_OVERHEAD = 18  # Ethernet header + one VLAN tag, what the daemon allows above the MTU
POISON = 0xA5
BROADCAST = b"\xff" * 6
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
#: IEEE 802 "local experimental" ethertype: frames no stack on the way reacts to
ETH_P_EXPERIMENTAL = 0x88B5
CONFIG = struct.Struct("<6sHHH")  # virtio_net_config: mac, status, max_virtqueue_pairs, mtu
#: taking a lock is a full memory barrier on x86 (virtio: the driver's mb() between
#: publishing avail->idx and reading the device's avail_event)
_FENCE = threading.Lock()


# =========================================================================================
# Frames
# =========================================================================================


def mac_bytes(text: str) -> bytes:
    return bytes(int(p, 16) for p in text.split(":"))


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def eth_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def tagged_frame(dst: bytes, src: bytes, seq: int, size: int = 64) -> bytes:
    """An experimental-ethertype frame of ``size`` bytes whose payload says who sent it
    and its sequence number, padded with bytes that depend on both."""
    if size < ETH_HLEN + 10:
        raise ValueError(f"a test frame needs at least {ETH_HLEN + 10} bytes")
    head = src + struct.pack("!I", seq)
    fill = bytes((seq * 7 + i + src[-1]) & 0xFF for i in range(size - ETH_HLEN - len(head)))
    return eth_frame(dst, src, ETH_P_EXPERIMENTAL, head + fill)


def frame_seq(frame: bytes) -> int:
    """The sequence number :func:`tagged_frame` put in ``frame``."""
    return int(struct.unpack_from("!I", frame, ETH_HLEN + 6)[0])


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): 0 over data that carries a correct one."""
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        0x4000,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    csum = inet_checksum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + payload


def udp_frame(
    dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, sport: int, dport: int, data: bytes
) -> bytes:
    """A complete Ethernet/IPv4/UDP frame with both checksums filled in."""
    length = 8 + len(data)
    pseudo = (
        socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!BBH", 0, 17, length)
    )
    udp = struct.pack("!HHHH", sport, dport, length, 0) + data
    csum = inet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return eth_frame(dst_mac, src_mac, ETH_P_IP, ipv4_packet(src_ip, dst_ip, 17, udp))


def arp_frame(
    op: int,
    sender_mac: bytes,
    sender_ip: str,
    target_mac: bytes,
    target_ip: str,
    dst: bytes = BROADCAST,
) -> bytes:
    """ARP over Ethernet/IPv4 (op 1 request, 2 reply), padded to the 60-byte minimum."""
    arp = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETH_P_IP,
        6,
        4,
        op,
        sender_mac,
        socket.inet_aton(sender_ip),
        target_mac,
        socket.inet_aton(target_ip),
    )
    return eth_frame(dst, sender_mac, ETH_P_ARP, arp).ljust(60, b"\0")


@dataclass(frozen=True)
class Arp:
    op: int
    sender_mac: bytes
    sender_ip: str
    target_mac: bytes
    target_ip: str


def parse_arp(frame: bytes) -> Arp | None:
    """The ARP packet in ``frame``, or None if it is not ARP over Ethernet/IPv4."""
    if len(frame) < ETH_HLEN + 28 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_ARP:
        return None
    _, _, _, _, op, smac, sip, tmac, tip = struct.unpack_from("!HHBBH6s4s6s4s", frame, ETH_HLEN)
    return Arp(op, smac, socket.inet_ntoa(sip), tmac, socket.inet_ntoa(tip))


# =========================================================================================
# virtio-net header and config space
# =========================================================================================


@dataclass(frozen=True)
class VnetHdr:
    """struct virtio_net_hdr_mrg_rxbuf (virtio 1.x: 12 bytes, little endian)."""

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self) -> bytes:
        return VNET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )

    @classmethod
    def unpack(cls, data: bytes) -> VnetHdr:
        return cls(*VNET_HDR.unpack_from(data))


@dataclass(frozen=True)
class NetConfig:
    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int


def ports_and_queues(pairs: int, max_per_port: int) -> tuple[int, int]:
    """(ports, queue pairs per port) with ports x queues == ``pairs``, as few ports as
    can be when a port has at most ``max_per_port`` queue pairs."""
    for queues in range(max_per_port, 0, -1):
        if pairs % queues == 0:
            return pairs // queues, queues
    raise AssertionError("unreachable: one pair per port always divides")


def parse_net_config(data: bytes) -> NetConfig:
    mac, status, pairs, mtu = CONFIG.unpack_from(data)
    return NetConfig(mac, status, pairs, mtu)


# =========================================================================================
# The guest's virtio-net driver
# =========================================================================================


@dataclass(frozen=True)
class RxFrame:
    """A received frame: its header, the frame after it, and the (head, used len) of each
    rx chain it filled, in order."""

    hdr: VnetHdr
    frame: bytes
    chains: tuple[tuple[int, int], ...]

    @property
    def used_bytes(self) -> int:
        return sum(n for _, n in self.chains)


class NetPort:
    """A guest's virtio-net driver on one daemon socket: negotiated (``features`` masked
    by what is offered), guest RAM described, ``pairs`` receiveq/transmitq pairs set up
    (queue 2k is rx k, 2k+1 is tx k; ``pairs=None``: as many as GET_QUEUE_NUM says),
    their ring indices starting at ``start_idx`` (SET_VRING_BASE).

    Receiving relies on the daemon's call notifications: a device that publishes used
    entries without signalling makes :meth:`receive` time out."""

    def __init__(
        self,
        socket_path: Path,
        *,
        features: int = ALL_FEATURES,
        pairs: int | None = 1,
        queue_size: int = 256,
        ram_size: int = 16 * MiB,
        regions: int = 2,
        start_idx: int = 0,
    ) -> None:
        self.ram = GuestRam(ram_size, regions)
        self.fe = FrontEnd(socket_path, self.ram)
        self.rxq: list[DriverQueue] = []
        self.txq: list[DriverQueue] = []
        self.pool = BufferPool(self.ram, 0)
        self._rx_bufs: list[dict[int, list[tuple[int, int]]]] = []
        self._tx_bufs: list[dict[int, list[tuple[int, int]]]] = []
        self._rx_backlog: list[deque[tuple[int, int]]] = []
        self._mac: bytes | None = None
        try:
            self.fe.connect()
            self.fe.negotiate(features)
            self.fe.set_mem_table()
            n = self.fe.queue_num if pairs is None else pairs
            for k in range(n):
                self.rxq.append(self.fe.setup_queue(2 * k, queue_size, start_idx=start_idx))
                self.txq.append(self.fe.setup_queue(2 * k + 1, queue_size, start_idx=start_idx))
                self._rx_bufs.append({})
                self._tx_bufs.append({})
                self._rx_backlog.append(deque())
        except BaseException:
            self.close()
            raise

    # --- negotiated facts ----------------------------------------------------------------
    @property
    def features(self) -> int:
        return self.fe.features

    @property
    def mergeable(self) -> bool:
        return bool(self.features & VIRTIO_NET_F_MRG_RXBUF)

    @property
    def hdr_len(self) -> int:
        return VNET_HDR_LEN if self.features & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) else 10

    def config(self) -> NetConfig:
        return parse_net_config(self.fe.get_config(CONFIG.size))

    @property
    def mac(self) -> bytes:
        """The MAC in config space (read once: it does not change)."""
        if self._mac is None:
            self._mac = self.config().mac
        return self._mac

    # --- rx ------------------------------------------------------------------------------
    def add_rx_chain(
        self,
        sizes: Sequence[int],
        *,
        pair: int = 0,
        writable: Sequence[bool] | None = None,
        indirect: bool = False,
    ) -> int:
        """Queue (unpublished) one rx chain of buffers of ``sizes`` bytes, poisoned;
        ``writable`` (default all True) makes a hostile chain possible."""
        flags = list(writable) if writable is not None else [True] * len(sizes)
        bufs = [(self.pool.alloc(max(n, 1)), n) for n in sizes]
        for gpa, n in bufs:
            self.ram.fill(gpa, n, POISON)
        head = self.rxq[pair].add_chain(
            [(g, n, w) for (g, n), w in zip(bufs, flags, strict=True)], indirect
        )
        self._rx_bufs[pair][head] = bufs
        return head

    def post_rx(
        self,
        count: int,
        size: int = 2048,
        *,
        pair: int = 0,
        segs: int = 1,
        kick: bool | None = None,
    ) -> list[int]:
        """Make ``count`` rx chains of ``size`` bytes (split in ``segs`` buffers)
        available, and kick as :meth:`publish` decides."""
        base, extra = divmod(size, segs)
        sizes = [base + (1 if i < extra else 0) for i in range(segs)]
        heads = [self.add_rx_chain(sizes, pair=pair) for _ in range(count)]
        self.publish(self.rxq[pair], kick)
        return heads

    def publish(self, q: DriverQueue, kick: bool | None = None) -> bool:
        """Make the chains added to ``q`` visible; then kick as a driver does (``None``:
        only if the device asked to be told about them -- with EVENT_IDX, only when the
        new entries cross its avail_event, as Linux's virtqueue_kick_prepare decides),
        always (``True``) or never (``False``). Returns whether it kicked."""
        old = q.published_avail_idx()
        q.publish()  # one 16-bit store (GuestRam.pack): the device never sees a torn idx
        with _FENCE:  # a locked instruction: avail->idx is stored before avail_event is read
            pass
        if kick is None:
            kick = q.need_kick(old)
        if kick:
            q.kick()
        return kick

    def reset_rx(self, pair: int = 0, queue_size: int = 256) -> None:
        """Set receiveq ``pair`` up again from scratch (new rings, index 0): what a
        driver does after the device broke the queue. Buffers in the old ring are lost."""
        for bufs in self._rx_bufs[pair].values():
            for gpa, n in bufs:
                self.pool.free(gpa, max(n, 1))
        self._rx_bufs[pair].clear()
        self._rx_backlog[pair].clear()
        self.rxq[pair] = self.fe.setup_queue(2 * pair, queue_size)

    def rx_used_pending(self, pair: int = 0) -> int:
        """Used rx entries published by the device and not consumed yet."""
        q = self.rxq[pair]
        return ((q.used_idx() - q.last_used_idx) & 0xFFFF) + len(self._rx_backlog[pair])

    def _collect_rx(self, pair: int) -> None:
        self._rx_backlog[pair].extend(self.rxq[pair].get_used())

    def _chain_data(self, pair: int, head: int, length: int) -> bytes:
        bufs = self._rx_bufs[pair].pop(head)
        out = bytearray()
        for gpa, n in bufs:
            take = min(n, length - len(out))
            if take > 0:
                out += self.ram.read(gpa, take)
            self.pool.free(gpa, max(n, 1))
        if len(out) != length:
            raise AssertionError(
                f"rx chain {head}: used len {length} but the chain holds "
                f"{sum(n for _, n in bufs)} bytes"
            )
        return bytes(out)

    def _next_frame(self, pair: int) -> RxFrame | None:
        backlog = self._rx_backlog[pair]
        if not backlog:
            return None
        head = backlog[0][0]
        if head not in self._rx_bufs[pair]:
            raise AssertionError(f"device used rx head {head}, not an outstanding chain")
        first_bufs = self._rx_bufs[pair][head]
        hdr_bytes = b"".join(self.ram.read(g, n) for g, n in first_bufs)[: self.hdr_len]
        hdr = VnetHdr.unpack(hdr_bytes.ljust(VNET_HDR_LEN, b"\0"))
        count = hdr.num_buffers if self.mergeable else 1
        if count < 1 or count > self.rxq[pair].in_flight + len(backlog):
            raise AssertionError(f"rx head {head}: num_buffers {hdr.num_buffers}")
        if len(backlog) < count:
            return None
        chains = [backlog.popleft() for _ in range(count)]
        data = b"".join(self._chain_data(pair, h, n) for h, n in chains)
        if self.hdr_len == 10:
            hdr = VnetHdr.unpack(data[:10] + b"\0\0")
        return RxFrame(hdr, data[self.hdr_len :], tuple(chains))

    def receive(self, count: int = 1, *, pair: int = 0, timeout: float = 5.0) -> list[RxFrame]:
        """Wait for ``count`` frames on rx queue ``pair`` (woken by call notifications)."""
        q = self.rxq[pair]
        frames: list[RxFrame] = []
        deadline = time.monotonic() + timeout
        while True:
            self._collect_rx(pair)
            while len(frames) < count and (f := self._next_frame(pair)) is not None:
                frames.append(f)
            if len(frames) >= count:
                return frames
            q.enable_cb()
            if (q.used_idx() - q.last_used_idx) & 0xFFFF:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{len(frames)} of {count} frames received within "
                    f"{timeout}s on rx queue {2 * pair}"
                )
            q.wait_call(left)

    def drain_rx(self, pair: int = 0) -> list[RxFrame]:
        """The complete frames already received (no waiting)."""
        self._collect_rx(pair)
        frames: list[RxFrame] = []
        while (f := self._next_frame(pair)) is not None:
            frames.append(f)
        return frames

    # --- tx ------------------------------------------------------------------------------
    def add_tx_chain(self, parts: Sequence[bytes], *, pair: int = 0, indirect: bool = False) -> int:
        """Queue (unpublished) one device-readable chain, one buffer per part."""
        bufs = []
        for data in parts:
            gpa = self.pool.alloc(max(len(data), 1))
            self.ram.write(gpa, data)
            bufs.append((gpa, len(data)))
        head = self.txq[pair].add_chain([(g, n, False) for g, n in bufs], indirect)
        self._tx_bufs[pair][head] = bufs
        return head

    def queue_frame(
        self, frame: bytes, *, hdr: VnetHdr | None = None, pair: int = 0, split: bool = False
    ) -> int:
        """Queue header + frame, in one buffer or (``split``) header and frame apart."""
        h = (hdr or VnetHdr()).pack()[: self.hdr_len]
        return self.add_tx_chain([h, frame] if split else [h + frame], pair=pair)

    def flush_tx(self, pair: int = 0, kick: bool | None = None) -> None:
        self.publish(self.txq[pair], kick)

    def send(
        self, *frames: bytes, pair: int = 0, split: bool = False, wait: bool = True
    ) -> list[int]:
        """Transmit ``frames`` in one batch; with ``wait``, until the device used them."""
        heads = [self.queue_frame(f, pair=pair, split=split) for f in frames]
        self.flush_tx(pair)
        if wait:
            self.wait_tx(heads, pair=pair)
        return heads

    def wait_tx(
        self, heads: Sequence[int], *, pair: int = 0, timeout: float = 5.0
    ) -> dict[int, int]:
        """Wait until the device returned every chain in ``heads``; their used lens."""
        q = self.txq[pair]
        want = set(heads)
        got: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while True:
            for head, length in q.get_used():
                for gpa, n in self._tx_bufs[pair].pop(head, []):
                    self.pool.free(gpa, max(n, 1))
                got[head] = length
            if want <= got.keys():
                return {h: got[h] for h in heads}
            q.enable_cb()
            if (q.used_idx() - q.last_used_idx) & 0xFFFF:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"tx chains {sorted(want - got.keys())} not used within "
                    f"{timeout}s on tx queue {2 * pair + 1}"
                )
            q.wait_call(left)

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        self.fe.close()
        self.ram.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
