"""The network after a live migration: VIRTIO_NET_F_GUEST_ANNOUNCE and protocol
feature RARP (VHOST_USER_SEND_RARP), over the daemon's real sockets.

QEMU 7.2 sends SEND_RARP with the guest's MAC when the guest did not negotiate
GUEST_ANNOUNCE (hw/virtio/vhost-user.c, vhost_user_migration_done), once per announce
round after a migration or a QMP ``announce-self``; never with need_reply. Here the
test front end (tests/support/net.py) plays QEMU and the guests, with RARP added to the
protocol features it asks for, and checks what the announcement does:

* on a TAP (inside a namespace made for the test): a RARP frame from the guest's MAC
  comes out of the TAP, and a Linux bridge behind it learns the MAC on that port;
* on the switch: frames for the MAC go to the announcing port from then on (however the
  MAC table pointed before), and the other ports get the RARP broadcast;
* without RARP negotiated, SEND_RARP is refused (REPLY_ACK nonzero) and the connection
  goes on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from devices.net import _net as net_c
from devices.net.device import rarp_frame
from tests.netns import NetNs, netns_supported
from tests.support import frontend
from tests.support.daemon import Daemon
from tests.support.frontend import AckError, FrontEnd, GuestRam, MiB
from tests.support.net import (
    BROADCAST,
    NO_OFFLOADS,
    VIRTIO_NET_S_LINK_UP,
    NetPort,
    RxFrame,
    VnetHdr,
    mac_bytes,
    mac_text,
    tagged_frame,
)
from tests.support.packet_agent import PacketAgent
from vhost.protocol import ProtocolFeature, SendRarp

StartNet = Callable[..., Daemon]
MakeAgent = Callable[[str], PacketAgent]
needs_netns = pytest.mark.skipif(netns_supported() is not None, reason=netns_supported() or "")

VIRTIO_NET_F_GUEST_ANNOUNCE = 1 << 21
VIRTIO_NET_S_ANNOUNCE = 2
PF_RARP = int(ProtocolFeature.RARP)
ETH_P_RARP = 0x8035
ZERO_HDR = VnetHdr(num_buffers=1)  # what a switch port receives: fresh, no offloads
TAP = "vtap0"
TAP_CIDR = "10.97.0.1/24"  # exists only inside the test's namespace


@pytest.fixture
def rarp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test front end asks for RARP too, in its one SET_PROTOCOL_FEATURES (QEMU
    asks for it whenever the back end offers it)."""
    wanted = frontend.FRONTEND_PROTOCOL_FEATURES | PF_RARP
    monkeypatch.setattr(frontend, "FRONTEND_PROTOCOL_FEATURES", wanted)


def check_rarp(frame: bytes, mac: bytes) -> None:
    """``frame`` is the announcement of ``mac``, field by field (RFC 903's reverse
    request over Ethernet, as QEMU's net/announce.c and DPDK's make_rarp_packet build
    it): broadcast from ``mac``, sender and target hardware address ``mac``, protocol
    addresses 0.0.0.0, zero padding to the 60-byte Ethernet minimum."""
    assert len(frame) == 60, frame.hex()
    dst, src, ethertype = struct.unpack_from("!6s6sH", frame)
    assert (dst, src, ethertype) == (BROADCAST, mac, ETH_P_RARP)
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack_from(
        "!HHBBH6s4s6s4s", frame, 14
    )
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 3)
    assert (sha, spa, tha, tpa) == (mac, bytes(4), mac, bytes(4))
    assert frame[42:] == bytes(18)


def send_rarp(fe: FrontEnd, mac: bytes) -> None:
    """SEND_RARP for ``mac`` with need_reply (QEMU sets none; the ack tells the test it
    was taken): AckError if refused."""
    fe.request_ack(SendRarp(mac))


def assert_frames(got: list[RxFrame], want: list[bytes]) -> None:
    assert [g.frame for g in got] == want
    for g in got:
        assert g.hdr == ZERO_HDR, g.hdr


