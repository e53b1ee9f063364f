"""vhost-user-rng under a real guest: QEMU 7.2 (TCG) with ``vhost-user-rng-pci``, the
Debian kernel's ``virtio-rng`` module, and the guest's own ``/dev/hwrng``.

The guest reports which rng its hw_random core picked, reads /dev/hwrng twice and
reports what it got; the daemon's counter must cover what the guest read (the guest's
kernel also pulls entropy for its own pool as soon as the device registers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.qemu.harness import boot_guest, needs_qemu

from .conftest import StartRng

pytestmark = [pytest.mark.qemu, needs_qemu]

READ = 16384
WORKLOAD = f"""
echo "RESULT current=$(cat /sys/class/misc/hw_random/rng_current)"
echo "RESULT available=$(cat /sys/class/misc/hw_random/rng_available)"
head -c {READ} /dev/hwrng > /tmp/a
head -c {READ} /dev/hwrng > /tmp/b
echo "RESULT bytes=$(wc -c < /tmp/a) $(wc -c < /tmp/b)"
echo "RESULT md5=$(md5sum < /tmp/a | cut -d' ' -f1) $(md5sum < /tmp/b | cut -d' ' -f1)"
echo "RESULT distinct=$(od -An -v -tu1 /tmp/a | tr -s ' ' '\\n' | grep . | sort -u | wc -l)"
"""


@pytest.fixture(scope="module")
def rng_initramfs() -> Path:
    """The minimal guest with virtio-rng added to its modules (no fio)."""
    return build.build_base_initramfs(
        build.default_cache_dir(), modules=(*build.DEFAULT_MODULES, "virtio-rng"), binaries=()
    )


def test_guest_reads_dev_hwrng(start_rng: StartRng, rng_initramfs: Path, tmp_path: Path) -> None:
    d = start_rng()
    args = [
        "-chardev",
        f"socket,id=rng0,path={d.socket_path}",
        "-device",
        "vhost-user-rng-pci,chardev=rng0",
    ]
    g = boot_guest(rng_initramfs, WORKLOAD, tmp_path, "rng-guest", args)
    try:
        rc, text = g.run_workload(timeout=180)
    finally:
        g.kill()
    res = qemu.results(text)
    assert rc == 0, text
    assert res["current"] == "virtio_rng.0", text
    assert "virtio_rng.0" in res["available"].split()
    assert res["bytes"] == f"{READ} {READ}"
    first, second = res["md5"].split()
    assert first != second  # two reads, two different streams
    assert int(res["distinct"]) == 256  # 16 KiB of random bytes holds every value
    d.wait_disconnects(1, timeout=30)
    served = int(d.wait_log("counters since start: bytes=")[-1].rsplit("bytes=", 1)[1])
    assert served >= 2 * READ
