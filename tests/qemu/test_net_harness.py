"""The network test harness, proven with QEMU's own networking (TCG guests).

Everything runs inside a network namespace made for the test (tests/netns.py) and
deleted at the end, even on failure: the TAP devices and the bridge, the host-side
TCP helpers, and QEMU itself (``ip netns exec NS qemu-system-x86_64 ...``, so QEMU
opens the TAP of that namespace).  Addresses are 10.99.x.0/24, which exist only in
the namespace; it has no other interfaces and no default route, so no packet can
leave it.

* ``test_guest_to_host`` -- one guest on a TAP, NIC ``virtio-net`` (QEMU's own
  virtio-net back end) or ``e1000`` (the emulated baseline) or ``vhost-user-net``
  (our back end: ``vhost-user-net --socket-path SOCK --tap tap0``, run inside the
  namespace so it opens that namespace's TAP): ping the TAP address, TCP file
  guest -> host and host -> guest, md5s equal on both sides. ``vhost-user-net-hugepages``
  is the last with guest RAM on hugetlbfs (``memory-backend-file,mem-path=/dev/hugepages``).
* ``test_two_guests`` -- two guests on one segment, a Linux bridge in the
  namespace (each guest on a TAP enslaved to it) or our ``vhost-user-net --switch``
  with two sockets: they ping each other and swap files over TCP.

The ``vhost-user-*`` cases are skipped when the ``vhost-user-net`` command is not
installed.

Run: ``python -m pytest tests/qemu/test_net_harness.py -q -m qemu`` (``-s`` shows
timings).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.guest import net_workloads as nw
from tests.guest.workloads import MiB, pattern
from tests.netns import NetNs, assert_no_leaked_namespaces, list_namespaces
from tests.support.daemon import Daemon, installed_command, spawn_net_for_qemu

from .harness import needs_netns, needs_qemu, skip_unless_ram, wait_hugepage_maps, with_ram

pytestmark = [pytest.mark.qemu, needs_qemu, needs_netns]

GUEST_TIMEOUT = 75.0
PINGS = 5

HOST_IP, GUEST_IP = "10.99.0.1", "10.99.0.2"
UP_PORT, DOWN_PORT = 5001, 5002
UP = pattern(60, 1 * MiB + 7)  # guest -> host
DOWN = pattern(61, 2 * MiB + 3)  # host -> guest

PAIR_IPS = ("10.99.1.2", "10.99.1.3")
PAIR_PORT = 5003
PAIR_DATA = (pattern(62, 1 * MiB + 11), pattern(63, 768 * 1024 + 5))

RecordProperty = Callable[[str, object], None]
#: ``boot(script, nic_args, *, name="guest", files=None, ram="memfd")`` -> a started Guest in
#: the netns (``ram``: the guest RAM backend, see tests/qemu/harness.py ``with_ram``)
BootNetGuest = Callable[..., qemu.Guest]


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A fresh namespace; afterwards it (and every process in it) is gone."""
    with NetNs("net") as ns:
        yield ns
    assert ns.name not in list_namespaces(), f"{ns.name} was not deleted"
    assert_no_leaked_namespaces()


@pytest.fixture
def net_guests(netns: NetNs, guest_base: Path, tmp_path: Path) -> Iterator[BootNetGuest]:
    """Boots QEMU guests inside ``netns``; kills them at teardown (before the
    namespace goes, which would kill them anyway)."""
    booted: list[qemu.Guest] = []

    def boot(
        script: str,
        nic_args: Sequence[str],
        *,
        name: str = "guest",
        files: dict[str, bytes] | None = None,
        ram: str = "memfd",
    ) -> qemu.Guest:
        initrd = build.make_initrd(guest_base, script, tmp_path / f"{name}.initrd", files)
        g = qemu.Guest(
            build.kernel_path(),
            initrd,
            nic_args,
            shared_mem=True,  # what vhost-user needs; harmless for the others
            log_path=tmp_path / f"{name}.console.log",
            start=False,
        )
        g.args = netns.exec_args(with_ram(g.args, ram))
        g.start()
        booted.append(g)
        return g

    yield boot
    for g in booted:
        g.kill()


def _run(g: qemu.Guest, what: str) -> tuple[dict[str, str], str]:
    rc, text = g.run_workload(timeout=GUEST_TIMEOUT)
    res = qemu.results(text)
    assert rc == 0 and res.get("done") == "1", f"{what}: workload failed (rc={rc}):\n{text}"
    return res, text


# --- the vhost-user-net hook -------------------------------------------------


def needs_backend(kind: str) -> None:
    if kind.startswith("vhost-user") and installed_command("net") is None:
        pytest.skip("vhost-user-net back end not installed")


# --- tests -------------------------------------------------------------------


