"""Boot one benchmark guest and watch its console.

The guest script prints ``BENCH-RUN <name>`` right before a workload and
``BENCH-DONE <name>`` right after it; the host polls the console and samples the
back-end process's CPU time (``/proc/PID/stat`` utime+stime, all threads) and the
wall clock when it first sees each marker, so every workload gets its own CPU
delta.  Workloads print their machine-readable output between
``BENCH-OUT-BEGIN <name>`` and ``BENCH-OUT-END <name>``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest import build, qemu

from .sysinfo import set_accel

_CLK_TCK = os.sysconf("SC_CLK_TCK")
MARK_RE = re.compile(r"^BENCH-(RUN|DONE) (\S+)\s*$", re.MULTILINE)
OUT_RE = re.compile(
    r"^BENCH-OUT-BEGIN (\S+)\s*\n(.*?)^BENCH-OUT-END \1\s*$", re.DOTALL | re.MULTILINE
)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Span:
    t0: float = 0.0
    t1: float = 0.0
    cpu0: float = 0.0
    cpu1: float = 0.0

    @property
    def cpu(self) -> float:
        return self.cpu1 - self.cpu0

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


@dataclass
class GuestRun:
    rc: int
    text: str
    spans: dict[str, Span] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    boot_s: float = 0.0
    total_s: float = 0.0


def run_guest(
    base: Path,
    script: str,
    extra_args: Sequence[str],
    *,
    workdir: Path,
    name: str,
    accel: str,
    cpu_pid: Callable[[qemu.Guest], int],
    timeout: float,
    wrap: Callable[[list[str]], list[str]] | None = None,
    on_mark: Callable[[str, str], None] | None = None,
) -> GuestRun:
    """Boot a guest running ``script`` with ``extra_args``; ``cpu_pid(guest)``
    names the back-end process whose CPU time is sampled at each marker (QEMU
    itself for the built-in devices).  ``wrap`` rewrites the argv (e.g. to run
    QEMU inside a network namespace).  ``on_mark(kind, name)`` is told of each
    marker as it appears."""
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = build.make_initrd(base, script, workdir / f"{name}.initrd")
    g = qemu.Guest(
        build.kernel_path(),
        initrd,
        extra_args,
        shared_mem=True,
        log_path=workdir / f"{name}.console.log",
        start=False,
    )
    g.args = set_accel(g.args, accel)
    if wrap is not None:
        g.args = wrap(g.args)
    spans: dict[str, Span] = {}
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout
    boot: float | None = None
    with g:
        pid = cpu_pid(g)
        while True:
            text = g.output()
            if boot is None and qemu.START_MARKER in text:
                boot = time.monotonic() - g.started_at
            for m in MARK_RE.finditer(text):
                key = (m.group(1), m.group(2))
                if key in seen:
                    continue
                seen.add(key)
                try:
                    cpu = proc_cpu_seconds(pid)
                except OSError:
                    cpu = float("nan")
                now = time.monotonic()
                sp = spans.setdefault(m.group(2), Span())
                if m.group(1) == "RUN":
                    sp.t0, sp.cpu0 = now, cpu
                else:
                    sp.t1, sp.cpu1 = now, cpu
                if on_mark is not None:
                    on_mark(m.group(1), m.group(2))
            if qemu.EXIT_RE.search(text):
                break
            if not g.running():
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        try:
            rc, body = g.run_workload(timeout=max(1.0, deadline - time.monotonic()))
        except qemu.GuestError as e:
            raise qemu.GuestError(f"{name}: {e}") from None
        total = g.elapsed()
    outputs = {m.group(1): m.group(2) for m in OUT_RE.finditer(body)}
    return GuestRun(rc, body, spans, outputs, boot or 0.0, total)
