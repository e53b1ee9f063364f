"""Network benchmark: iperf3 TCP between the guest and the host side of a TAP.

Everything -- the TAP, the host's iperf3 server, QEMU and our back end -- runs in
a network namespace made for the run (tests/netns.py) and deleted afterwards;
it holds only lo and the TAP and has no route out, so no packet leaves it.

Device kinds: ``e1000`` and ``virtio`` (QEMU's TAP back end with an emulated
e1000 / virtio-net-pci NIC) and ``ours`` (``vhost-user-net --tap``).  Per boot
the guest runs ``iperf3 -c HOST -t R`` (guest sends, ``tx``) then with ``-R``
(guest receives, ``rx``).  CPU is the back end's: QEMU itself for e1000/virtio,
the ``vhost-user-net`` process for ours.

Per direction the guest's NIC interrupts (``/proc/interrupts`` before and after) and,
for ours, the daemon's queue counters from its ``--metrics`` endpoint (scraped inside
the namespace) are reported per MB received: how many buffers, kicks and interrupts
a megabyte costs on each side.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.guest import net_workloads as nw
from tests.netns import NetNs
from tests.support.daemon import installed_command, spawn_net_for_qemu

from .disk import parse_metrics
from .vm import GuestRun, run_guest

#: our daemon's per-queue counters reported per MB received (queue 0 rx, 1 tx)
PER_MB = (
    ("vhost_queue_chains_total/q0", "rx_bufs_per_mb"),
    ("vhost_queue_interrupts_total/q0", "rx_signals_per_mb"),
    ("vhost_queue_batch_chains_count/q0", "rx_bursts_per_mb"),
    ("vhost_queue_chains_total/q1", "tx_chains_per_mb"),
    ("vhost_queue_kicks_total/q1", "tx_kicks_per_mb"),
    ("vhost_queue_kicks_total/q0", "rx_kicks_per_mb"),
)


def nic_interrupts(text: str) -> int:
    """The guest NIC's interrupts in one /proc/interrupts snapshot (virtio or eth0)."""
    total = 0
    for line in text.splitlines():
        if not ("virtio" in line and "config" not in line) and "eth0" not in line:
            continue
        total += sum(int(f) for f in line.split()[1:] if f.isdigit())
    return total


_SCRAPE = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
)

DEVICES = ("e1000", "virtio", "ours")
DIRECTIONS = ("tx", "rx")  # guest sends / guest receives
HOST_IP, GUEST_IP = "10.99.0.1", "10.99.0.2"
PORT = 5201
GB = 1e9
CPU_PROCESS = {
    "e1000": "qemu-system-x86_64 (whole VM: NIC emulation + TCG guest CPU)",
    "virtio": "qemu-system-x86_64 (whole VM: virtio-net + TCG guest CPU)",
    "ours": "vhost-user-net",
}

BODY = r"""
net_up
wait_reachable $HOST 30 || exit 1
for dir in tx rx; do
    flag=; [ $dir = rx ] && flag=-R
    cat /proc/interrupts > /tmp/irq.0
    echo BENCH-RUN $dir
    iperf3 -c $HOST -p $PORT -t $RUNTIME $flag -J > /tmp/$dir.json 2>/tmp/$dir.err \
        || { cat /tmp/$dir.err /tmp/$dir.json; exit 1; }
    echo BENCH-DONE $dir
    cat /proc/interrupts > /tmp/irq.1
    echo BENCH-OUT-BEGIN $dir.irq
    cat /tmp/irq.0; echo IRQ-AFTER; cat /tmp/irq.1
    echo BENCH-OUT-END $dir.irq
    echo BENCH-OUT-BEGIN $dir
    cat /tmp/$dir.json
    echo
    echo BENCH-OUT-END $dir
    sleep 1
done
"""


def guest_script(runtime: int) -> str:
    head = "".join(
        f"{k}={shlex.quote(str(v))}\n"
        for k, v in {
            "IF": "",
            "ADDR": f"{GUEST_IP}/24",
            "MTU": "",
            "LINK_TIMEOUT": 20,
            "NC_TIMEOUT": 30,
            "LISTEN_TIMEOUT": 30,
            "HOST": HOST_IP,
            "PORT": PORT,
            "RUNTIME": runtime,
        }.items()
    )
    return head + nw.NET_SH_LIB + BODY


def available(device: str) -> str | None:
    if device == "ours" and installed_command("net") is None:
        return "vhost-user-net is not installed"
    return None


