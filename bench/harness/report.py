"""Tables, results.json / results.md and the bar chart of one benchmark run."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TCG_NOTE = (
    "Under TCG the guest's emulated CPU caps small I/O for every device: 4 KiB IOPS and "
    "TCP throughput mostly measure how much host CPU is left for QEMU's TCG thread, so "
    "compare devices only within one run. Back-end CPU competes with TCG on the same cores."
)
CPU_NOTE = (
    "CPU s/GB is the back-end process's utime+stime over the workload divided by the "
    "bytes moved. For the QEMU built-in devices (ide, virtio, e1000) the back end IS "
    "QEMU, so the figure includes the whole emulated guest CPU and is not comparable "
    "with the vhost-user daemons' own figures."
)

Summary = dict[str, Any]


def _med(s: Summary | None) -> float | None:
    if not s:
        return None
    v = s.get("median")
    return None if v is None else float(v)


def _spread(s: Summary | None) -> str:
    m = _med(s)
    if not s or m is None or not m or s.get("n", 0) < 2:
        return "-"
    return f"±{(float(s['max']) - float(s['min'])) / 2 / m * 100:.0f}%"


def _f(v: float | None, digits: int = 0) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{v:,.{digits}f}"


def disk_caches(res: dict[str, Any]) -> list[str]:
    """The host cache modes of a disk result (results from before cache modes: one)."""
    return list(res.get("caches") or ["writeback"])


def disk_results(res: dict[str, Any], cache: str) -> dict[str, Any]:
    """device -> workload -> summaries, for one host cache mode."""
    r = res.get("results", {})
    if "caches" in res:
        return dict(r.get(cache, {}))
    return dict(r)


def disk_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = [
        "workload",
        "device",
        "host cache",
        "IOPS",
        "MB/s",
        "spread",
        "p50 µs",
        "p99 µs",
        "CPU µs/IO",
        "CPU s/GB",
        "guest irq/IO",
        "n",
    ]
    rows: list[list[str]] = []
    for wl in res["workloads"]:
        for cache in disk_caches(res):
            dres = disk_results(res, cache)
            for dev in res["devices"]:
                r = dres.get(dev, {}).get(wl)
                if not r:
                    rows.append([wl, dev, cache] + ["n/a", "n/a", "-"] + ["n/a"] * 5 + ["0"])
                    continue
                main = r["iops"] if "4k" in wl else r["mbps"]
                rows.append(
                    [
                        wl,
                        dev,
                        cache,
                        _f(_med(r["iops"])),
                        _f(_med(r["mbps"]), 1),
                        _spread(main),
                        _f(_med(r["p50_us"])),
                        _f(_med(r["p99_us"])),
                        _f(_med(r.get("cpu_us_per_io")), 1),
                        _f(_med(r["cpu_s_per_gb"]), 2),
                        _f(_med(r.get("guest_irqs_per_req")), 2),
                        str(r["iops"]["n"]),
                    ]
                )
    return head, rows


#: per-request figures of our daemon's own counters (bench/harness/disk.py per_request)
OURS_COUNTERS = (
    ("kicks_per_req", "kicks/IO"),
    ("signals_per_req", "interrupts/IO"),
    ("batches_per_req", "passes/IO"),
    ("chains_per_kick", "chains/kick"),
)


def ours_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Where our daemon's time goes, per workload and cache mode: its counters per
    request and the mean of each sampled per-request stage (µs), when it exports them."""
    stages: list[str] = []
    for cache in disk_caches(res):
        for r in disk_results(res, cache).get("ours", {}).values():
            for k in r:
                if k.startswith("stage_us.") and k not in stages:
                    stages.append(k)
    head = ["workload", "host cache"] + [h for _, h in OURS_COUNTERS]
    head += [k.removeprefix("stage_us.") + " µs" for k in stages]
    rows: list[list[str]] = []
    for wl in res["workloads"]:
        for cache in disk_caches(res):
            r = disk_results(res, cache).get("ours", {}).get(wl)
            if not r or not any(k in r for k, _ in OURS_COUNTERS):
                continue
            cells = [_f(_med(r.get(k)), 2) for k, _ in OURS_COUNTERS]
            cells += [_f(_med(r.get(k)), 1) for k in stages]
            rows.append([wl, cache, *cells])
    return head, rows


