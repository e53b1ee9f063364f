"""``python -m bench --quick`` end to end, restricted to keep CI short (~2 minutes):
IDE and our vhost-user-blk (2 s per fio workload), our vhost-user-net, and the DPDK
packet-rate loop at 64 B only for 1 s.  Every selected device/workload must report a
figure > 0 in results.json, and results.md must be written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or not list(Path("/boot").glob("vmlinuz-*")),
        reason="needs qemu-system-x86_64 and a guest kernel in /boot",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace, TAP)"),
]


def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "bench", "--quick", "--out", str(out),
        "--disk", "ide,ours", "--cache", "writeback", "--net", "ours", "--runtime", "2",
        "--pkt-sizes", "64",
    ]  # fmt: skip
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    log = f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert (out / "results.md").exists(), log
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["accel"] in ("kvm", "tcg"), res["meta"]
    assert res["meta"]["qemu_version"] and res["meta"]["cpu_model"], res["meta"]
    assert r.returncode == 0, log
    assert not res["errors"], res["errors"]

    disk = res["disk"]["results"]["writeback"]
    for dev in ("ide", "ours"):
        for wl in res["disk"]["workloads"]:
            m = disk[dev][wl]
            assert m["iops"]["median"] > 0 and m["mbps"]["median"] > 0, (dev, wl, m)
            assert m["p99_us"]["median"] > 0, (dev, wl, m)
            # the guest saw interrupts from its disk, and our daemon counted its kicks
            assert m["guest_irqs_per_req"]["median"] > 0, (dev, wl, m)
        assert disk["ours"][wl]["kicks_per_req"]["median"] > 0, disk["ours"][wl]
    for d in ("tx", "rx"):
        m = res["net"]["results"]["ours"][d]
        assert m["gbps"]["median"] > 0, (d, m)
    md = (out / "results.md").read_text()
    assert "accelerator" in md and "QEMU" in md, md[:2000]
    pk = res["pktrate"]
    if pk.get("skipped"):
        pytest.skip(f"packet rate skipped: {pk['skipped']} (disk and net checked)")
    for be in pk["backends"]:
        assert pk["results"][be]["64"]["mpps"]["median"] > 0, (be, pk)