def barrier(sender: NetPort, receivers: list[NetPort], seq: int) -> None:
    """A broadcast from ``sender`` that each receiver must get next: the switch handles
    a port's frames in order, so anything the switch sent them before arrived first."""
    f = tagged_frame(BROADCAST, sender.mac, seq)
    sender.send(f)
    for r in receivers:
        assert_frames(r.receive(1), [f])


def assert_nothing_more(*ports: NetPort) -> None:
    for p in ports:
        assert p.rx_used_pending() == 0, f"unexpected frames: {p.drain_rx()}"


def close_all(ports: list[NetPort]) -> None:
    for p in ports:
        p.close()


def switch(start_net: StartNet, ports: int) -> Daemon:
    return start_net("--switch", "sw0", ports=ports)


# =========================================================================================
# What is offered
# =========================================================================================


def test_guest_announce_and_rarp_are_offered(start_net: StartNet, rarp: None) -> None:
    """GET_FEATURES has GUEST_ANNOUNCE (bit 21) and GET_PROTOCOL_FEATURES has RARP; a
    driver that takes GUEST_ANNOUNCE gets it and its frames flow as before; the config
    space's status stays LINK_UP (VIRTIO_NET_S_ANNOUNCE is in QEMU's copy, not ours)."""
    d = switch(start_net, 2)
    a, b = ports = [NetPort(s, features=NO_OFFLOADS) for s in d.sockets]
    try:
        for p in ports:
            assert p.fe.get_features() & VIRTIO_NET_F_GUEST_ANNOUNCE
            assert p.features & VIRTIO_NET_F_GUEST_ANNOUNCE  # acked by SET_FEATURES
            assert p.fe.get_protocol_features() & PF_RARP
            assert p.fe.protocol_features & PF_RARP
            assert p.config().status == VIRTIO_NET_S_LINK_UP
            p.post_rx(8)
        barrier(a, [b], 1)
        barrier(b, [a], 2)
        assert_nothing_more(*ports)
    finally:
        close_all(ports)


# =========================================================================================
# Switch
# =========================================================================================


def test_send_rarp_moves_the_mac_to_the_port_and_floods_the_rarp(
    start_net: StartNet, rarp: None
) -> None:
    """The guest with MAC M ran behind port C (the switch learnt M there) and now runs
    behind port B: B's SEND_RARP(M) sends the RARP broadcast from M to A and C (not back
    to B), and from then on A's unicast frames for M reach B and nobody else."""
    d = switch(start_net, 3)
    a, b, c = ports = [NetPort(s, features=NO_OFFLOADS) for s in d.sockets]
    try:
        for p in ports:
            p.post_rx(16)
        m = b.mac
        # C speaks from M: the switch learns M on C
        from_m = tagged_frame(BROADCAST, m, 1)
        c.send(from_m)
        assert_frames(a.receive(1), [from_m])
        assert_frames(b.receive(1), [from_m])
        to_m = tagged_frame(m, a.mac, 2)
        a.send(to_m)
        assert_frames(c.receive(1), [to_m])  # M is on C
        send_rarp(b.fe, m)
        for p in (a, c):
            (got,) = p.receive(1)
            assert got.hdr == ZERO_HDR
            check_rarp(got.frame, m)
        to_m = tagged_frame(m, a.mac, 3)
        a.send(to_m)
        assert_frames(b.receive(1), [to_m])  # M is on B now
        barrier(a, [b, c], 4)  # ... and C got nothing more (nor B its own RARP)
        assert_nothing_more(*ports)
        assert d.wait_log(f"announced {mac_text(m)} on port")
    finally:
        close_all(ports)


