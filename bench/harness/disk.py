"""Disk benchmark: fio inside the guest against one block device kind per boot.

Device kinds (all on the same raw image):

* ``ide``    -- QEMU-emulated IDE (guest /dev/sda);
* ``virtio`` -- QEMU's built-in virtio-blk-pci (/dev/vda);
* ``qsd``    -- qemu-storage-daemon's vhost-user-blk export (/dev/vda);
* ``ours``   -- our ``vhost-user-blk`` (/dev/vda).

Each runs in one host cache mode per boot, the same for all of them (``CACHE_MODES``):
``none`` bypasses the host page cache (O_DIRECT: QEMU's ``cache=none``, qsd's
``cache.direct=on``, our ``--cache none``), ``writeback`` goes through it (QEMU's
default). Alongside fio's figures each boot counts the guest's interrupts per request
(``/proc/interrupts`` before and after, for every device), and for ours the daemon's
own counters from its ``--metrics`` endpoint (kicks, interrupts, chains and batches per
request, and whatever per-stage timing the blk queues export).

The CPU figure is the back-end process's utime+stime over each workload: for
``ide`` and ``virtio`` that process is QEMU itself (so it includes the guest's
emulated CPU under TCG), for ``qsd`` and ``ours`` it is the daemon alone.
"""

from __future__ import annotations

