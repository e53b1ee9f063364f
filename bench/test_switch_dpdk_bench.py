"""Switch throughput in the two-socket DPDK loop (tests/dpdk.py: run_loop).

A back end holds a.sock and b.sock on cpu 0 and forwards frames between them; one
testpmd with two virtio-user ports in io mode on cpu 1 (``start tx_first``)
sends them round: port0 -> a.sock -> back end -> b.sock -> port1 -> port0, and the
other way. The figure is the front end's rx on both ports per second: frames the
back end switched, both directions together, in Mpps (one direction is half).

Back ends:
* ``dpdk-vhost`` -- DPDK's own: testpmd io forwarding between net_vhost0/1 (the
  reference; on this machine ~5.5 Mpps at 64 B and ~2.2 Mpps at 1500 B per
  /work/shared/FACTS.md, noisy: other work on the 2 cores moves it a lot).
* ``ours`` -- ``vhost-user-net --socket-path a --socket-path b --switch sw0``
  pinned to cpu 0 (:func:`start_our_switch`); skipped until the command exists.
* ``baseline-tree`` -- the same from another checkout, with ``--baseline-tree=PATH``
  (bench/conftest.py): a change measured against the code before it, in one run.

Run: ``pytest bench/test_switch_dpdk_bench.py -s`` (one line per case, then the
ratio ours/dpdk per size when both ran; figures also in pytest-benchmark's
extra_info, ``--benchmark-json=FILE`` to keep them). Environment knobs:
DPDK_BENCH_SECONDS (measured seconds per round, default 5), DPDK_BENCH_ROUNDS
(front-end restarts per case, default 1), DPDK_BENCH_TX_FIRST (bursts of 32 frames
per port put in flight, default 1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.conftest import baseline_command, baseline_tree
from tests import dpdk

SIZES = [64, 1500]
BACKENDS = ["dpdk-vhost", "ours"]
SECONDS = float(os.environ.get("DPDK_BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("DPDK_BENCH_ROUNDS", "1"))
TX_FIRST = int(os.environ.get("DPDK_BENCH_TX_FIRST", "1"))

#: (backend, size) -> Mpps, for the ratio printed at the end of the module
RESULTS: dict[tuple[str, int], float] = {}


# ---------------------------------------------------------------------------
# HOOK for our back end. When `vhost-user-net` with `--switch` lands, this is
# the only place to adapt (command line, extra options, how it reports ready).


def our_switch_binary() -> str | None:
    """``vhost-user-net`` on PATH (or next to this Python, for a venv); None if absent."""
    found = shutil.which("vhost-user-net")
    if found is None:
        beside = Path(sys.executable).with_name("vhost-user-net")
        found = str(beside) if beside.exists() else None
    return found


@contextlib.contextmanager
def start_our_switch(
    a_sock: str,
    b_sock: str,
    log_dir: str | os.PathLike[str] | None = None,
    tree: Path | None = None,
) -> Iterator[object]:
    """Our back end for the loop: ``vhost-user-net --socket-path A --socket-path B
    --switch sw0`` pinned to cpu 0 (taskset), ready when it listens on both
    sockets, terminated (SIGTERM, then SIGKILL) at exit. With ``tree``: the one of
    that checkout."""
    env = None
    if tree is not None:
        prog, env = baseline_command(tree, "net")
    else:
        binary = our_switch_binary()
        if binary is None:
            pytest.skip("vhost-user-net not installed")
        prog = [binary]
    argv = [*prog, "--socket-path", a_sock, "--socket-path", b_sock, "--switch", "sw0"]
    name = "baseline" if tree is not None else "ours"
    log = None if log_dir is None else Path(log_dir) / f"backend-{name}.log"
    with dpdk.process_backend(
        argv, [a_sock, b_sock], cpu=dpdk.BACKEND_CPU, log_path=log, env=env
    ) as p:
        yield p


# ---------------------------------------------------------------------------


def _backend_start(kind: str, log_dir: Path, tree: Path | None) -> Callable[[str, str], Any]:
    if kind == "dpdk-vhost":
        return lambda a, b: dpdk.dpdk_vhost_switch(a, b, log_dir=log_dir)
    if kind == "ours":
        return lambda a, b: start_our_switch(a, b, log_dir=log_dir)
    if kind == "baseline-tree":
        return lambda a, b: start_our_switch(a, b, log_dir=log_dir, tree=tree)
    raise ValueError(kind)


@pytest.fixture(scope="module", autouse=True)
def _dpdk_ready() -> Iterator[None]:
    if not dpdk.testpmd_available():
        pytest.skip("dpdk-testpmd not installed (run scripts/setup-dpdk)")
    try:
        dpdk.ensure_hugepages(min_free_pages=512)
    except dpdk.HugepagesUnavailable as e:
        pytest.skip(f"hugepages unavailable: {e}")
    yield
    lines = []
    for size in SIZES:
        ours, ref = RESULTS.get(("ours", size)), RESULTS.get(("dpdk-vhost", size))
        if ours is not None and ref:
            lines.append(f"  {size:>5} B: ours {ours:.3f} / dpdk {ref:.3f} Mpps = {ours / ref:.2f}")
        old = RESULTS.get(("baseline-tree", size))
        if ours is not None and old:
            lines.append(
                f"  {size:>5} B: ours {ours:.3f} / baseline-tree {old:.3f} Mpps = {ours / old:.2f}"
            )
    if lines:
        print("\nswitch loop ratios:\n" + "\n".join(lines))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # backend varies fastest: the back ends of one size run next to each other in time
    if "backend" in metafunc.fixturenames:
        kinds = list(BACKENDS)
        if baseline_tree(metafunc.config) is not None:
            kinds.append("baseline-tree")
        metafunc.parametrize("size", SIZES)
        metafunc.parametrize("backend", kinds)


def test_switch_loop(
    benchmark: Any, backend: str, size: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "ours" and our_switch_binary() is None:
        pytest.skip("vhost-user-net not installed (hook: start_our_switch)")
    start = _backend_start(backend, tmp_path, baseline_tree(request.config))
    results: list[dpdk.LoopResult] = []

    def one_round() -> None:
        results.append(
            dpdk.run_loop(start, size, SECONDS, tx_first_bursts=TX_FIRST, log_dir=tmp_path)
        )

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)

    mpps = statistics.median(r.mpps for r in results)
    samples = [s / 1e6 for r in results for s in r.samples]
    RESULTS[(backend, size)] = mpps
    benchmark.extra_info.update(
        {
            "backend": backend,
            "pkt_size": size,
            "mpps": round(mpps, 3),
            "mpps_per_direction": round(mpps / 2, 3),
            "gbps": round(mpps * 1e6 * size * 8 / 1e9, 2),
            "mpps_samples": [round(s, 3) for s in samples],
            "mpps_sample_median": round(statistics.median(samples), 3) if samples else None,
            "seconds": SECONDS,
            "rounds": ROUNDS,
            "tx_first_bursts": TX_FIRST,
        }
    )
    print(
        f"\n{backend:>10} {size:>5} B: {mpps:6.3f} Mpps ({mpps / 2:.3f} per direction, "
        f"{mpps * size * 8 / 1e3:.2f} Gbit/s), 1 s samples "
        f"{' '.join(f'{s:.2f}' for s in samples)}"
    )
    assert mpps > 0, f"no frames came round the loop; logs in {tmp_path}"
    for r in results:
        # Frames came back whole: the bytes are a whole number of frames. testpmd reads a
        # port's packet and byte counters apart, so they may disagree by one burst (32
        # frames) per port while the loop runs; by more, frames were lost or cut.
        frames, cut = divmod(r.rx_bytes, size)
        assert cut == 0, f"{r}; logs in {tmp_path}"
        assert abs(frames - r.rx_packets) <= 32 * len(r.per_port_rx_pps), f"{r}; {tmp_path}"