def net_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["direction", "device", "Gbit/s", "spread", "CPU s/GB", "guest irq/MB", "n"]
    rows: list[list[str]] = []
    for d in ("tx", "rx"):
        for dev in res["devices"]:
            r = res["results"].get(dev, {}).get(d)
            if not r:
                rows.append([NET_DIRECTIONS[d], dev, "n/a", "-", "n/a", "n/a", "0"])
                continue
            rows.append(
                [
                    NET_DIRECTIONS[d],
                    dev,
                    _f(_med(r["gbps"]), 2),
                    _spread(r["gbps"]),
                    _f(_med(r["cpu_s_per_gb"]), 2),
                    _f(_med(r.get("guest_irqs_per_mb")), 1),
                    str(r["gbps"]["n"]),
                ]
            )
    return head, rows


NET_DIRECTIONS = {"tx": "guest->host", "rx": "host->guest"}
#: our net daemon's queue counters per MB received (bench/harness/net.py PER_MB)
OURS_NET_COUNTERS = (
    ("rx_bufs_per_mb", "rx buffers/MB"),
    ("rx_bursts_per_mb", "rx bursts/MB"),
    ("rx_signals_per_mb", "rx interrupts/MB"),
    ("rx_kicks_per_mb", "rx kicks/MB"),
    ("tx_chains_per_mb", "tx chains/MB"),
    ("tx_kicks_per_mb", "tx kicks/MB"),
)


def ours_net_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["direction"] + [h for _, h in OURS_NET_COUNTERS]
    rows: list[list[str]] = []
    for d in ("tx", "rx"):
        r = res["results"].get("ours", {}).get(d)
        if r and any(k in r for k, _ in OURS_NET_COUNTERS):
            rows.append([NET_DIRECTIONS[d]] + [_f(_med(r.get(k)), 1) for k, _ in OURS_NET_COUNTERS])
    return head, rows


def pkt_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["frame", "back end", "Mpps", "spread", "Gbit/s", "n"]
    rows: list[list[str]] = []
    for size in res["sizes"]:
        for be in res["backends"]:
            r = res["results"].get(be, {}).get(str(size))
            if not r:
                rows.append([f"{size} B", be, "n/a", "-", "n/a", "0"])
                continue
            rows.append(
                [
                    f"{size} B",
                    be,
                    _f(_med(r["mpps"]), 3),
                    _spread(r["mpps"]),
                    _f(_med(r["gbps"]), 2),
                    str(r["mpps"]["n"]),
                ]
            )
    return head, rows


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    line = "  ".join(
        h.ljust(w) if i < 2 else h.rjust(w)
        for i, (h, w) in enumerate(zip(head, widths, strict=False))
    )
    out = [line, "-" * len(line)]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append("")
        prev = r[0]
        out.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=False))
            )
        )
    return "\n".join(out)


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's goals, checked on the medians of this run."""
    out: list[dict[str, Any]] = []
    disk = results.get("disk") or {}
    for cache in disk_caches(disk) if disk else []:
        dres = disk_results(disk, cache)
        if "ours" not in dres or "qsd" not in dres:
            continue
        for wl in disk["workloads"]:
            o, q = dres["ours"].get(wl), dres["qsd"].get(wl)
            if not o or not q:
                continue
            key = "iops" if "4k" in wl else "mbps"
            ov, qv = _med(o[key]), _med(q[key])
            cpu = "cpu_us_per_io" if "cpu_us_per_io" in o else "cpu_s_per_gb"
            oc, qc = _med(o.get(cpu)), _med(q.get(cpu))
            out.append(
                {
                    "target": f"disk {wl} (cache {cache}): ours {key} >= qsd",
                    "ours": ov,
                    "ref": qv,
                    "met": ov is not None and qv is not None and ov >= qv,
                }
            )
            out.append(
                {
                    "target": f"disk {wl} (cache {cache}): ours CPU per I/O < qsd",
                    "ours": oc,
                    "ref": qc,
                    "met": oc is not None and qc is not None and oc < qc,
                }
            )
    net = results.get("net") or {}
    nres = net.get("results", {})
    for d, name in (("tx", "guest->host"), ("rx", "host->guest")):
        o = _med(nres.get("ours", {}).get(d, {}).get("gbps"))
        for ref, factor in (("virtio", 1.0), ("e1000", 2.5)):
            r = _med(nres.get(ref, {}).get(d, {}).get("gbps"))
            if o is None or r is None:
                continue
            label = f"net {name}: ours >= {'' if factor == 1 else f'{factor:g}x '}{ref}"
            out.append({"target": label, "ours": o, "ref": r * factor, "met": o >= r * factor})
    return out