def run_one(
    device: str,
    *,
    base: Path,
    workdir: Path,
    tag: str,
    accel: str,
    runtime: int,
    on_mark: Callable[[str, str], None] | None = None,
) -> tuple[dict[str, dict[str, float]], GuestRun]:
    """One boot of ``device`` in a fresh namespace; returns direction -> metrics."""
    workdir.mkdir(parents=True, exist_ok=True)
    timeout = 90.0 + 2 * (runtime + 10) * 2
    with NetNs("bench") as ns:
        tap = ns.add_tap("tap0", f"{HOST_IP}/24")
        ns.check_isolated()
        with open(workdir / f"{tag}.iperf3.log", "wb") as server_log:
            ns.popen(
                ["iperf3", "-s", "-B", HOST_IP, "-p", str(PORT)],
                stdout=server_log,
                stderr=subprocess.STDOUT,
            )
        backend_pid: int | None = None
        backend = None
        metrics_url: str | None = None
        if device == "ours":
            bdir = workdir / f"{tag}-be"
            bdir.mkdir(exist_ok=True)
            backend = spawn_net_for_qemu(ns, bdir, "--metrics", "127.0.0.1:0", tap=tap)
            backend_pid = backend.pid
            (line,) = backend.wait_log("metrics on http://")
            url_m = re.search(r"metrics on (http://\S+/metrics)", line)
            metrics_url = url_m.group(1) if url_m else None
            nic = nw.vhost_user_net_args(backend.sockets[0], mac=nw.mac_addr(1))
        elif device in ("e1000", "virtio"):
            model = "e1000" if device == "e1000" else "virtio-net-pci"
            nic = nw.tap_nic_args(tap, model=model, mac=nw.mac_addr(1))
        else:
            raise ValueError(f"unknown net device {device!r}")
        time.sleep(0.3)  # let the iperf3 server bind
        counters: dict[tuple[str, str], dict[str, float]] = {}

        def mark(kind: str, name: str) -> None:
            if metrics_url is not None:
                r = ns.run([sys.executable, "-c", _SCRAPE, metrics_url], check=False)
                if r.returncode == 0:
                    counters[(kind, name)] = parse_metrics(r.stdout)
            if on_mark is not None:
                on_mark(kind, name)

        run = run_guest(
            base,
            guest_script(runtime),
            nic,
            workdir=workdir,
            name=tag,
            accel=accel,
            cpu_pid=lambda g: backend_pid if backend_pid is not None else g.pid,
            timeout=timeout,
            wrap=ns.exec_args,
            on_mark=mark,
        )
        if backend is not None:
            backend.check_clean_exit()
    if run.rc != 0:
        raise RuntimeError(f"{tag}: guest workload failed rc={run.rc}:\n{run.text[-2000:]}")
    out = parse(run)
    for d, m in out.items():
        a, b = counters.get(("RUN", d)), counters.get(("DONE", d))
        mb = m["bytes"] / 1e6
        if a is None or b is None or mb <= 0:
            continue
        for name, key in PER_MB:
            if name in b:
                m[key] = (b[name] - a.get(name, 0.0)) / mb
    return out, run


def parse(run: GuestRun) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for d in DIRECTIONS:
        raw = run.outputs.get(d)
        if raw is None:
            continue
        end = json.loads(raw)["end"]
        rcv = end["sum_received"]
        nbytes = float(rcv["bytes"])
        irq_raw = run.outputs.get(f"{d}.irq")
        irqs = None
        if irq_raw is not None:
            before, sep, after = irq_raw.partition("IRQ-AFTER")
            irqs = nic_interrupts(after) - nic_interrupts(before) if sep else None
        span = run.spans.get(d)
        cpu = span.cpu if span is not None and span.t1 > 0 else float("nan")
        out[d] = {
            "gbps": float(rcv["bits_per_second"]) / 1e9,
            "retransmits": float(end.get("sum_sent", {}).get("retransmits", 0)),
            "cpu_s": cpu,
            "bytes": nbytes,
            "cpu_s_per_gb": cpu / (nbytes / GB) if nbytes > 0 else float("nan"),
            "guest_irqs_per_mb": irqs / (nbytes / 1e6)
            if irqs is not None and nbytes > 0
            else float("nan"),
        }
    return out


def estimate_seconds(runtime: int) -> float:
    return 10.0 + 2 * (runtime + 2.5)
