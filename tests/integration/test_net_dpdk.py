"""``vhost-user-net --switch`` with DPDK's ``net_virtio_user`` as a second, independent
front end: the switch must carry frames between testpmd's virtio-user driver and our
Python driver (tests/support/net.py) exactly as between two guests.

Layout (tests/dpdk.py, 2 cores): the daemon holds a.sock and b.sock, pinned to cpu 0
(``taskset``); testpmd's lcores share cpu 1; the test process (our guest driver on
b.sock) is pinned to cpu 0 while a test runs, so it never takes testpmd's cpu (other
work on a shared machine still may: hence the flow control in the second test).

* testpmd ``txonly`` on a.sock, 64-byte broadcast frames (``--eth-peer``) -> the switch
  floods them to b.sock -> our driver's rx buffers (re-posted as they fill; the switch
  drops what finds none, so only "some, each intact" is asserted);
* our driver transmits N broadcast frames on b.sock -> testpmd ``rxonly`` on a.sock
  counts exactly N, each batch sent once testpmd has counted the previous ones;
* one testpmd with two virtio-user ports (a.sock, b.sock) in ``io`` forwarding started
  with ``tx_first``: frames circle through the switch (the bench's loop) and both ports
  keep receiving.

Skipped when dpdk-testpmd is missing or hugepages cannot be reserved
(``scripts/setup-dpdk`` prepares the machine). Every testpmd and the daemon are ended by
the test that started them; the daemon must then exit 0 with no traceback in its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import dpdk
from tests.support.daemon import Daemon, script, spawn_net
from tests.support.frontend import ALL_FEATURES, MiB
from tests.support.net import (
    BROADCAST,
    ETH_P_EXPERIMENTAL,
    ETH_P_IP,
    VNET_HDR_LEN,
    NetPort,
    RxFrame,
    VnetHdr,
)

FRAME_SIZE = 64
#: what the switch writes in front of every frame: no offloads, one buffer
SWITCH_HDR = VnetHdr(num_buffers=1)

TESTPMD_MAC = bytes.fromhex("02aa00000001")  # net_virtio_user0's MAC (the ``mac=`` devarg)
TESTPMD_MAC_B = bytes.fromhex("02aa00000002")
OUR_MAC = bytes.fromhex("02bb00000001")  # the source of the frames our driver sends

FRONTEND_CPU = 1  # where dpdk.FRONTEND_LCORES puts testpmd's lcores
RX_BUF_SIZE = 2048
QUEUE_SIZE = 256
TX_SECONDS = 1.0  # testpmd txonly run time
LOOP_SECONDS = 2.0  # the io-forwarding loop's run time
FRAMES_TO_TESTPMD = 10_000
TX_BATCH = 128  # frames per batch: half of testpmd's 256-entry rx ring


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# =========================================================================================
# fixtures
# =========================================================================================


@pytest.fixture(scope="module", autouse=True)
def _dpdk_ready() -> None:
    if not dpdk.testpmd_available():
        pytest.skip("dpdk-testpmd not installed (run scripts/setup-dpdk)")
    if not script("net").exists():
        pytest.skip(f"{script('net')} not installed (pip install -e .)")
    if shutil.which("taskset") is None:
        pytest.skip("taskset not installed (util-linux)")
    if not {dpdk.BACKEND_CPU, FRONTEND_CPU} <= os.sched_getaffinity(0):
        pytest.skip(f"needs cpus {dpdk.BACKEND_CPU} (daemon) and {FRONTEND_CPU} (testpmd)")
    try:
        dpdk.ensure_hugepages(min_free_pages=512)
    except dpdk.HugepagesUnavailable as e:
        pytest.skip(f"hugepages unavailable: {e}")


@pytest.fixture(autouse=True)
def _test_process_on_backend_cpu() -> Iterator[None]:
    """Keep this process (our guest driver) off testpmd's cpu while a test runs."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {dpdk.BACKEND_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Switch:
    """The running daemon: two switch ports, a.sock and b.sock."""

    a_sock: str
    b_sock: str
    daemon: Daemon

    def log_text(self) -> str:
        return self.daemon.log_text()


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[Switch]:
    """``vhost-user-net --switch sw0`` with two ports, pinned to cpu 0 (``taskset`` as
    its exec prefix; not dpdk.process_backend, which runs any back end for the
    benchmarks and checks nothing: see tests/support/daemon.py); at teardown it gets
    SIGTERM and must exit 0 with no traceback, no warning or error logged, and no
    socket file left."""
    sock_dir = Path(tempfile.mkdtemp(prefix="vu-dpdk-"))  # short: sun_path holds 108 bytes
    try:
        d = spawn_net(
            sock_dir,
            "switch",
            "--switch",
            "sw0",
            "-v",
            sockets=[sock_dir / "a.sock", sock_dir / "b.sock"],
            exec_prefix=["taskset", "-c", str(dpdk.BACKEND_CPU)],
            log_path=tmp_path / "vhost-user-net.log",
            start_new_session=True,
        )
        try:
            yield Switch(str(d.sockets[0]), str(d.sockets[1]), d)
            assert d.alive(), f"daemon died; log:\n{d.log_text()}"
            d.check_clean_exit()
        finally:
            if d.alive():
                d.kill9()
        log = d.log_text()
        complaints = [ln for ln in log.splitlines() if " WARNING " in ln or " ERROR " in ln]
        assert not complaints, "the daemon complained:\n" + "\n".join(complaints)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _testpmd(
    socks: list[str],
    macs: list[bytes],
    forward_mode: str,
    log_path: Path,
    extra_args: tuple[str, ...] = (),
) -> dpdk.TestPmd:
    """testpmd with one ``net_virtio_user`` port per socket, MACs fixed, on cpu 1."""
    vdevs = [
        f"net_virtio_user{i},path={s},queues=1,mac={_mac_text(m)}"
        for i, (s, m) in enumerate(zip(socks, macs, strict=True))
    ]
    return dpdk.TestPmd(
        vdevs,
        lcores=dpdk.FRONTEND_LCORES,
        forward_mode=forward_mode,
        txpkts=FRAME_SIZE,
        extra_args=extra_args,
        log_path=log_path,
        name="frontend",
    )