def render_text(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        f"vhost-py benchmark  {meta['date']}",
        f"QEMU: {meta['qemu_version']}   accel: {meta['accel']} ({meta['accel_reason']})",
        (
            f"CPU: {meta['cpu_model']} x{meta['cpus']}   host kernel {meta['host_kernel']}   "
            f"guest kernel {meta['guest_kernel']}"
        ),
        (
            f"runtime {results['options']['runtime']} s per workload, "
            f"{results['options']['repeat']} interleaved boot(s) per device; "
            "cells are medians, spread = (max-min)/2 of the main figure"
        ),
    ]
    if results.get("disk"):
        h, r = disk_rows(results["disk"])
        parts += ["", "DISK (fio in the guest, --direct=1 --ioengine=libaio)", text_table(h, r)]
        h, r = ours_rows(results["disk"])
        if r:
            parts += ["", "OURS: daemon counters per request", text_table(h, r)]
    if results.get("net"):
        h, r = net_rows(results["net"])
        parts += ["", "NETWORK (iperf3 TCP, guest <-> host side of a TAP)", text_table(h, r)]
        h, r = ours_net_rows(results["net"])
        if r:
            parts += ["", "OURS: net daemon counters per MB received", text_table(h, r)]
    pk = results.get("pktrate")
    if pk:
        if pk.get("skipped"):
            parts += ["", f"PACKET RATE: skipped ({pk['skipped']})"]
        else:
            h, r = pkt_rows(pk)
            parts += ["", "PACKET RATE (DPDK virtio-user loop, both directions)", text_table(h, r)]
    if meta["accel"] == "tcg":
        parts += ["", "NOTE: " + TCG_NOTE]
    parts += ["NOTE: " + CPU_NOTE]
    tg = results.get("targets") or []
    if tg:
        parts += ["", "TARGETS"]
        for t in tg:
            parts.append(
                f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: "
                f"ours {_f(t['ours'], 2)} vs {_f(t['ref'], 2)}"
            )
    for e in results.get("errors") or []:
        parts.append(f"ERROR: {e.splitlines()[0]}")
    return "\n".join(parts)


def render_md(results: dict[str, Any]) -> str:
    meta = results["meta"]
    o = results["options"]
    parts = [
        "# vhost-py benchmark results",
        "",
        f"- date: {meta['date']}",
        f"- QEMU: {meta['qemu_version']}",
        f"- accelerator: **{meta['accel']}** ({meta['accel_reason']})",
        f"- CPU: {meta['cpu_model']} ({meta['cpus']} cpus)",
        f"- host kernel: {meta['host_kernel']}; guest kernel: {meta['guest_kernel']}",
        f"- command: `{results['command']}`",
        (
            f"- runtime {o['runtime']} s per workload, {o['repeat']} interleaved boot(s) per "
            f"device, wall time {results.get('wall_s', 0):.0f} s"
        ),
        "- cells are medians over the boots; spread = (max-min)/2 of the main figure",
        "",
    ]
    if meta["accel"] == "tcg":
        parts += [f"> {TCG_NOTE}", ""]
    parts += [f"> {CPU_NOTE}", ""]
    if results.get("disk"):
        d = results["disk"]
        h, r = disk_rows(d)
        parts += [
            "## Disk",
            "",
            (
                "fio in the guest, `--direct=1 --ioengine=libaio`; "
                "p50/p99 are fio completion latencies."
            ),
            "",
            md_table(h, r),
            "",
        ]
        h, r = ours_rows(d)
        if r:
            parts += [
                (
                    "Our daemon's own counters over each workload (its `--metrics` endpoint), "
                    "per request; stage columns are means of sampled per-request timestamps."
                ),
                "",
                md_table(h, r),
                "",
            ]
        parts += ["| device | CPU measured on | host cache | how |", "|---|---|---|---|"]
        for c in disk_caches(d):
            parts += [
                f"| {k} | {d['cpu_process'][k]} | {c} | {_caching(d, k, c)} |" for k in d["devices"]
            ]
        parts.append("")
    if results.get("net"):
        n = results["net"]
        h, r = net_rows(n)
        parts += [
            "## Network",
            "",
            (
                "iperf3 TCP between the guest and the host side of its TAP, "
                "inside a throw-away network namespace."
            ),
            "",
            md_table(h, r),
            "",
        ]
        h, r = ours_net_rows(n)
        if r:
            parts += [
                "Our daemon's queue counters over each run, per MB received.",
                "",
                md_table(h, r),
                "",
            ]
        parts += ["| device | CPU measured on |", "|---|---|"]
        parts += [f"| {k} | {n['cpu_process'][k]} |" for k in n["devices"]]
        parts.append("")
    pk = results.get("pktrate")
    if pk:
        parts += ["## Packet rate", ""]
        if pk.get("skipped"):
            parts += [f"skipped: {pk['skipped']}", ""]
        else:
            h, r = pkt_rows(pk)
            parts += [
                (
                    "DPDK testpmd with two virtio-user ports (io forwarding) on cpu 1, "
                    "the back end switching between its two sockets on cpu 0."
                ),
                "",
                md_table(h, r),
                "",
            ]
    tg = results.get("targets") or []
    if tg:
        parts += ["## Targets", "", "| target | ours | reference | met |", "|---|---:|---:|---|"]
        parts += [
            f"| {t['target']} | {_f(t['ours'], 2)} | {_f(t['ref'], 2)} | "
            f"{'yes' if t['met'] else '**no**'} |"
            for t in tg
        ]
        parts.append("")
    if results.get("errors"):
        parts += ["## Errors", ""] + [f"- `{e.splitlines()[0]}`" for e in results["errors"]] + [""]
    return "\n".join(parts)


