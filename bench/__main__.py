"""One-command benchmark: ``python -m bench [--quick] [--out DIR] ...``.

Boots the same small Linux guest under QEMU once per device kind (interleaved
when repeating: A B C D A B C D), runs the same workload inside and reports:

* disk   -- fio (4 KiB randread QD1/QD32, randwrite QD32, 1 MiB seq read/write) on
  QEMU IDE, QEMU virtio-blk, qemu-storage-daemon vhost-user-blk and ours, each in
  both host cache modes (``--cache none,writeback``: O_DIRECT, or the page cache);
* net    -- iperf3 TCP both ways on e1000, QEMU virtio-net (TAP) and ours
  (vhost-user-net --tap), all inside a throw-away network namespace;
* pktrate -- DPDK virtio-user loop through DPDK's vhost back end and our switch.

Writes results.json, results.md and results.png (if matplotlib is installed) to
--out (default bench/results).  Every figure comes from a run in this invocation.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# run as a script (python bench): the project root must be importable first
from bench.harness import disk, net, pktrate, report, sysinfo  # noqa: E402
from bench.harness.stats import Progress, fmt_duration, summary  # noqa: E402
from tests.guest import build, qemu  # noqa: E402

DEFAULT_RUNTIME = 5
DEFAULT_REPEAT = 2
QUICK_RUNTIME = 2


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    if value.strip().lower() in ("", "none", "off"):
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {','.join(allowed)}")
    return items


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--disk", default=",".join(disk.DEVICES), help="disk devices: ide,virtio,qsd,ours (or none)"
    )
    p.add_argument(
        "--disk-workloads", default=",".join(disk.WORKLOAD_NAMES), help="fio workloads to run"
    )
    p.add_argument(
        "--cache",
        default=",".join(disk.CACHE_MODES),
        help="host cache modes for every disk device: none (O_DIRECT), writeback (page cache)",
    )
    p.add_argument("--net", default=",".join(net.DEVICES), help="NICs: e1000,virtio,ours (or none)")
    p.add_argument("--pktrate", choices=("on", "off"), default="on")
    p.add_argument("--pkt-sizes", default="64,1500", help="frame sizes for --pktrate")
    p.add_argument("--only", choices=("disk", "net", "pktrate"))
    p.add_argument(
        "--runtime",
        type=int,
        help=f"seconds per workload (default {DEFAULT_RUNTIME}, --quick {QUICK_RUNTIME})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        help=f"interleaved boots per device (default {DEFAULT_REPEAT}, --quick 1)",
    )
    p.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default="auto",
        help="auto: kvm only when a probe guest really runs under it",
    )
    p.add_argument("--quick", action="store_true", help="short runtime, one boot per device")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--keep-logs", action="store_true", help="keep guest/daemon logs")
    a = p.parse_args(argv)
    try:
        a.disk_devices = _csv(a.disk, disk.DEVICES, "disk device")
        a.workloads = _csv(a.disk_workloads, disk.WORKLOAD_NAMES, "disk workload")
        a.caches = _csv(a.cache, disk.CACHE_MODES, "cache mode")
        a.net_devices = _csv(a.net, net.DEVICES, "net device")
        a.sizes = [int(s) for s in a.pkt_sizes.split(",") if s.strip()]
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if a.only == "disk":
        a.net_devices, a.pktrate = [], "off"
    elif a.only == "net":
        a.disk_devices, a.pktrate = [], "off"
    elif a.only == "pktrate":
        a.disk_devices, a.net_devices, a.pktrate = [], [], "on"
    if a.runtime is None:
        a.runtime = QUICK_RUNTIME if a.quick else DEFAULT_RUNTIME
    if a.repeat is None:
        a.repeat = 1 if a.quick else DEFAULT_REPEAT
    if a.disk_devices and not a.caches:
        p.error("--cache needs at least one mode")
    if a.runtime < 1 or a.repeat < 1:
        p.error("--runtime and --repeat must be >= 1")
    return a


def _collect(samples: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    keys = sorted({k for s in samples for k in s})
    return {k: summary([s[k] for s in samples if k in s and not math.isnan(s[k])]) for k in keys}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t_start = time.monotonic()
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vhost-bench-"))
    errors: list[str] = []
    workloads = tuple(w for w in disk.WORKLOADS if w.name in args.workloads)
    need_guest = bool(args.disk_devices or args.net_devices)

    if need_guest and not qemu.qemu_available():
        print("qemu-system-x86_64 not found", file=sys.stderr)
        return 2
    base = build.build_base_initramfs(build.default_cache_dir()) if need_guest else None

    # -- accelerator ----------------------------------------------------------
    if args.accel == "auto":
        if need_guest:
            print(
                f"probing KVM with a tiny guest (up to {sysinfo.KVM_PROBE_TIMEOUT:.0f}s)...",
                flush=True,
            )
            tiny = build.build_base_initramfs(build.default_cache_dir(), binaries=())
            ok, why = sysinfo.probe_kvm(tiny)
            accel, reason = ("kvm", why) if ok else ("tcg", f"auto: {why}")
        else:
            accel, reason = "tcg", "no guests in this run"
    else:
        accel, reason = args.accel, "chosen with --accel"
    meta = sysinfo.collect(accel, reason)
    print(f"accelerator: {accel} ({reason})", flush=True)
    print(f"QEMU: {meta['qemu_version']}; CPU: {meta['cpu_model']}", flush=True)

    pkt_skip: str | None = None
    if args.pktrate == "on":
        pkt_skip = pktrate.unavailable()
        if pkt_skip:
            print(f"packet rate: skipped ({pkt_skip})", flush=True)
    net_devices = []
    for d in args.net_devices:
        why_net = net.available(d)
        if why_net:
            errors.append(f"net {d}: skipped: {why_net}")
        else:
            net_devices.append(d)

    # -- plan ---------------------------------------------------------------
    steps: list[tuple[str, str, float]] = []
    for r in range(args.repeat):
        for c in args.caches:
            for d in args.disk_devices:
                steps.append(
                    (
                        "disk",
                        f"disk {d} cache={c} #{r + 1}",
                        disk.estimate_seconds(args.runtime, len(workloads)),
                    )
                )
    for r in range(args.repeat):
        for d in net_devices:
            steps.append(("net", f"net {d} #{r + 1}", net.estimate_seconds(args.runtime)))
    if args.pktrate == "on" and not pkt_skip:
        for r in range(args.repeat):
            for s in args.sizes:
                for b in pktrate.BACKENDS:
                    steps.append(
                        (
                            "pkt",
                            f"pktrate {b} {s} B #{r + 1}",
                            pktrate.estimate_seconds(args.runtime),
                        )
                    )
    prog = Progress(steps)
    print(
        f"plan: {len(steps)} steps, runtime {args.runtime}s per workload, "
        f"{args.repeat} round(s), estimated {fmt_duration(prog.left())}",
        flush=True,
    )

    disk_samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
    net_samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    pkt_samples: dict[str, dict[str, list[dict[str, float]]]] = {}

    def marker(label: str) -> Any:
        def on_mark(kind: str, name: str) -> None:
            if kind == "RUN":
                Progress.note(f"{label}: {name} ({args.runtime}s)")

        return on_mark

    try:
        if args.disk_devices:
            assert base is not None
            image = disk.make_image(work / "disk.img")
            for r in range(args.repeat):
                for c in args.caches:
                    for d in args.disk_devices:
                        label = f"disk {d} cache={c} #{r + 1}"
                        prog.begin(f"{label}: booting guest")
                        try:
                            res, run = disk.run_one(
                                d,
                                base=base,
                                image=image,
                                workdir=work / "disk",
                                tag=f"{d}-{c}-{r}",
                                accel=accel,
                                runtime=args.runtime,
                                workloads=workloads,
                                cache=c,
                                on_mark=marker(label),
                            )
                            for wl, m in res.items():
                                disk_samples.setdefault(c, {}).setdefault(d, {}).setdefault(
                                    wl, []
                                ).append(m)
                            Progress.note(
                                f"{label}: boot {run.boot_s:.1f}s, total {run.total_s:.1f}s; "
                                + ", ".join(f"{wl} {m['iops']:,.0f} IOPS" for wl, m in res.items())
                            )
                        except Exception as e:
                            errors.append(f"{label}: {e}")
                            Progress.warn(f"{label} failed: {str(e).splitlines()[0]}")
                        prog.end()
        if net_devices:
            assert base is not None
            for r in range(args.repeat):
                for d in net_devices:
                    label = f"net {d} #{r + 1}"
                    prog.begin(f"{label}: booting guest in a network namespace")
                    try:
                        res, run = net.run_one(
                            d,
                            base=base,
                            workdir=work / "net",
                            tag=f"{d}-{r}",
                            accel=accel,
                            runtime=args.runtime,
                            on_mark=marker(label),
                        )
                        for k, m in res.items():
                            net_samples.setdefault(d, {}).setdefault(k, []).append(m)
                        Progress.note(f"{label}: boot {run.boot_s:.1f}s, total {run.total_s:.1f}s")
                    except Exception as e:
                        errors.append(f"net {d} #{r + 1}: {e}")
                        Progress.warn(f"{label} failed: {str(e).splitlines()[0]}")
                    prog.end()
        if args.pktrate == "on" and not pkt_skip:
            for r in range(args.repeat):
                for s in args.sizes:
                    for b in pktrate.BACKENDS:
                        label = f"pktrate {b} {s} B #{r + 1}"
                        prog.begin(f"{label}: {args.runtime}s loop")
                        try:
                            m = pktrate.run_one(
                                b, s, float(args.runtime), work / "pkt" / f"{b}-{s}-{r}"
                            )
                            pkt_samples.setdefault(b, {}).setdefault(str(s), []).append(m)
                            Progress.note(f"{label}: {m['mpps']:.3f} Mpps")
                        except Exception as e:
                            errors.append(f"pktrate {b} {s} B #{r + 1}: {e}")
                            Progress.warn(f"{label} failed: {str(e).splitlines()[0]}")
                        prog.end()
    except KeyboardInterrupt:
        errors.append("interrupted: partial results")
        print("\ninterrupted: writing partial results", file=sys.stderr)

    results: dict[str, Any] = {
        "meta": meta,
        "command": command,
        "options": {
            "runtime": args.runtime,
            "repeat": args.repeat,
            "quick": args.quick,
            "disk": args.disk_devices,
            "disk_workloads": [w.name for w in workloads],
            "disk_caches": args.caches,
            "net": args.net_devices,
            "pktrate": args.pktrate,
            "pkt_sizes": args.sizes,
            "disk_image_mb": disk.IMAGE_MB,
        },
    }
    if args.disk_devices:
        results["disk"] = {
            "devices": args.disk_devices,
            "workloads": [w.name for w in workloads],
            "fio": {w.name: {"rw": w.rw, "bs": w.bs, "iodepth": w.iodepth} for w in workloads},
            "cpu_process": {d: disk.CPU_PROCESS[d] for d in args.disk_devices},
            "caches": args.caches,
            "caching": {
                f"{d}/{c}": disk.CACHING[(d, c)] for c in args.caches for d in args.disk_devices
            },
            "results": {
                c: {d: {wl: _collect(s) for wl, s in v.items()} for d, v in per_dev.items()}
                for c, per_dev in disk_samples.items()
            },
        }
    if args.net_devices:
        results["net"] = {
            "devices": args.net_devices,
            "cpu_process": {d: net.CPU_PROCESS[d] for d in args.net_devices},
            "results": {d: {k: _collect(s) for k, s in v.items()} for d, v in net_samples.items()},
        }
    if args.pktrate == "on":
        results["pktrate"] = (
            {"skipped": pkt_skip}
            if pkt_skip
            else {
                "backends": list(pktrate.BACKENDS),
                "sizes": args.sizes,
                "results": {
                    b: {s: _collect(v) for s, v in d.items()} for b, d in pkt_samples.items()
                },
            }
        )
    results["targets"] = report.targets(results)
    results["errors"] = errors
    results["wall_s"] = round(time.monotonic() - t_start, 1)

    report.write_json(results, out / "results.json")
    (out / "results.md").write_text(report.render_md(results))
    why_no_png = report.write_png(results, out / "results.png")
    print()
    print(report.render_text(results))
    print()
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    if why_no_png:
        print(f"PNG skipped: {why_no_png}")
    else:
        print(f"wrote {out / 'results.png'}")
    print(f"wall time {fmt_duration(results['wall_s'])}")
    if errors and not args.keep_logs:
        args.keep_logs = True
    if args.keep_logs:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