@contextlib.contextmanager
def _running(pmd: dpdk.TestPmd) -> Iterator[dpdk.TestPmd]:
    """Launch ``pmd``; at exit end it (TestPmd.close: quit, then SIGTERM, then SIGKILL)
    and, if the test went well, check that it quit by itself with status 0."""
    pmd.launch()
    try:
        yield pmd
    except BaseException:
        pmd.close()
        raise
    rc = pmd.close()
    assert rc == 0, f"testpmd exited with {rc}; log:\n{pmd.log_tail()}"


# =========================================================================================
# our guest's virtio-net driver: tests/support/net.py, one queue pair
# =========================================================================================


def our_port(sock: str) -> NetPort:
    """The driver on one daemon socket: receiveq0 and transmitq0 of QUEUE_SIZE entries,
    every feature offered taken, its RAM in one region."""
    return NetPort(
        Path(sock), features=ALL_FEATURES, queue_size=QUEUE_SIZE, ram_size=16 * MiB, regions=1
    )


def post_free_rx(port: NetPort) -> int:
    """Offer an ``RX_BUF_SIZE`` buffer in every free rx descriptor; returns how many."""
    n = port.rxq[0].num_free
    if n:
        port.post_rx(n, RX_BUF_SIZE)
    return n


def receive_for(port: NetPort, seconds: float) -> list[RxFrame]:
    """Receive for ``seconds``, offering the buffers again as they fill."""
    got: list[RxFrame] = []
    post_free_rx(port)
    q = port.rxq[0]
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        got += port.drain_rx()
        post_free_rx(port)
        q.enable_cb()
        if (q.used_idx() - q.last_used_idx) & 0xFFFF == 0:
            q.wait_call(min(left, 0.05))
    got += port.drain_rx()
    return got


def _experimental_frame(seq: int) -> bytes:
    payload = struct.pack("!I", seq).ljust(FRAME_SIZE - 14, b"\0")
    return BROADCAST + OUR_MAC + struct.pack("!H", ETH_P_EXPERIMENTAL) + payload


def _wait_for(read: Callable[[], int], want: int, timeout: float = 3.0) -> int:
    """Poll ``read`` until it returns at least ``want``; returns the last value."""
    deadline = time.monotonic() + timeout
    while (got := read()) < want and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def _settled_stats(pmd: dpdk.TestPmd, port: int = 0) -> dpdk.PortStats:
    """The port's counters once two reads 0.1 s apart agree (nothing left on its way)."""
    last = pmd.port_stats()[port]
    for _ in range(50):
        time.sleep(0.1)
        now = pmd.port_stats()[port]
        if now == last:
            break
        last = now
    return last


