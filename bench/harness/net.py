"""Network benchmark: iperf3 TCP between the guest and the host side of a TAP.

Everything -- the TAP, the host's iperf3 server, QEMU and our back end -- runs in
a network namespace made for the run (tests/netns.py) and deleted afterwards;
it holds only lo and the TAP and has no route out, so no packet leaves it.

Device kinds: ``e1000`` and ``virtio`` (QEMU's TAP back end with an emulated
e1000 / virtio-net-pci NIC) and ``ours`` (``vhost-user-net --tap``).  Per boot
the guest runs ``iperf3 -c HOST -t R`` (guest sends, ``tx``) then with ``-R``
(guest receives, ``rx``).  CPU is the back end's: QEMU itself for e1000/virtio,
the ``vhost-user-net`` process for ours.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.guest import net_workloads as nw
from tests.netns import NetNs
from tests.support.daemon import installed_command, spawn_net_for_qemu

from .vm import GuestRun, run_guest

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
    echo BENCH-RUN $dir
    iperf3 -c $HOST -p $PORT -t $RUNTIME $flag -J > /tmp/$dir.json 2>/tmp/$dir.err \
        || { cat /tmp/$dir.err /tmp/$dir.json; exit 1; }
    echo BENCH-DONE $dir
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
        if device == "ours":
            bdir = workdir / f"{tag}-be"
            bdir.mkdir(exist_ok=True)
            backend = spawn_net_for_qemu(ns, bdir, tap=tap)
            backend_pid = backend.pid
            nic = nw.vhost_user_net_args(backend.sockets[0], mac=nw.mac_addr(1))
        elif device in ("e1000", "virtio"):
            model = "e1000" if device == "e1000" else "virtio-net-pci"
            nic = nw.tap_nic_args(tap, model=model, mac=nw.mac_addr(1))
        else:
            raise ValueError(f"unknown net device {device!r}")
        time.sleep(0.3)  # let the iperf3 server bind
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
            on_mark=on_mark,
        )
        if backend is not None:
            backend.check_clean_exit()
    if run.rc != 0:
        raise RuntimeError(f"{tag}: guest workload failed rc={run.rc}:\n{run.text[-2000:]}")
    return parse(run), run


def parse(run: GuestRun) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for d in DIRECTIONS:
        raw = run.outputs.get(d)
        if raw is None:
            continue
        end = json.loads(raw)["end"]
        rcv = end["sum_received"]
        nbytes = float(rcv["bytes"])
        span = run.spans.get(d)
        cpu = span.cpu if span is not None and span.t1 > 0 else float("nan")
        out[d] = {
            "gbps": float(rcv["bits_per_second"]) / 1e9,
            "retransmits": float(end.get("sum_sent", {}).get("retransmits", 0)),
            "cpu_s": cpu,
            "bytes": nbytes,
            "cpu_s_per_gb": cpu / (nbytes / GB) if nbytes > 0 else float("nan"),
        }
    return out


def estimate_seconds(runtime: int) -> float:
    return 10.0 + 2 * (runtime + 2.5)
