"""4 KiB random reads through the test front end, one queue, queue depth 1 and 32,
from a page-cached image: our vhost-user-blk against qemu-storage-daemon's
vhost-user-blk export (the named baseline), side by side in one run.

The front end is Python and is the bottleneck for requests/s; the figure that
speaks for the back end is its own CPU time per request, read from
/proc/PID/task/*/schedstat (nanoseconds, all threads) around the measured
rounds. Run: ``pytest bench -s`` (results also in pytest-benchmark's table and
extra_info; ``--benchmark-json=FILE`` to keep them); ``--baseline-tree=PATH`` adds the
daemon of another checkout as ``baseline-tree`` (bench/conftest.py).
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import contextlib

from bench.conftest import baseline_command, baseline_tree
from tests.support.daemon import Daemon, Ready, device_command, spawn
from tests.support.dirtylog import FrontEndLog, start_logging
from tests.support.frontend import (
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    DriverQueue,
    FrontEnd,
    GuestRam,
)

IMAGE_SIZE = 64 << 20
BLOCK = 4096
REQUESTS_PER_ROUND = 4096
ROUNDS = 5
QSD = shutil.which("qemu-storage-daemon")


def _cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "disk.img"
    data = random.Random(1).randbytes(1 << 20)
    with open(path, "wb") as f:
        f.writelines(data for _ in range(IMAGE_SIZE >> 20))
    path.read_bytes()  # into the page cache
    return path


def _start(kind: str, image: Path, sock: Path, log: Path, baseline: Path | None) -> Daemon:
    """The back end of ``kind`` on ``sock``, once the socket accepts a connection."""
    env = None
    if kind == "ours":
        cmd = [
            *device_command("blk", module=True),
            "--socket-path",
            str(sock),
            "--blk-file",
            str(image),
        ]
    elif kind == "baseline-tree":
        assert baseline is not None
        prog, env = baseline_command(baseline, "blk")
        cmd = [*prog, "--socket-path", str(sock), "--blk-file", str(image)]
    else:
        assert QSD is not None
        cmd = [
            QSD,
            "--blockdev",
            f"driver=file,node-name=f0,filename={image},cache.direct=off",
            "--export",
            (
                f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                f"addr.path={sock},writable=on,num-queues=1"
            ),
        ]
    return spawn(cmd, log, [sock], ready=Ready.ACCEPTS, env=env)


class ReadLoop:
    """QD chains built once (header, 4 KiB buffer, status) and re-offered every round,
    so the Python side does as little as possible per request."""

    def __init__(self, fe: FrontEnd, ram: GuestRam, qd: int) -> None:
        self.q: DriverQueue = fe.setup_queue(0, size=128)
        self.ram = ram
        self.qd = qd
        self.rng = random.Random(7)
        self.heads: list[int] = []
        self.headers: list[int] = []
        for _ in range(qd):
            d = self.q.reserve_descs(3)
            hdr, buf, st = ram.alloc(16), ram.alloc(BLOCK, 4096), ram.alloc(1)
            self.q.write_desc(d[0], hdr, 16, VRING_DESC_F_NEXT, d[1])
            self.q.write_desc(d[1], buf, BLOCK, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, d[2])
            self.q.write_desc(d[2], st, 1, VRING_DESC_F_WRITE, 0)
            self.heads.append(d[0])
            self.headers.append(hdr)
        self.used = self.q.used_idx()
        self.done = 0

    def run(self, n: int) -> None:
        sectors = IMAGE_SIZE // 512 - 8
        while n > 0:
            batch = min(self.qd, n)
            for i in range(batch):
                self.ram.write(
                    self.headers[i], struct.pack("<IIQ", 0, 0, self.rng.randrange(0, sectors, 8))
                )
                self.q.put_avail(self.heads[i])
            target = (self.used + batch) & 0xFFFF
            # event idx: one interrupt when the whole batch is done, as a driver would ask
            self.q.set_used_event((target - 1) & 0xFFFF)
            self.q.kick()
            while self.q.used_idx() != target:
                self.q.wait_call(1.0)
            self.used = target
            n -= batch
            self.done += batch


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        kinds = ["ours", "qemu-storage-daemon"]
        if baseline_tree(metafunc.config) is not None:
            kinds.insert(1, "baseline-tree")
        metafunc.parametrize("backend", kinds, indirect=True)


@pytest.fixture
def backend(
    request: pytest.FixtureRequest, image: Path, tmp_path: Path
) -> Iterator[tuple[str, int, FrontEnd, GuestRam]]:
    kind = request.param
    if kind != "ours" and QSD is None:
        pytest.skip("qemu-storage-daemon not installed (apt-get install qemu-system-common)")
    sock = tmp_path / "bench.sock"
    d = _start(kind, image, sock, tmp_path / "backend.log", baseline_tree(request.config))
    ram = GuestRam(size=32 << 20)
    fe = FrontEnd(sock, ram).connect()
    fe.negotiate()
    fe.set_mem_table()
    try:
        yield kind, d.pid, fe, ram
    finally:
        fe.close()
        ram.close()
        d.stop(10)  # a benchmark asserts nothing about how the back end ends


@pytest.mark.parametrize("dirty_log", ["off", "on"])
@pytest.mark.parametrize("qd", [1, 32])
def test_randread_4k(
    benchmark: Any, backend: tuple[str, int, FrontEnd, GuestRam], qd: int, dirty_log: str
) -> None:
    """``dirty_log=on``: as during a live migration (SET_LOG_BASE, LOG_ALL, the rings'
    log flag), so what logging costs per request shows beside the same run without."""
    kind, pid, fe, ram = backend
    loop = ReadLoop(fe, ram, qd)
    log = FrontEndLog.for_ram(ram)
    if dirty_log == "on":
        start_logging(fe, log, acked=kind != "qemu-storage-daemon")
    loop.run(256)  # warm up
    cpu0, t0, n0 = _cpu_ns(pid), time.perf_counter(), loop.done
    benchmark.pedantic(loop.run, args=(REQUESTS_PER_ROUND,), rounds=ROUNDS, iterations=1)
    cpu1, t1, n1 = _cpu_ns(pid), time.perf_counter(), loop.done
    reqs = n1 - n0
    marked = len(log.take())
    log.close()
    if dirty_log == "on":
        assert marked > 0, "logging was on and nothing was marked"
    info = {
        "backend": kind,
        "qd": qd,
        "dirty_log": dirty_log,
        "requests": reqs,
        "requests_per_s": round(reqs / (t1 - t0)),
        "backend_cpu_us_per_request": round((cpu1 - cpu0) / reqs / 1000, 3),
    }
    benchmark.extra_info.update(info)
    print(
        f"\n{kind:>20} qd={qd:<3} log={dirty_log:<3} {info['requests_per_s']:>8} req/s  "
        f"backend CPU {info['backend_cpu_us_per_request']:.2f} us/request"
    )
    assert os.path.exists(f"/proc/{pid}")  # the back end survived the run