# =========================================================================================
# tests
# =========================================================================================


def test_testpmd_tx_reaches_our_port(switch: Switch, tmp_path: Path) -> None:
    """testpmd txonly on a.sock sends 64-byte broadcast frames; the switch floods them
    to b.sock, where our driver finds each one whole in one rx buffer (re-posted as
    they fill: far more frames arrive than the ring holds)."""
    with our_port(switch.b_sock) as nic:
        post_free_rx(nic)
        pmd = _testpmd(
            [switch.a_sock],
            [TESTPMD_MAC],
            "txonly",
            tmp_path / "testpmd.log",
            extra_args=(f"--eth-peer=0,{_mac_text(BROADCAST)}",),
        )
        with _running(pmd):
            pmd.start()
            got = receive_for(nic, TX_SECONDS)
            pmd.stop()
            sent = pmd.port_stats()[0]
            got += receive_for(nic, 0.2)  # what was still on its way
            log = pmd.log_tail(60)

    print(
        f"\ntestpmd sent {sent['tx_packets']} frames, our port received {len(got)} "
        f"(the switch drops what finds no rx buffer)"
    )
    assert sent["tx_packets"] > 0, log
    assert sent["tx_bytes"] == FRAME_SIZE * sent["tx_packets"]
    assert sent["tx_errors"] == 0
    assert len(got) > QUEUE_SIZE, (
        f"{len(got)} frames reached b.sock; testpmd log:\n{log}\n"
        f"daemon log tail:\n{switch.log_text()[-3000:]}"
    )
    assert len(got) <= sent["tx_packets"]
    num_buffers = Counter(r.hdr.num_buffers for r in got)
    assert num_buffers == {1: len(got)}, num_buffers
    sizes = Counter(r.used_bytes for r in got)
    assert sizes == {VNET_HDR_LEN + FRAME_SIZE: len(got)}, sizes
    headers = Counter(r.hdr for r in got)
    assert headers == {SWITCH_HDR: len(got)}, headers
    # testpmd's txonly frame: Ethernet from the port's MAC to the --eth-peer address,
    # then IPv4/UDP
    eth = Counter(r.frame[:14] for r in got)
    assert eth == {BROADCAST + TESTPMD_MAC + struct.pack("!H", ETH_P_IP): len(got)}, eth
    assert all(len(r.frame) == FRAME_SIZE for r in got)


