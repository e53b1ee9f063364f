"""Many boots of one guest disk workload, to catch rare hangs: ``python -m bench.harness.soak``.

Each boot runs one fio workload (default randwrite 4 KiB QD32, the workload a guest once
hung in) against one device and must finish within a deadline. A boot that does not
(or fails) keeps its console, daemon and QEMU logs under ``--out``; the daemon's log then
holds where each ring stood when QEMU was stopped (``stopped: avail idx ..., taken ...,
used idx ..., used_event ..., avail_event ...``), which tells a lost kick (buffers the
driver offered that we never took) from a lost interrupt (used entries the guest did
not see). One line per boot, and a summary at the end; exit status 1 if any boot failed.

    python -m bench.harness.soak --boots 50 --device ours --runtime 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import disk
from bench.harness.stats import fmt_duration
from tests.guest import build


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.harness.soak", description=__doc__)
    p.add_argument("--boots", type=int, default=50)
    p.add_argument("--device", choices=disk.DEVICES, default="ours")
    p.add_argument("--workload", choices=disk.WORKLOAD_NAMES, default="randwrite-4k-qd32")
    p.add_argument("--runtime", type=int, default=5, help="seconds of fio per boot")
    p.add_argument("--cache", choices=disk.CACHE_MODES, default="writeback")
    p.add_argument("--out", type=Path, default=Path("var/soak"))
    p.add_argument("--accel", default="tcg")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vhost-soak-"))
    base = build.build_base_initramfs(build.default_cache_dir())
    image = disk.make_image(work / "disk.img")
    workloads = tuple(w for w in disk.WORKLOADS if w.name == a.workload)
    t0 = time.monotonic()
    iops: list[float] = []
    failed: list[str] = []
    print(
        f"soak: {a.boots} boots of {a.workload} on {a.device} (cache={a.cache}), "
        f"{a.runtime}s of fio each; failures keep their logs in {a.out}",
        flush=True,
    )
    for i in range(a.boots):
        tag = f"{a.device}-{i}"
        wd = work / tag
        t_boot = time.monotonic()
        try:
            res, _ = disk.run_one(
                a.device,
                base=base,
                image=image,
                workdir=wd,
                tag=tag,
                accel=a.accel,
                runtime=a.runtime,
                workloads=workloads,
                cache=a.cache,
            )
            m = res.get(a.workload)
            if m is None:
                raise RuntimeError("fio printed no result")
            iops.append(m["iops"])
            status = f"ok   {m['iops']:8,.0f} IOPS"
        except Exception as e:
            failed.append(tag)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            status = f"FAIL {first[:120]}"
            shutil.copytree(wd, a.out / tag, dirs_exist_ok=True)
        shutil.rmtree(wd, ignore_errors=True)
        elapsed = time.monotonic() - t0
        left = elapsed / (i + 1) * (a.boots - i - 1)
        print(
            f"[{i + 1}/{a.boots}] {status}  ({time.monotonic() - t_boot:.0f}s; "
            f"elapsed {fmt_duration(elapsed)}, ~{fmt_duration(left)} left)",
            flush=True,
        )
    shutil.rmtree(work, ignore_errors=True)
    med = f", median {statistics.median(iops):,.0f} IOPS" if iops else ""
    print(
        f"soak: {a.boots - len(failed)}/{a.boots} boots finished{med}; "
        f"failed: {', '.join(failed) or 'none'} (wall {fmt_duration(time.monotonic() - t0)})",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
