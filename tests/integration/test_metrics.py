"""``--metrics``: the Prometheus endpoint over real sockets.

* In process: :class:`vhost.metrics.MetricsServer` on an event loop of the test's own,
  answered by raw HTTP clients: GET, HEAD, 404, 405, malformed and oversized requests,
  clients that stall or vanish, too many clients, a port in use; the server goes on
  answering after each.
* End to end: the real daemons with ``--metrics 127.0.0.1:0`` (the port is read from
  the "metrics on http://..." log line), driven by the test front end: the numbers
  scraped are the I/O done -- blk requests, bytes, kicks, interrupts, chains per batch,
  errors by kind after bad requests, inflight resubmissions after a crafted crash;
  net frames, bytes, drops by reason, the switch's MAC table -- and the connection
  state flips when a front end goes, while the counters carry on across connections.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.blk import (
    RAM_SIZE,
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    BlkDriver,
    connect_guest,
    pattern,
)
from tests.support.daemon import IMAGE_SIZE, Daemon, StartDaemon, daemons, run_program, spawn_net
from tests.support.frontend import PF_INFLIGHT_SHMFD, DriverQueue, FrontEnd, GuestRam, KiB
from tests.support.net import BROADCAST, NetPort, tagged_frame
from tests.unit.test_metrics_format import Family, parse, value
from vhost import metrics
from vhost.metrics import MetricsServer

CAPACITY = IMAGE_SIZE // SECTOR_SIZE
METRICS = ("--metrics", "127.0.0.1:0")

# =========================================================================================
# Helpers
# =========================================================================================


def metrics_url(d: Daemon) -> str:
    (line,) = d.wait_log("metrics on http://")
    m = re.search(r"metrics on (http://\S+/metrics)", line)
    assert m, line
    return m[1]


def scrape(url: str) -> dict[str, Family]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == metrics.CONTENT_TYPE
        return parse(r.read().decode())


def wait_for(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def has(fams: dict[str, Family], name: str, **labels: str) -> bool:
    family = fams.get(name)
    return family is not None and any(
        n == name and set(labels.items()) <= set(ls) for n, ls, _ in family.samples
    )


async def http(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``request`` raw, return everything the server sends back before it closes."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:80]
    return int(raw.split(b" ", 2)[1])


class _NoConnections:
    async def next_connection(self) -> object:
        await asyncio.Event().wait()
        raise AssertionError

    def connection_ended(self, messages: int) -> None:
        pass

    def close(self) -> None:
        pass


def _rng_server() -> Any:
    from devices.rng.device import RngDevice, RngOptions
    from vhost.server import Server

    return Server(_NoConnections(), RngDevice(RngOptions()), name="rng0.sock")  # type: ignore[arg-type]


def run(test: Callable[[MetricsServer], Awaitable[None]], host: str = "127.0.0.1") -> None:
    """``test(server)`` on a fresh event loop, with a MetricsServer on ``host``:0."""

    async def main() -> None:
        server = MetricsServer(host, 0, [_rng_server()])
        await server.start()
        try:
            await test(server)
        finally:
            server.close()

    asyncio.run(main())


# =========================================================================================
# The HTTP server in process
# =========================================================================================


def test_get_head_404_405() -> None:
    async def t(server: MetricsServer) -> None:
        assert server.port != 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        raw = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(raw) == 200
        head, _, body = raw.partition(b"\r\n\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
        fams = parse(body.decode())
        assert value(fams, "vhost_device_connected", device="rng0.sock") == 0
        raw = await http(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status_of(raw) == 200 and raw.endswith(b"\r\n\r\n")
        assert status_of(await http(server.port, b"GET /nope HTTP/1.1\r\n\r\n")) == 404
        raw = await http(server.port, b"PUT /metrics HTTP/1.1\r\n\r\n")
        assert status_of(raw) == 405 and b"\r\nAllow: GET, HEAD\r\n" in raw
        # bare LF line ends and empty lines before the request are taken
        assert status_of(await http(server.port, b"\r\nGET /metrics HTTP/1.0\n\n")) == 200
        assert server.scrapes == 3

    run(t)


def test_bad_clients_cost_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.3)

    async def t(server: MetricsServer) -> None:
        port = server.port
        assert status_of(await http(port, b"\x00\xff garbage\r\n\r\n")) == 400
        assert status_of(await http(port, b"GET /metrics HTTP/9\r\n\r\n")) == 400
        # a head longer than the limit: refused, not buffered without end
        long = (
            b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * metrics.MAX_REQUEST_BYTES + b"\r\n\r\n"
        )
        assert status_of(await http(port, long)) == 400
        many = b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n"
        assert status_of(await http(port, many)) == 400
        # a client that stalls mid-request gets a 408 once its time is up
        t0 = time.monotonic()
        assert status_of(await http(port, b"GET /metrics HTTP/1.1\r\n")) == 408
        assert time.monotonic() - t0 < 3
        # one that goes away in the middle: nothing to answer, nothing breaks
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /met")
        await w.drain()
        w.close()
        # one that resets the connection
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        await asyncio.sleep(0.05)
        assert status_of(await http(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200

    run(t)


def test_too_many_clients_are_turned_away_not_queued() -> None:
    async def t(server: MetricsServer) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(16)]
        await asyncio.sleep(0.05)
        try:
            one_more = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        except ConnectionResetError:  # closed at once, its request unread
            one_more = b""
        assert one_more == b""
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.05)
        assert status_of(await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200

    run(t)


def test_close_drops_clients_and_frees_the_port() -> None:
    async def t(server: MetricsServer) -> None:
        reader, _ = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.sleep(0.05)
        port = server.port
        server.close()
        assert await asyncio.wait_for(reader.read(), 2) == b""
        again = MetricsServer("127.0.0.1", port, [])
        await again.start()  # the port is free again at once
        assert again.port == port
        again.close()

    run(t)


def test_port_in_use_is_an_oserror() -> None:
    async def t(server: MetricsServer) -> None:
        other = MetricsServer("127.0.0.1", server.port, [])
        with pytest.raises(OSError) as e:
            await other.start()
        assert e.value.errno == errno.EADDRINUSE

    run(t)


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6 or not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6 here")

    async def t(server: MetricsServer) -> None:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        raw = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n", host="::1")
        assert status_of(raw) == 200

    try:
        run(t, host="::1")
    except OSError as e:
        pytest.skip(f"cannot bind ::1: {e}")


# =========================================================================================
# vhost-user-blk end to end
# =========================================================================================


def test_blk_counters_match_the_io(start_daemon: StartDaemon) -> None:
    d = start_daemon(*METRICS)
    url = metrics_url(d)
    dev = {"device": d.socket_path.name}
    q0 = {**dev, "queue": "0"}
    before = scrape(url)
    assert value(before, "vhost_device_connected", **dev) == 0
    assert value(before, "vhost_device_connections_total", **dev) == 1  # the start-up probe
    assert not has(before, "vhost_queue_chains_total", **q0)  # no queue used yet
    assert value(before, "process_cpu_seconds_total") > 0

    n_writes, n_reads, burst = 8, 5, 6
    with connect_guest(d) as g:
        assert value(scrape(url), "vhost_device_connected", **dev) == 1
        for i in range(n_writes):
            assert g.blk.write(64 + 8 * i, pattern(i, 4 * KiB)) == VIRTIO_BLK_S_OK
        reqs = [g.blk.submit_write(512 + 8 * i, pattern(i, 4 * KiB)) for i in range(burst)]
        assert all(c.ok for c in g.blk.kick_and_wait(reqs))  # one kick: one batch of 6
        for i in range(n_reads):
            assert g.blk.read(64 + 8 * i, 4 * KiB) == pattern(i, 4 * KiB)
        m = scrape(url)
        assert value(m, "vhost_queue_running", **q0) == 1
        writes = n_writes + burst
        assert value(m, "vhost_blk_requests_total", **q0, op="write") == writes
        assert value(m, "vhost_blk_requests_total", **q0, op="read") == n_reads
        assert value(m, "vhost_blk_written_bytes_total", **q0) == writes * 4 * KiB
        assert value(m, "vhost_blk_read_bytes_total", **q0) == n_reads * 4 * KiB
        chains = writes + n_reads
        assert value(m, "vhost_queue_chains_total", **q0) == chains
        # one batch per request waited for, and one for the burst, all 6 in one pass
        batches = value(m, "vhost_queue_batch_chains_count", **q0)
        assert batches == n_writes + n_reads + 1
        assert value(m, "vhost_queue_batch_chains_sum", **q0) == chains
        in_5_to_8 = value(m, "vhost_queue_batch_chains_bucket", **q0, le="8") - value(
            m, "vhost_queue_batch_chains_bucket", **q0, le="4"
        )
        assert in_5_to_8 == 1
        assert value(m, "vhost_queue_batch_chains_bucket", **q0, le="+Inf") == batches
        kicks_sent = n_writes + 1 + n_reads  # at most: event idx may spare some
        assert 1 <= value(m, "vhost_queue_kicks_total", **q0) <= kicks_sent
        # at most one interrupt per batch: event idx spares those for completions the
        # driver saw in the used ring before it asked for a call
        assert 1 <= value(m, "vhost_queue_interrupts_total", **q0) <= batches
        assert value(m, "vhost_blk_errors_total", **q0, kind="ioerr") == 0
        assert not has(m, "vhost_queue_errors_total", **q0)

        # deliberately bad requests: errors by kind
        bad = g.blk.kick_and_wait([g.blk.submit_read(CAPACITY + 8, 4 * KiB)])[0]
        assert bad.status == VIRTIO_BLK_S_IOERR
        odd = g.blk.kick_and_wait([g.blk.submit_raw(99, 0, b"", 0)])[0]
        assert odd.status == VIRTIO_BLK_S_UNSUPP
        m = scrape(url)
        assert value(m, "vhost_blk_errors_total", **q0, kind="ioerr") == 1
        assert value(m, "vhost_blk_errors_total", **q0, kind="unsupp") == 1
        assert value(m, "vhost_queue_errors_total", **q0, code="BLK_ERR_RANGE") == 1
        assert value(m, "vhost_queue_errors_total", **q0, code="BLK_ERR_UNSUPPORTED") == 1
        assert value(m, "vhost_blk_requests_total", **q0, op="read") == n_reads  # not OK
        assert value(m, "vhost_queue_chains_total", **q0) == chains + 2

    # the front end went: the state flips, the counters stay
    d.wait_disconnects(1)
    m = scrape(url)
    assert value(m, "vhost_device_connected", **dev) == 0
    assert value(m, "vhost_queue_running", **q0) == 0
    assert value(m, "vhost_device_connections_total", **dev) == 2
    assert value(m, "vhost_blk_requests_total", **q0, op="write") == writes
    assert value(m, "vhost_queue_chains_total", **q0) == chains + 2

    # a new front end: its queue counts from zero, the device's counters go on
    with connect_guest(d) as g:
        assert g.blk.write(4000, pattern(99, 4 * KiB)) == VIRTIO_BLK_S_OK
        m = scrape(url)
        assert value(m, "vhost_device_connected", **dev) == 1
        assert value(m, "vhost_device_connections_total", **dev) == 3
        assert value(m, "vhost_blk_requests_total", **q0, op="write") == writes + 1
        assert value(m, "vhost_queue_chains_total", **q0) == chains + 3
        assert value(m, "vhost_queue_errors_total", **q0, code="BLK_ERR_RANGE") == 1
        assert value(m, "vhost_queue_batch_chains_sum", **q0) == chains + 3


def test_blk_scrapes_during_io_only_go_up(start_daemon: StartDaemon) -> None:
    """Scrapes while a writer runs: every counter read is at least the one before, and
    the last equals the I/O done. Also a rough figure of what a scrape costs."""
    d = start_daemon(*METRICS)
    url = metrics_url(d)
    q0 = {"device": d.socket_path.name, "queue": "0"}
    total = 300
    with connect_guest(d) as g:
        done = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                for i in range(total):
                    assert g.blk.write(8 * (i % 1000), pattern(i, 4 * KiB)) == VIRTIO_BLK_S_OK
            except BaseException as e:
                errors.append(e)
            finally:
                done.set()

        t = threading.Thread(target=writer)
        t.start()
        seen: list[tuple[float, float]] = []
        took: list[float] = []
        while not done.is_set():
            t0 = time.monotonic()
            m = scrape(url)
            took.append(time.monotonic() - t0)
            if has(m, "vhost_blk_requests_total", **q0):
                seen.append(
                    (
                        value(m, "vhost_blk_requests_total", **q0, op="write"),
                        value(m, "vhost_queue_chains_total", **q0),
                    )
                )
        t.join()
        assert not errors, errors
        m = scrape(url)
    assert value(m, "vhost_blk_requests_total", **q0, op="write") == total
    assert value(m, "vhost_queue_batch_chains_sum", **q0) == total
    assert seen == sorted(seen), "a counter went back"
    assert len(seen) >= 2
    took.sort()
    print(
        f"\nmetrics: {len(took)} scrapes during {total} writes; scrape time median "
        f"{took[len(took) // 2] * 1e3:.1f} ms, max {took[-1] * 1e3:.1f} ms"
    )
    assert took[-1] < 2.0  # a blocked loop would show here, not a slow machine


def test_daemon_stops_cleanly_with_metrics_clients_connected(start_daemon: StartDaemon) -> None:
    """SIGTERM while scrapers hang on: one idle, one halfway through its request. The
    daemon exits 0 with nothing like a traceback logged, and drops them."""
    d = start_daemon(*METRICS)
    url = metrics_url(d)
    host, port = url.removeprefix("http://").removesuffix("/metrics").rsplit(":", 1)
    idle = socket.create_connection((host, int(port)))
    half = socket.create_connection((host, int(port)))
    half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    try:
        scrape(url)  # the server answers others meanwhile
        d.check_clean_exit()
        for s in (idle, half):
            s.settimeout(5)
            assert s.recv(100) == b""
    finally:
        idle.close()
        half.close()


def test_metrics_port_in_use_is_one_line_and_status_2(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        image = tmp_path / "d.img"
        image.write_bytes(b"")
        os.truncate(image, 1 << 20)
        r = run_program(
            "blk",
            "--socket-path",
            str(tmp_path / "d.sock"),
            "--blk-file",
            str(image),
            "--metrics",
            f"127.0.0.1:{port}",
        )
    finally:
        holder.close()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "--metrics" in errors[0], r.stderr
    assert not (tmp_path / "d.sock").exists()


# --- inflight resubmissions ---------------------------------------------------------------

_INFLIGHT_HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
_INFLIGHT_DESC = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
QSIZE = 128


def test_blk_counts_resubmitted_chains(start_daemon: StartDaemon) -> None:
    """A back end 'died' with three writes taken and none completed (the state
    tests/integration/test_inflight.py calls all-marked-none-pushed): the next connection
    runs them again from the inflight region, and the scrape says 3."""
    d = start_daemon(*METRICS)
    url = metrics_url(d)
    q0 = {"device": d.socket_path.name, "queue": "0"}
    ram = GuestRam(RAM_SIZE, 1)
    q = DriverQueue(ram, QSIZE, event_idx=True)
    blk = BlkDriver(q)
    fe = FrontEnd(d.socket_path, ram)
    region: mmap.mmap | None = None
    fds: list[int] = []
    try:
        fe.connect()
        fe.negotiate()
        assert fe.protocol_features & PF_INFLIGHT_SHMFD
        reply = fe.get_inflight_fd(1, QSIZE)
        assert reply.fd is not None
        fds.append(reply.fd)
        region = mmap.mmap(reply.fd, reply.mmap_size)
        fe.set_inflight_fd(reply)
        fe.set_mem_table()
        fe.announce_queue(0, q, 0)
        d.wait_log("inflight region of")
        fe.close()
        d.wait_disconnects(1)
        # taken by the back end that died: marked in flight, never completed
        reqs = [blk.submit_write(1000 + 100 * k, pattern(k, 2048)) for k in range(3)]
        q.publish()
        for counter, r in enumerate(reqs, 1):
            off = _INFLIGHT_HEADER.size + _INFLIGHT_DESC.size * r.head
            _INFLIGHT_DESC.pack_into(region, off, 1, 0, counter)
        _INFLIGHT_HEADER.pack_into(region, 0, 0, 1, QSIZE, 0, 0)
        fe = FrontEnd(d.socket_path, ram)
        fe.connect()
        fe.negotiate()
        fe.set_inflight_fd(reply)
        fe.set_mem_table()
        fe.announce_queue(0, q, q.used_idx())
        q.kick()
        assert all(c.status == VIRTIO_BLK_S_OK for c in blk.wait(reqs))
        m = scrape(url)
        assert value(m, "vhost_queue_resubmitted_chains_total", **q0) == 3
        assert value(m, "vhost_queue_chains_total", **q0) == 3
        assert value(m, "vhost_blk_requests_total", **q0, op="write") == 3
    finally:
        fe.close()
        if region is not None:
            region.close()
        for fd in fds:
            os.close(fd)
        q.close()
        ram.close()


# =========================================================================================
# vhost-user-net end to end (ports of a switch)
# =========================================================================================


@pytest.fixture
def start_net(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    with daemons(spawn_net, tmp_path, "sw") as group:
        yield group.start


def test_net_frames_drops_and_mac_table(start_net: Callable[..., Daemon]) -> None:
    d = start_net("--switch", "sw0", *METRICS, ports=2)
    url = metrics_url(d)
    a_dev = {"device": d.sockets[0].name}
    b_dev = {"device": d.sockets[1].name}
    k = 20
    a = NetPort(d.sockets[0])
    b = NetPort(d.sockets[1])
    open_ports = [a, b]
    try:
        m = scrape(url)
        assert value(m, "vhost_device_connected", **a_dev) == 1
        assert value(m, "vhost_net_switch_mac_entries", switch="sw0") == 0
        b.post_rx(k)
        frames = [tagged_frame(b.mac, a.mac, i, 60 + 50 * i) for i in range(k)]
        a.send(*frames)  # b's MAC is not known yet: each is flooded, and reaches b
        assert len(b.receive(k)) == k
        a.post_rx(1)
        back = tagged_frame(a.mac, b.mac, 100, 80)
        b.send(back)
        assert len(a.receive(1)) == 1
        lost = tagged_frame(b.mac, a.mac, 101, 90)
        a.send(lost)  # b has no rx buffers left: dropped at b
        short = a.add_tx_chain([b"short"])  # shorter than a header: refused at a
        a.flush_tx()
        a.wait_tx([short])
        wait_for(
            "the short chain to be counted",
            lambda: (
                value(scrape(url), "vhost_net_dropped_frames_total", **a_dev, reason="tx_invalid")
                == 1
            ),
        )
        m = scrape(url)
        sent = sum(len(f) for f in frames)
        assert value(m, "vhost_net_frames_total", **a_dev, direction="tx") == k + 1
        assert value(m, "vhost_net_bytes_total", **a_dev, direction="tx") == sent + len(lost)
        assert value(m, "vhost_net_frames_total", **b_dev, direction="rx") == k
        assert value(m, "vhost_net_bytes_total", **b_dev, direction="rx") == sent
        assert value(m, "vhost_net_frames_total", **b_dev, direction="tx") == 1
        assert value(m, "vhost_net_frames_total", **a_dev, direction="rx") == 1
        assert value(m, "vhost_net_flooded_frames_total", **a_dev) == k  # then b was learnt
        assert value(m, "vhost_net_dropped_frames_total", **b_dev, reason="rx_no_buffers") == 1
        assert value(m, "vhost_net_rx_no_buffers_total", **b_dev) == 1
        for reason in ("tx_tap_refused", "rx_queue_down", "rx_truncated"):
            assert value(m, "vhost_net_dropped_frames_total", **a_dev, reason=reason) == 0
        assert (
            value(m, "vhost_queue_errors_total", **a_dev, queue="1", code="NET_ERR_SHORT_HDR") == 1
        )
        # the switch learnt both MACs; one sample, not one per port
        assert value(m, "vhost_net_switch_mac_entries", switch="sw0") == 2
        assert len(m["vhost_net_switch_mac_entries"].samples) == 1
        # a's transmitq (queue 1) and b's receiveq (queue 0), as the core counts them
        assert value(m, "vhost_queue_chains_total", **a_dev, queue="1") == k + 2
        assert value(m, "vhost_queue_kicks_total", **a_dev, queue="1") >= 1
        assert value(m, "vhost_queue_batch_chains_sum", **b_dev, queue="0") == k
        assert value(m, "vhost_queue_interrupts_total", **b_dev, queue="0") >= 1
        open_ports.remove(a)
        a.close()
        wait_for(
            "a's disconnect",
            lambda: value(scrape(url), "vhost_device_connected", **a_dev) == 0,
        )
        m = scrape(url)
        assert value(m, "vhost_device_connected", **b_dev) == 1
        assert value(m, "vhost_queue_running", **a_dev, queue="1") == 0
        assert value(m, "vhost_net_frames_total", **a_dev, direction="tx") == k + 1
    finally:
        for p in open_ports:
            p.close()


def test_net_broadcast_is_flooded(start_net: Callable[..., Daemon]) -> None:
    d = start_net("--switch", "sw1", *METRICS, ports=3)
    url = metrics_url(d)
    a, b, c = ports = [NetPort(s) for s in d.sockets]
    try:
        b.post_rx(2)
        c.post_rx(2)
        a.send(tagged_frame(BROADCAST, a.mac, 1), tagged_frame(BROADCAST, a.mac, 2))
        assert len(b.receive(2)) == 2 and len(c.receive(2)) == 2
        m = scrape(url)
        assert value(m, "vhost_net_flooded_frames_total", device=d.sockets[0].name) == 2
        for s in d.sockets[1:]:
            assert value(m, "vhost_net_frames_total", device=s.name, direction="rx") == 2
        assert value(m, "vhost_net_switch_mac_entries", switch="sw1") == 1  # only a sent
    finally:
        for p in ports:
            p.close()
