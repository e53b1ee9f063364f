"""Disk benchmark: fio inside the guest against one block device kind per boot.

Device kinds (all on the same raw image):

* ``ide``    -- QEMU-emulated IDE, ``cache=none`` (guest /dev/sda);
* ``virtio`` -- QEMU's built-in virtio-blk-pci, ``cache=none`` (/dev/vda);
* ``qsd``    -- qemu-storage-daemon's vhost-user-blk export (/dev/vda);
* ``ours``   -- our ``vhost-user-blk`` (/dev/vda).

The CPU figure is the back-end process's utime+stime over each workload: for
``ide`` and ``virtio`` that process is QEMU itself (so it includes the guest's
emulated CPU under TCG), for ``qsd`` and ``ours`` it is the daemon alone.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.dpdk import wait_for_sockets
from tests.support.daemon import spawn_blk_for_qemu

from .vm import GuestRun, run_guest

DEVICES = ("ide", "virtio", "qsd", "ours")
IMAGE_MB = 256
GB = 1e9

CPU_PROCESS = {
    "ide": "qemu-system-x86_64 (whole VM: device emulation + TCG guest CPU)",
    "virtio": "qemu-system-x86_64 (whole VM: device emulation + TCG guest CPU)",
    "qsd": "qemu-storage-daemon",
    "ours": "vhost-user-blk",
}
CACHING = {
    "ide": "cache=none (O_DIRECT on the host)",
    "virtio": "cache=none (O_DIRECT on the host)",
    "qsd": "driver=file default (host page cache)",
    "ours": "buffered (host page cache)",
}


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def is_read(self) -> bool:
        return "read" in self.rw

    @property
    def small(self) -> bool:
        return self.bs == "4k"


WORKLOADS = (
    Workload("randread-4k-qd1", "randread", "4k", 1),
    Workload("randread-4k-qd32", "randread", "4k", 32),
    Workload("randwrite-4k-qd32", "randwrite", "4k", 32),
    Workload("seqread-1m-qd4", "read", "1m", 4),
    Workload("seqwrite-1m-qd4", "write", "1m", 4),
)
WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)


def guest_script(workloads: tuple[Workload, ...], runtime: int) -> str:
    lines = [
        "DEV=",
        "for d in vda sda; do [ -b /dev/$d ] && { DEV=/dev/$d; break; }; done",
        '[ -n "$DEV" ] || { echo "FAIL: no disk"; ls /sys/block; exit 1; }',
        'echo "RESULT dev=$DEV"',
        'echo "RESULT fio=$(fio --version)"',
    ]
    for w in workloads:
        extra = "--norandommap --randrepeat=0 " if w.rw.startswith("rand") else ""
        lines += [
            f"echo BENCH-RUN {w.name}",
            (
                f"fio --name={w.name} --filename=$DEV --rw={w.rw} --bs={w.bs} "
                f"--iodepth={w.iodepth} --direct=1 --ioengine=libaio --time_based "
                f"--runtime={runtime} {extra}--output-format=json --output=/tmp/{w.name}.json "
                f"> /tmp/{w.name}.err 2>&1 || {{ cat /tmp/{w.name}.err; exit 1; }}"
            ),
            f"echo BENCH-DONE {w.name}",
            f"echo BENCH-OUT-BEGIN {w.name}",
            f"cat /tmp/{w.name}.json",
            "echo",
            f"echo BENCH-OUT-END {w.name}",
        ]
    return "\n".join(lines) + "\n"


def make_image(path: Path, mb: int = IMAGE_MB) -> Path:
    """A raw image full of non-zero data (reads move real bytes, not holes)."""
    block = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        f.writelines(block for _ in range(mb))
        f.flush()
    return path


@contextlib.contextmanager
def _qsd(img: Path, sock: Path, log: Path) -> Iterator[int]:
    argv = [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=f0,filename={img}",
        "--export",
        (
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
            "writable=on,num-queues=1"
        ),
    ]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True
        )
    try:
        wait_for_sockets([sock], 15.0, alive=lambda: proc.poll() is None)
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock.unlink(missing_ok=True)


@contextlib.contextmanager
def _ours(img: Path, workdir: Path, name: str) -> Iterator[int]:
    d = spawn_blk_for_qemu(workdir, name, image=img, socket_path=workdir / f"{name}.sock")
    try:
        yield d.pid
    finally:
        if d.alive():
            d.terminate()


def run_one(
    device: str,
    *,
    base: Path,
    image: Path,
    workdir: Path,
    tag: str,
    accel: str,
    runtime: int,
    workloads: tuple[Workload, ...],
    on_mark: Callable[[str, str], None] | None = None,
) -> tuple[dict[str, dict[str, float]], GuestRun]:
    """One boot of ``device``; returns workload -> metrics, and the raw run."""
    workdir.mkdir(parents=True, exist_ok=True)  # the daemon's log goes there before the boot
    script = guest_script(workloads, runtime)
    timeout = 60.0 + len(workloads) * (runtime + 15) * 2
    vu = [
        "-chardev",
        "socket,id=c0,path=@SOCK@",
        "-device",
        "vhost-user-blk-pci,chardev=c0,num-queues=1",
    ]
    sock = workdir / f"{tag}.sock"
    daemon: contextlib.AbstractContextManager[int | None]
    if device == "ide":
        args = ["-drive", f"file={image},format=raw,if=ide,cache=none"]
        daemon = contextlib.nullcontext(None)
    elif device == "virtio":
        args = [
            "-drive",
            f"file={image},if=none,id=d0,format=raw,cache=none",
            "-device",
            "virtio-blk-pci,drive=d0",
        ]
        daemon = contextlib.nullcontext(None)
    elif device == "qsd":
        args = [a.replace("@SOCK@", str(sock)) for a in vu]
        daemon = _qsd(image, sock, workdir / f"{tag}.qsd.log")
    elif device == "ours":
        args = [a.replace("@SOCK@", str(sock)) for a in vu]
        daemon = _ours(image, workdir, tag)
    else:
        raise ValueError(f"unknown disk device {device!r}")
    with daemon as dpid:
        run = run_guest(
            base,
            script,
            args,
            workdir=workdir,
            name=tag,
            accel=accel,
            cpu_pid=lambda g: dpid if dpid is not None else g.pid,
            timeout=timeout,
            on_mark=on_mark,
        )
    if run.rc != 0:
        raise RuntimeError(f"{tag}: guest workload failed rc={run.rc}:\n{run.text[-2000:]}")
    return parse(run, workloads), run


def parse(run: GuestRun, workloads: tuple[Workload, ...]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for w in workloads:
        raw = run.outputs.get(w.name)
        if raw is None:
            continue
        job = json.loads(raw)["jobs"][0]
        side = job["read" if w.is_read else "write"]
        if job.get("error"):
            continue
        pct = side.get("clat_ns", {}).get("percentile", {})
        nbytes = float(side["io_bytes"])
        span = run.spans.get(w.name)
        cpu = span.cpu if span is not None and span.t1 > 0 else float("nan")
        out[w.name] = {
            "iops": float(side["iops"]),
            "mbps": float(side["bw_bytes"]) / 1e6,
            "p50_us": float(pct.get("50.000000", "nan")) / 1000,
            "p99_us": float(pct.get("99.000000", "nan")) / 1000,
            "cpu_s": cpu,
            "bytes": nbytes,
            "cpu_s_per_gb": cpu / (nbytes / GB) if nbytes > 0 else float("nan"),
            "wall_s": span.seconds if span is not None and span.t1 > 0 else float("nan"),
        }
    return out


def estimate_seconds(runtime: int, n_workloads: int) -> float:
    """Rough wall time of one disk boot under TCG (boot ~8 s, fio start ~1 s each)."""
    return 10.0 + n_workloads * (runtime + 1.0)


def now() -> float:
    return time.monotonic()