def test_send_rarp_before_the_port_runs(start_net: StartNet, rarp: None) -> None:
    """QEMU's first announce round can come before the destination's queues run. Then
    the RARP still reaches the running ports, and the MAC table forgets where M was (C):
    frames for M flood. Once B runs, its next announcement points M at it."""
    d = switch(start_net, 4)
    a_sock, b_sock, c_sock, d_sock = d.sockets
    a, c, e = ports = [NetPort(s, features=NO_OFFLOADS) for s in (a_sock, c_sock, d_sock)]
    ram = GuestRam(4 * MiB)
    fe = FrontEnd(b_sock, ram)
    try:
        for p in ports:
            p.post_rx(16)
        fe.connect()
        fe.negotiate(NO_OFFLOADS)
        assert fe.protocol_features & PF_RARP
        fe.set_mem_table()
        m = mac_bytes("02:00:00:00:00:4d")
        from_m = tagged_frame(BROADCAST, m, 1)
        c.send(from_m)  # M is learnt on C
        assert_frames(a.receive(1), [from_m])
        assert_frames(e.receive(1), [from_m])
        send_rarp(fe, m)  # B has no queue running
        for p in ports:
            (got,) = p.receive(1)
            check_rarp(got.frame, m)
        to_m = tagged_frame(m, a.mac, 2)
        a.send(to_m)  # M's entry is gone: it floods (to C and to D)
        assert_frames(c.receive(1), [to_m])
        assert_frames(e.receive(1), [to_m])
        fe.close()
        with NetPort(b_sock, features=NO_OFFLOADS) as b:
            b.post_rx(16)
            send_rarp(b.fe, m)
            for p in ports:
                check_rarp(p.receive(1)[0].frame, m)
            to_m = tagged_frame(m, a.mac, 3)
            a.send(to_m)
            assert_frames(b.receive(1), [to_m])
            barrier(a, [b, c, e], 4)
            assert_nothing_more(b, *ports)
    finally:
        fe.close()
        ram.close()
        close_all(ports)


def test_announcements_are_repeated_and_the_switch_goes_on(start_net: StartNet, rarp: None) -> None:
    """QEMU announces in rounds (five by default): each SEND_RARP sends one RARP, and
    ordinary traffic in between is untouched."""
    d = switch(start_net, 2)
    a, b = ports = [NetPort(s, features=NO_OFFLOADS) for s in d.sockets]
    try:
        for p in ports:
            p.post_rx(32)
        for seq in range(5):
            send_rarp(b.fe, b.mac)
            check_rarp(a.receive(1)[0].frame, b.mac)
            f = tagged_frame(b.mac, a.mac, seq)
            a.send(f)
            assert_frames(b.receive(1), [f])
        barrier(b, [a], 9)
        assert_nothing_more(*ports)
    finally:
        close_all(ports)


# =========================================================================================
# Refused
# =========================================================================================


def test_send_rarp_without_rarp_negotiated_is_refused(start_net: StartNet) -> None:
    """Without protocol feature RARP, SEND_RARP gets a nonzero ack and sends nothing;
    the connection and the switch go on."""
    d = switch(start_net, 2)
    a, b = ports = [NetPort(s, features=NO_OFFLOADS) for s in d.sockets]
    try:
        assert not b.fe.protocol_features & PF_RARP
        for p in ports:
            p.post_rx(8)
        with pytest.raises(AckError):
            send_rarp(b.fe, b.mac)
        assert b.fe.get_features() & VIRTIO_NET_F_GUEST_ANNOUNCE  # still talking
        barrier(b, [a], 1)  # nothing came before it: no RARP was sent
        barrier(a, [b], 2)
        assert_nothing_more(*ports)
        assert d.wait_log("RARP was not negotiated")
    finally:
        close_all(ports)


def test_send_rarp_for_a_group_address_is_refused(start_net: StartNet, rarp: None) -> None:
    """A multicast MAC cannot be a guest's: refused, nothing sent, the port goes on."""
    d = switch(start_net, 2)
    a, b = ports = [NetPort(s, features=NO_OFFLOADS) for s in d.sockets]
    try:
        for p in ports:
            p.post_rx(8)
        with pytest.raises(AckError):
            send_rarp(b.fe, mac_bytes("03:00:00:00:00:01"))
        barrier(b, [a], 1)
        assert_nothing_more(*ports)
    finally:
        close_all(ports)


# =========================================================================================
# The engine's queue of announcements (in-process, no thread)
# =========================================================================================


