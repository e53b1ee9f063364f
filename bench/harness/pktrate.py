"""Packet rate: the two-socket DPDK virtio-user loop of tests/dpdk.py (run_loop).

One testpmd with two ``net_virtio_user`` ports (io forwarding, ``start tx_first``)
on cpu 1 sends frames round through a back end on cpu 0 that switches a.sock <->
b.sock: DPDK's own ``net_vhost`` back end (``dpdk``) or our ``vhost-user-net
--switch`` (``ours``).  The figure is the front end's rx on both ports per second
(both directions together), in Mpps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests import dpdk

BACKENDS = ("dpdk", "ours")
SIZES = (64, 1500)


def our_switch_binary() -> str | None:
    beside = Path(sys.executable).with_name("vhost-user-net")
    if beside.exists():
        return str(beside)
    return shutil.which("vhost-user-net")


@contextlib.contextmanager
def start_our_switch(a_sock: str, b_sock: str, log_dir: Path) -> Iterator[object]:
    """``vhost-user-net --socket-path A --socket-path B --switch sw0`` pinned to cpu 0
    (the idea of bench/test_switch_dpdk_bench.py, without pytest)."""
    binary = our_switch_binary()
    if binary is None:
        raise RuntimeError("vhost-user-net not installed")
    argv = [binary, "--socket-path", a_sock, "--socket-path", b_sock, "--switch", "sw0"]
    log = log_dir / "backend-ours.log"
    with dpdk.process_backend(argv, [a_sock, b_sock], cpu=dpdk.BACKEND_CPU, log_path=log) as p:
        yield p


def unavailable() -> str | None:
    """Why the packet-rate benchmark cannot run here, or None."""
    if not dpdk.testpmd_available():
        return "dpdk-testpmd not installed"
    try:
        dpdk.ensure_hugepages(min_free_pages=512)
    except dpdk.HugepagesUnavailable as e:
        return f"hugepages unavailable: {e}"
    if (os.cpu_count() or 1) < 2:
        return "needs 2 cpus"
    return None


def backend_start(kind: str, log_dir: Path) -> Callable[[str, str], Any]:
    if kind == "dpdk":
        return lambda a, b: dpdk.dpdk_vhost_switch(a, b, log_dir=log_dir)
    if kind == "ours":
        if our_switch_binary() is None:
            raise RuntimeError("vhost-user-net not installed")
        return lambda a, b: start_our_switch(a, b, log_dir)
    raise ValueError(f"unknown packet-rate back end {kind!r}")


def run_one(kind: str, size: int, seconds: float, workdir: Path) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    dpdk.remove_stale_hugepage_files()
    r = dpdk.run_loop(
        backend_start(kind, workdir),
        size,
        seconds,
        warmup=1.0 if seconds >= 2 else 0.5,
        sample_period=min(1.0, seconds),
        log_dir=workdir,
    )
    if r.rx_packets <= 0:
        raise RuntimeError(f"{kind} {size} B: no frames came round the loop (logs {workdir})")
    # the two ports' counters are read one after the other while frames keep
    # moving, so bytes and packets may disagree by a few bursts, never more
    if abs(r.rx_bytes - size * r.rx_packets) > size * 32 * 64:
        raise RuntimeError(f"{kind} {size} B: frames came back damaged: {r}")
    return {"mpps": r.mpps, "gbps": r.gbps, "seconds": r.seconds}


def estimate_seconds(seconds: float) -> float:
    return seconds + 6.0