def _caching(d: dict[str, Any], dev: str, cache: str) -> str:
    how = d.get("caching", {})
    return str(how.get(f"{dev}/{cache}") or how.get(dev) or "?")


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


def series_colours(panels: Sequence[Sequence[str]], palette: Sequence[str]) -> dict[str, str]:
    """One colour per device or back end for the whole figure, whatever panel it is in
    and at whatever position ("ours" keeps its colour on the disk, network and packet
    rate panels): in order of first appearance, round the palette."""
    out: dict[str, str] = {}
    for names in panels:
        for name in names:
            if name not in out:
                out[name] = palette[len(out) % len(palette)]
    return out


def write_png(results: dict[str, Any], path: Path) -> str | None:
    """Bar chart of the medians (min-max as error bars); returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or .[bench]): no PNG"
    panels: list[tuple[str, list[str], list[str], dict[str, list[Summary | None]]]] = []
    disk = results.get("disk")
    for cache in disk_caches(disk) if disk else []:
        assert disk is not None
        dres = disk_results(disk, cache)
        small = [w for w in disk["workloads"] if "4k" in w]
        big = [w for w in disk["workloads"] if "4k" not in w]
        if small:
            series = {
                d: [dres.get(d, {}).get(w, {}).get("iops") for w in small] for d in disk["devices"]
            }
            panels.append((f"Disk 4 KiB, cache {cache}: IOPS", small, disk["devices"], series))
        if big:
            series = {
                d: [dres.get(d, {}).get(w, {}).get("mbps") for w in big] for d in disk["devices"]
            }
            panels.append((f"Disk 1 MiB, cache {cache}: MB/s", big, disk["devices"], series))
    net = results.get("net")
    if net:
        nres = net["results"]
        dirs = ["tx", "rx"]
        series = {d: [nres.get(d, {}).get(x, {}).get("gbps") for x in dirs] for d in net["devices"]}
        panels.append(
            ("Network iperf3: Gbit/s", ["guest->host", "host->guest"], net["devices"], series)
        )
    pk = results.get("pktrate")
    if pk and not pk.get("skipped"):
        sizes = [str(s) for s in pk["sizes"]]
        series = {
            b: [pk["results"].get(b, {}).get(s, {}).get("mpps") for s in sizes]
            for b in pk["backends"]
        }
        panels.append(("Packet rate: Mpps", [f"{s} B" for s in sizes], pk["backends"], series))
    if not panels:
        return "nothing to plot"
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = series_colours([names for _, _, names, _ in panels], palette)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4.5 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, groups, names, series) in zip(flat, panels, strict=False):
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            meds, lo, hi = [], [], []
            for s in series[name]:
                m = _med(s)
                meds.append(m or 0.0)
                lo.append((m or 0.0) - float(s["min"]) if s and m is not None else 0.0)
                hi.append(float(s["max"]) - (m or 0.0) if s and m is not None else 0.0)
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, meds, width, label=name, yerr=[lo, hi], capsize=3, color=colour[name])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(
        f"vhost-py benchmark, {meta['accel']}, {meta['qemu_version']}, {meta['date']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
