"""Facts about the machine a benchmark ran on, and the accelerator probe."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.guest import build, qemu

KVM_PROBE_TIMEOUT = 15.0


def qemu_version() -> str:
    try:
        r = subprocess.run(
            [qemu.QEMU, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        return r.stdout.splitlines()[0].strip() if r.stdout else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def collect(accel: str, accel_reason: str) -> dict[str, object]:
    kernel = build.kernel_path()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "qemu_version": qemu_version(),
        "accel": accel,
        "accel_reason": accel_reason,
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "host_kernel": platform.release(),
        "guest_kernel": build.kernel_version(kernel),
        "python": platform.python_version(),
    }


def set_accel(args: list[str], accel: str) -> list[str]:
    """QEMU argv (from qemu.qemu_base_args, which says ``-accel tcg``) with ``accel``."""
    out = list(args)
    i = out.index("-accel")
    out[i + 1] = accel
    if accel == "kvm":
        out[i + 2 : i + 2] = ["-cpu", "host"]
    return out


def probe_kvm(base: Path, timeout: float = KVM_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot a tiny guest with ``-accel kvm``: True only when it runs its workload
    and powers off within ``timeout`` s (here KVM guests hang, so this says no)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not usable"
    with tempfile.TemporaryDirectory(prefix="bench-kvm-") as d:
        initrd = build.make_initrd(base, "echo KVM-OK\n", Path(d) / "initrd")
        g = qemu.Guest(
            build.kernel_path(),
            initrd,
            shared_mem=False,
            log_path=Path(d) / "console.log",
            start=False,
        )
        g.args = set_accel(g.args, "kvm")
        t0 = time.monotonic()
        try:
            with g:
                rc, text = g.run_workload(timeout=timeout, exit_timeout=5)
        except qemu.GuestTimeout:
            return False, f"KVM probe guest did not run its workload within {timeout:.0f}s"
        except qemu.GuestError:
            return False, (
                f"KVM probe guest's QEMU exited with rc={g.returncode} after "
                f"{time.monotonic() - t0:.1f}s without running its workload"
            )
        if rc == 0 and "KVM-OK" in text:
            return True, f"KVM probe guest booted and ran in {time.monotonic() - t0:.1f}s"
        return False, f"KVM probe guest exited with rc={rc}"