def test_one_announcement_waits_per_port() -> None:
    """The engine keeps at most one waiting announcement per port (a newer one replaces
    it), for as many ports as an engine serves; past that, and for a frame longer than
    NET_ANNOUNCE_MAX_LEN, the post is refused."""
    lib = net_c.lib
    e = net_c.ffi.new("struct net_engine *")
    e.stop_fd = -1
    frame = rarp_frame(mac_bytes("02:00:00:00:00:01"))
    for port_id in range(1, lib.NET_MAX_PAIRS + 1):
        assert lib.net_post_announce(e, port_id, frame, len(frame)) == 0
    assert lib.net_post_announce(e, 1, frame, len(frame)) == 0  # replaces port 1's
    assert lib.net_post_announce(e, lib.NET_MAX_PAIRS + 1, frame, len(frame)) == -1
    lib.net_drop_announcements(e)
    assert lib.net_post_announce(e, lib.NET_MAX_PAIRS + 1, frame, len(frame)) == 0
    longest = frame.ljust(lib.NET_ANNOUNCE_MAX_LEN, b"\0")
    assert lib.net_post_announce(e, 2, longest, len(longest)) == 0
    assert lib.net_post_announce(e, 2, longest + b"\0", len(longest) + 1) == -1
    assert lib.net_post_announce(e, 2, frame[:13], 13) == -1  # not even a header


# =========================================================================================
# TAP, inside a network namespace
# =========================================================================================


def tap_on_bridge(netns: NetNs) -> None:
    """The TAP the daemon opened, enslaved to a bridge with the namespace's only
    address; the namespace cannot route anywhere else."""
    netns.add_bridge("br0", TAP_CIDR, ports=[TAP])
    netns.check_isolated()
    netns.wait_carrier(TAP)


def fdb_port(netns: NetNs, mac: bytes) -> str | None:
    """The bridge port ``mac`` was learnt on, if any."""
    for entry in netns.fdb("br0"):
        if entry.get("mac") == mac_text(mac) and "permanent" not in entry.get("state", ""):
            return str(entry.get("ifname"))
    return None


@needs_netns
def test_send_rarp_writes_the_rarp_into_the_tap(
    netns: NetNs, start_tap: StartNet, agent: MakeAgent, rarp: None
) -> None:
    """On a TAP the RARP from the guest's MAC comes out of the TAP, so the bridge the
    TAP is on learns the MAC on that port: before the guest's queues run (QEMU's first
    announce round; the TAP still has the kernel's 10-byte header then) and after (a
    12-byte header)."""
    d = start_tap("--tap", TAP)
    tap_on_bridge(netns)
    ag = agent(TAP)
    ram = GuestRam(4 * MiB)
    fe = FrontEnd(d.socket_path, ram)
    try:
        fe.connect()
        fe.negotiate(NO_OFFLOADS)
        assert fe.offered_features & VIRTIO_NET_F_GUEST_ANNOUNCE
        assert fe.protocol_features & PF_RARP
        fe.set_mem_table()
        m = mac_bytes("02:00:00:00:00:4e")
        assert fdb_port(netns, m) is None
        send_rarp(fe, m)
        (got,) = ag.take(1, 5.0)
        check_rarp(got, m)
        assert fdb_port(netns, m) == TAP
        assert d.wait_log(f"announced {mac_text(m)} (RARP into the TAP)")
    finally:
        fe.close()
        ram.close()
    with NetPort(d.socket_path, features=NO_OFFLOADS) as g:  # queues run: 12-byte header
        assert g.hdr_len == 12
        send_rarp(g.fe, g.mac)
        (got,) = ag.take(1, 5.0)
        check_rarp(got, g.mac)
        assert fdb_port(netns, g.mac) == TAP
        assert ag.take(0, 0.2) == []  # one announcement, one frame


def test_rarp_frame_layout() -> None:
    """The frame itself, without a daemon."""
    m = mac_bytes("52:54:00:12:34:56")
    check_rarp(rarp_frame(m), m)