import contextlib
import json
import re
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
CACHE_MODES = ("none", "writeback")
CACHING = {
    ("ide", "none"): "-drive cache=none (O_DIRECT), aio=threads",
    ("virtio", "none"): "-drive cache=none (O_DIRECT), aio=threads",
    ("qsd", "none"): "driver=file,cache.direct=on,aio=io_uring",
    ("ours", "none"): "--cache none (O_DIRECT)",
    ("ide", "writeback"): "-drive cache=writeback (host page cache), aio=threads",
    ("virtio", "writeback"): "-drive cache=writeback (host page cache), aio=threads",
    ("qsd", "writeback"): "driver=file,cache.direct=off,aio=io_uring (host page cache)",
    ("ours", "writeback"): "--cache writeback (host page cache)",
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
            "cat /proc/interrupts > /tmp/irq.0",
            f"echo BENCH-RUN {w.name}",
            (
                f"fio --name={w.name} --filename=$DEV --rw={w.rw} --bs={w.bs} "
                f"--iodepth={w.iodepth} --direct=1 --ioengine=libaio --time_based "
                f"--runtime={runtime} {extra}--output-format=json --output=/tmp/{w.name}.json "
                f"> /tmp/{w.name}.err 2>&1 || {{ cat /tmp/{w.name}.err; exit 1; }}"
            ),
            f"echo BENCH-DONE {w.name}",
            "cat /proc/interrupts > /tmp/irq.1",
            f"echo BENCH-OUT-BEGIN {w.name}.irq",
            "cat /tmp/irq.0; echo IRQ-AFTER; cat /tmp/irq.1",
            f"echo BENCH-OUT-END {w.name}.irq",
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


def disk_interrupts(text: str) -> int:
    """Interrupts of the disk in one /proc/interrupts snapshot: the virtio lines (not
    the config-change vector) or the IDE controller's; all CPUs added up."""
    total = 0
    for line in text.splitlines():
        if not ("virtio" in line and "config" not in line) and "ata_piix" not in line:
            continue
        fields = line.split()[1:]
        total += sum(int(f) for f in fields if f.isdigit())
    return total


def interrupts_between(raw: str) -> int | None:
    before, sep, after = raw.partition("IRQ-AFTER")
    return disk_interrupts(after) - disk_interrupts(before) if sep else None


QUEUE_LABEL = re.compile(r'[{,]queue="(\d+)"')


def parse_metrics(body: str) -> dict[str, float]:
    """A Prometheus text page: each metric name's samples added up over their labels,
    and per queue as ``NAME/qN`` where a sample has a queue label."""
    out: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name.endswith("_bucket"):
            continue
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + v
        q = QUEUE_LABEL.search(name_labels)
        if q is not None:
            key = f"{name}/q{q.group(1)}"
            out[key] = out.get(key, 0.0) + v
    return out


def scrape(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return parse_metrics(r.read().decode())


@contextlib.contextmanager
def _qsd(img: Path, sock: Path, log: Path, cache: str) -> Iterator[int]:
    direct = "on" if cache == "none" else "off"
    argv = [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=f0,filename={img},cache.direct={direct},aio=io_uring",
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


@dataclass
class Ours:
    pid: int
    metrics_url: str


@contextlib.contextmanager
def _ours(img: Path, workdir: Path, name: str, cache: str) -> Iterator[Ours]:
    # writeback is the daemon's default: named only when it is not
    extra = ("--cache", cache) if cache != "writeback" else ()
    d = spawn_blk_for_qemu(
        workdir,
        name,
        *extra,
        "--metrics",
        "127.0.0.1:0",
        image=img,
        socket_path=workdir / f"{name}.sock",
    )
    try:
        (line,) = d.wait_log("metrics on http://")
        m = re.search(r"metrics on (http://\S+/metrics)", line)
        assert m is not None, line
        yield Ours(d.pid, m.group(1))
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
    cache: str = "writeback",
    on_mark: Callable[[str, str], None] | None = None,
) -> tuple[dict[str, dict[str, float]], GuestRun]:
    """One boot of ``device`` in host cache mode ``cache``; returns workload -> metrics,
    and the raw run."""
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}")
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
    daemon: contextlib.AbstractContextManager[int | Ours | None]
    if device == "ide":
        args = ["-drive", f"file={image},format=raw,if=ide,cache={cache}"]
        daemon = contextlib.nullcontext(None)
    elif device == "virtio":
        args = [
            "-drive",
            f"file={image},if=none,id=d0,format=raw,cache={cache}",
            "-device",
            "virtio-blk-pci,drive=d0",
        ]
        daemon = contextlib.nullcontext(None)
    elif device == "qsd":
        args = [a.replace("@SOCK@", str(sock)) for a in vu]
        daemon = _qsd(image, sock, workdir / f"{tag}.qsd.log", cache)
    elif device == "ours":
        args = [a.replace("@SOCK@", str(sock)) for a in vu]
        daemon = _ours(image, workdir, tag, cache)
    else:
        raise ValueError(f"unknown disk device {device!r}")
    counters: dict[tuple[str, str], dict[str, float]] = {}
    with daemon as d:
        dpid = d.pid if isinstance(d, Ours) else d

        def mark(kind: str, name: str) -> None:
            if isinstance(d, Ours):
                with contextlib.suppress(OSError):
                    counters[(kind, name)] = scrape(d.metrics_url)
            if on_mark is not None:
                on_mark(kind, name)

        run = run_guest(
            base,
            script,
            args,
            workdir=workdir,
            name=tag,
            accel=accel,
            cpu_pid=lambda g: dpid if dpid is not None else g.pid,
            timeout=timeout,
            on_mark=mark,
        )
    if run.rc != 0:
        raise RuntimeError(f"{tag}: guest workload failed rc={run.rc}:\n{run.text[-2000:]}")
    out = parse(run, workloads)
    for w in workloads:
        m = out.get(w.name)
        a, b = counters.get(("RUN", w.name)), counters.get(("DONE", w.name))
        if m is None or a is None or b is None or not m.get("ios"):
            continue
        m.update(per_request({k: b[k] - a.get(k, 0.0) for k in b}, m["ios"]))
    return out, run


#: the daemon's counters reported per request (the metric, the column's key)
PER_REQUEST = (
    ("vhost_queue_kicks_total", "kicks_per_req"),
    ("vhost_queue_interrupts_total", "signals_per_req"),
    ("vhost_queue_batch_chains_count", "batches_per_req"),
)


def per_request(delta: dict[str, float], ios: float) -> dict[str, float]:
    """The daemon's counter deltas over one workload as figures per request; every
    ``*_seconds_sum``/``*_seconds_count`` pair (per-stage timing) as a mean in µs."""
    out = {key: delta[name] / ios for name, key in PER_REQUEST if name in delta}
    kicks = delta.get("vhost_queue_kicks_total", 0.0)
    chains = delta.get("vhost_queue_chains_total")
    if kicks > 0 and chains is not None:
        out["chains_per_kick"] = chains / kicks
    for name, value in delta.items():
        if name.endswith("_seconds_sum"):
            count = delta.get(name.removesuffix("_sum") + "_count", 0.0)
            if count > 0:
                stage = name.removeprefix("vhost_").removesuffix("_seconds_sum")
                out[f"stage_us.{stage}"] = value / count * 1e6
    return out


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
        ios = float(side.get("total_ios", 0))
        irq_raw = run.outputs.get(f"{w.name}.irq")
        irqs = interrupts_between(irq_raw) if irq_raw is not None else None
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
            "ios": ios,
            "cpu_us_per_io": cpu / ios * 1e6 if ios > 0 else float("nan"),
            "guest_irqs_per_req": irqs / ios if irqs is not None and ios > 0 else float("nan"),
        }
    return out


def estimate_seconds(runtime: int, n_workloads: int) -> float:
    """Rough wall time of one disk boot under TCG (boot ~8 s, fio start ~1 s each)."""
    return 10.0 + n_workloads * (runtime + 1.0)


def now() -> float:
    return time.monotonic()