def test_our_frames_reach_testpmd(switch: Switch, tmp_path: Path) -> None:
    """Our driver on b.sock transmits broadcast frames; testpmd rxonly on a.sock
    counts every one of them, and shows them intact (MACs, ethertype, length)."""
    pmd = _testpmd([switch.a_sock], [TESTPMD_MAC], "rxonly", tmp_path / "testpmd.log")
    with _running(pmd), our_port(switch.b_sock) as nic:
        pmd.start()

        def rx_packets() -> int:
            return pmd.port_stats()[0]["rx_packets"]

        # testpmd posts its rx ring when its port starts, but the daemon serves that
        # ring only once it has handled a.sock's queue set-up messages (not
        # acknowledged to virtio-user): until then the switch drops what it floods
        # there. Probe until one frame arrives, then count from there.
        probes = 0
        deadline = time.monotonic() + 10.0
        while rx_packets() == 0:
            assert time.monotonic() < deadline, (
                f"{probes} probe frames, none reached testpmd; log:\n{pmd.log_tail()}\n"
                f"daemon log tail:\n{switch.log_text()[-3000:]}"
            )
            nic.send(_experimental_frame(0))
            probes += 1
            _wait_for(rx_packets, 1, timeout=0.2)
        before = _settled_stats(pmd)

        # Flow control: a batch goes out only once testpmd has counted every frame
        # before it, so its rx ring (256 buffers, refilled as it counts) has room for
        # the whole batch however late its polling lcore gets the cpu on a busy
        # machine. Without it the switch rightly drops what finds the ring full.
        t0 = time.monotonic()
        sent = 0
        while sent < FRAMES_TO_TESTPMD:
            batch = min(TX_BATCH, FRAMES_TO_TESTPMD - sent)
            nic.send(*(_experimental_frame(sent + 1 + k) for k in range(batch)))
            sent += batch
            counted = _wait_for(rx_packets, before["rx_packets"] + sent) - before["rx_packets"]
            if counted != sent:
                break  # lost: reported below
        elapsed = time.monotonic() - t0
        after = _settled_stats(pmd)

        # a few more with testpmd printing each frame it receives
        shown = 4
        offset = pmd.log_path.stat().st_size
        pmd.command("set verbose 1")
        nic.send(*(_experimental_frame(FRAMES_TO_TESTPMD + 1 + k) for k in range(shown)))
        _wait_for(rx_packets, after["rx_packets"] + shown)

        def dumped() -> str:
            with open(pmd.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")

        # testpmd counts a burst before it prints its frames: wait for the dump itself
        deadline = time.monotonic() + 5
        while dumped().count("src=") < shown and time.monotonic() < deadline:
            time.sleep(0.05)
        verbose = dumped()
        pmd.command("set verbose 0")
        pmd.stop()
        final = pmd.port_stats()[0]
        log = pmd.log_tail(60)

    got = after["rx_packets"] - before["rx_packets"]
    print(
        f"\nsent {sent} frames in {elapsed:.2f} s after {probes} probe(s); testpmd received {got}"
    )
    # No loss is allowed: each batch finds room in testpmd's ring, and the daemon
    # uses a tx chain only after copying its frame there.
    assert sent == FRAMES_TO_TESTPMD and got == sent, (
        f"testpmd received {got} of the first {sent} frames; testpmd log:\n{log}\n"
        f"daemon log tail:\n{switch.log_text()[-3000:]}"
    )
    assert after["rx_bytes"] - before["rx_bytes"] == FRAME_SIZE * FRAMES_TO_TESTPMD
    for counter in ("rx_errors", "rx_missed", "rx_nombuf"):
        assert final[counter] == before[counter], (counter, final, log)
    assert final["rx_packets"] - after["rx_packets"] == shown, (final, verbose)
    want = (
        f"src={_mac_text(OUR_MAC).upper()} - dst={_mac_text(BROADCAST).upper()} - "
        f"pool=mb_pool_0 - type=0x{ETH_P_EXPERIMENTAL:04x} - length={FRAME_SIZE} - "
        "nb_segs=1 "
    )
    frames = [ln.strip() for ln in verbose.splitlines() if ln.strip().startswith("src=")]
    assert len(frames) == shown and all(f.startswith(want) for f in frames), verbose


def test_testpmd_to_testpmd_through_our_switch(switch: Switch, tmp_path: Path) -> None:
    """The bench's loop as a correctness test: one testpmd, virtio-user ports on a.sock
    and b.sock, io forwarding (port0 <-> port1) started with ``tx_first`` (32 frames
    per port to unknown unicast MACs, so the switch floods them); frames circle through
    the switch, both ports keep receiving, and the switch creates no frame."""
    pmd = _testpmd(
        [switch.a_sock, switch.b_sock], [TESTPMD_MAC, TESTPMD_MAC_B], "io", tmp_path / "testpmd.log"
    )
    with _running(pmd):
        pmd.start(tx_first=1)
        time.sleep(LOOP_SECONDS / 2)
        mid = pmd.port_stats()
        time.sleep(LOOP_SECONDS / 2)
        pmd.stop()
        end = pmd.port_stats()
        log = pmd.log_tail(60)

    print(
        "\n"
        + ", ".join(f"port {p}: rx {s['rx_packets']} tx {s['tx_packets']}" for p, s in end.items())
    )
    for port in (0, 1):
        other = 1 - port
        assert end[port]["rx_packets"] > 0, f"port {port} received nothing; log:\n{log}"
        assert end[port]["rx_bytes"] == FRAME_SIZE * end[port]["rx_packets"]
        assert end[port]["rx_errors"] == 0
        # still circling in the second half: the loop did not die after a few rounds
        assert end[port]["rx_packets"] > mid[port]["rx_packets"], (
            f"port {port} stopped receiving after {mid[port]['rx_packets']} frames; "
            f"log:\n{log}\ndaemon log tail:\n{switch.log_text()[-3000:]}"
        )
        # with two ports, whatever one receives the other sent: nothing duplicated
        assert end[port]["rx_packets"] <= end[other]["tx_packets"], end