@pytest.mark.parametrize(
    "nic", ["virtio-net", "e1000", "vhost-user-net", "vhost-user-net-hugepages"]
)
def test_guest_to_host(
    nic: str,
    netns: NetNs,
    net_guests: BootNetGuest,
    tmp_path: Path,
    record_property: RecordProperty,
) -> None:
    """Guest on a TAP in the namespace: pings the TAP address with no loss, sends a
    file to a host receiver and fetches one from a host sender, md5s equal."""
    needs_backend(nic)
    ram = "hugepages" if nic.endswith("-hugepages") else "memfd"
    skip_unless_ram(ram)
    t0 = time.monotonic()
    tap = netns.add_tap("tap0", f"{HOST_IP}/24")
    netns.check_isolated()
    backend: Daemon | None = None
    if nic.startswith("vhost-user-net"):
        backend = spawn_net_for_qemu(netns, tmp_path, tap=tap)
        nic_args = nw.vhost_user_net_args(backend.sockets[0], mac=nw.mac_addr(1))
    else:
        model = "virtio-net-pci" if nic == "virtio-net" else "e1000"
        nic_args = nw.tap_nic_args(tap, model=model, mac=nw.mac_addr(1))
    down_path = tmp_path / "down.bin"
    down_path.write_bytes(DOWN)
    receiver = nw.HostTcp.receiver(netns, HOST_IP, UP_PORT)
    sender = nw.HostTcp.sender(netns, HOST_IP, DOWN_PORT, down_path)
    script = nw.host_peer_script(
        f"{GUEST_IP}/24", HOST_IP, ping_count=PINGS, send_port=UP_PORT, recv_port=DOWN_PORT
    )
    g = net_guests(script, nic_args, name=nic, files={nw.UP_FILE: UP}, ram=ram)
    if backend is not None and ram == "hugepages":  # it maps the guest's RAM from hugetlbfs
        record_property("hugepage_maps", len(wait_hugepage_maps(backend.pid, GUEST_TIMEOUT)))
    res, text = _run(g, nic)
    got_up, sent_down = receiver.result(), sender.result()
    stats = netns.stats(tap)
    total = time.monotonic() - t0
    print(
        f"\n[{nic}] boot {g.boot_time() or -1:.1f}s workload {g.workload_time() or -1:.1f}s "
        f"total {total:.1f}s link_wait {res.get('link_wait_ms')}ms rtt {res.get('ping_rtt')} "
        f"{tap}: {stats}"
    )
    record_property("total_s", round(total, 2))
    record_property("ping_rtt", res.get("ping_rtt", ""))

    expect_driver = {"e1000": "e1000"}.get(nic, "virtio_net")
    assert res["driver"] == expect_driver, res
    assert res["mac"] == nw.mac_addr(1), res
    nw.check_ping(res, PINGS)
    # guest -> host
    assert res["up_rc"] == "0" and res["up_md5"] == nw.md5(UP), text
    assert got_up.md5 == nw.md5(UP) and got_up.nbytes == len(UP), got_up
    assert got_up.peer == GUEST_IP, got_up
    # host -> guest
    assert sent_down.md5 == nw.md5(DOWN) and sent_down.peer == GUEST_IP, sent_down
    assert res["down_rc"] == "0", text
    assert res["down_md5"] == nw.md5(DOWN) and res["down_bytes"] == str(len(DOWN)), res
    # the bytes went through the namespace's TAP (rx: from the guest)
    assert stats["rx_bytes"] >= len(UP) and stats["tx_bytes"] >= len(DOWN), stats

    if backend is not None:
        backend.check_clean_exit()  # SIGTERM: exit 0, no traceback, sockets removed


@pytest.mark.parametrize("segment", ["bridge", "vhost-user-switch"])
def test_two_guests(
    segment: str,
    netns: NetNs,
    net_guests: BootNetGuest,
    tmp_path: Path,
    record_property: RecordProperty,
) -> None:
    """Two guests on one L2 segment -- TAPs enslaved to a Linux bridge in the
    namespace, or two ports of our ``vhost-user-net --switch`` -- ping each other
    and each sends the other a file (busybox nc); md5s match crosswise."""
    needs_backend(segment)
    t0 = time.monotonic()
    backend: Daemon | None = None
    taps: list[str] = []
    if segment == "bridge":
        taps = [netns.add_tap(f"tap{i}") for i in range(2)]
        netns.add_bridge("br0", ports=taps)
        nics = [
            nw.tap_nic_args(t, model="virtio-net-pci", mac=nw.mac_addr(10 + i))
            for i, t in enumerate(taps)
        ]
    else:
        backend = spawn_net_for_qemu(netns, tmp_path, switch="sw0", ports=2)
        nics = [
            nw.vhost_user_net_args(p, mac=nw.mac_addr(10 + i))
            for i, p in enumerate(backend.sockets)
        ]
    netns.check_isolated()
    guests = []
    for i in range(2):
        script = nw.pair_script(
            f"{PAIR_IPS[i]}/24", PAIR_IPS[1 - i], port=PAIR_PORT, ping_count=PINGS
        )
        guests.append(
            net_guests(script, nics[i], name=f"pair{i}", files={nw.TX_FILE: PAIR_DATA[i]})
        )
    results = [_run(g, f"pair{i}") for i, g in enumerate(guests)]
    stats = [netns.stats(t) for t in taps]
    total = time.monotonic() - t0
    print(
        f"\n[{segment}] total {total:.1f}s; "
        + "; ".join(
            f"pair{i}: reach_tries {r['reach_tries']} rtt {r['ping_rtt']}"
            for i, (r, _) in enumerate(results)
        )
    )
    record_property("total_s", round(total, 2))

    for i, (res, text) in enumerate(results):
        other = PAIR_DATA[1 - i]
        nw.check_ping(res, PINGS)
        assert res["mac"] == nw.mac_addr(10 + i), res
        assert res["tx_rc"] == "0" and res["tx_md5"] == nw.md5(PAIR_DATA[i]), text
        assert res["rx_rc"] == "0", text
        assert res["rx_md5"] == nw.md5(other) and res["rx_bytes"] == str(len(other)), res
    # bridge: guest i's bytes entered through its TAP, the other's left by it (the
    # bridge's fdb proves nothing afterwards: a port's entries go when its QEMU exits)
    for i, st in enumerate(stats):
        assert st["rx_bytes"] >= len(PAIR_DATA[i]), stats
        assert st["tx_bytes"] >= len(PAIR_DATA[1 - i]), stats
    if backend is not None:
        backend.check_clean_exit()  # SIGTERM: exit 0, no traceback, sockets removed
