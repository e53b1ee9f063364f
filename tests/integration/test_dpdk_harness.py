"""The DPDK harness (tests/dpdk.py) proven against DPDK's own vhost-user back end:
a testpmd virtio-user front end and a testpmd ``net_vhost`` back end exchange
64-byte frames in each direction, and both ends' port counters agree.

Skipped when dpdk-testpmd is missing or hugepages cannot be reserved
(``scripts/setup-dpdk`` prepares the machine). Two testpmd processes at a time,
one per cpu (back end on cpu 0, front end on cpu 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import dpdk
from tests.dpdk import (
    BACKEND_LCORES,
    FRONTEND_LCORES,
    HugepagesUnavailable,
    PortStats,
    TestPmd,
    vhost_backend,
    virtio_user_frontend,
    wait_for_sockets,
)

RUN_SECONDS = 1.0


@pytest.fixture(scope="module", autouse=True)
def _dpdk_ready() -> None:
    if not dpdk.testpmd_available():
        pytest.skip("dpdk-testpmd not installed (run scripts/setup-dpdk)")
    try:
        dpdk.ensure_hugepages(min_free_pages=512)
    except HugepagesUnavailable as e:
        pytest.skip(f"hugepages unavailable: {e}")


@pytest.fixture
def sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # a short directory of its own: unix socket paths are limited to 108 bytes
    d = tmp_path_factory.mktemp("dpdk", numbered=True)
    yield str(d / "vu.sock")


def _wait_equal(read: Callable[[], int], want: int, timeout: float = 3.0, poll: float = 0.1) -> int:
    """Poll ``read`` until it returns ``want`` (frames still in the ring drain)."""
    deadline = time.monotonic() + timeout
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(poll)
    return got


def _port0(pmd: TestPmd) -> PortStats:
    return pmd.port_stats()[0]


def test_frontend_sends_to_dpdk_backend(sock: str, tmp_path: Path) -> None:
    """virtio-user txonly -> net_vhost rxonly: every frame the front end sent
    arrives at the back end."""
    be = vhost_backend([sock], "rxonly", BACKEND_LCORES, log_path=tmp_path / "be.log")
    with be:
        be.start()
        wait_for_sockets([sock])
        fe = virtio_user_frontend(
            [sock], "txonly", txpkts=64, lcores=FRONTEND_LCORES, log_path=tmp_path / "fe.log"
        )
        with fe:
            fe.start()
            time.sleep(RUN_SECONDS)
            fe.stop()
            sent = _port0(fe)
            assert sent["tx_packets"] > 0, fe.log_tail()
            assert sent["tx_bytes"] == 64 * sent["tx_packets"]
            assert sent["tx_errors"] == 0
            got = _wait_equal(lambda: _port0(be)["rx_packets"], sent["tx_packets"])
            received = _port0(be)
        print(
            f"\nfront end sent {sent['tx_packets']} frames, back end received {got} "
            f"(~{got / RUN_SECONDS / 1e6:.2f} Mpps)"
        )
        assert got > 0, be.log_tail()
        assert got == sent["tx_packets"]
        assert received["rx_bytes"] == 64 * got
        assert received["rx_errors"] == 0


def test_dpdk_backend_sends_to_frontend(sock: str, tmp_path: Path) -> None:
    """net_vhost txonly -> virtio-user rxonly: the front end counts what the back
    end sent."""
    be = vhost_backend([sock], "txonly", BACKEND_LCORES, txpkts=64, log_path=tmp_path / "be.log")
    with be:
        wait_for_sockets([sock])
        fe = virtio_user_frontend(
            [sock], "rxonly", txpkts=None, lcores=FRONTEND_LCORES, log_path=tmp_path / "fe.log"
        )
        with fe:
            fe.start()
            be.start()
            time.sleep(RUN_SECONDS)
            be.stop()
            sent = _port0(be)
            assert sent["tx_packets"] > 0, be.log_tail()
            got = _wait_equal(lambda: _port0(fe)["rx_packets"], sent["tx_packets"])
            received = _port0(fe)
        print(
            f"\nback end sent {sent['tx_packets']} frames, front end received {got} "
            f"(~{got / RUN_SECONDS / 1e6:.2f} Mpps)"
        )
        assert got > 0, fe.log_tail()
        assert got == sent["tx_packets"]
        assert received["rx_bytes"] == 64 * got
        assert received["rx_errors"] == 0
