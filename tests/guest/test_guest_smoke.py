"""Smoke test of the guest harness, against QEMU's own (built-in) block devices.

Boots a busybox guest under TCG with a 64 MiB sparse raw image as virtio-blk
(/dev/vda) or IDE (/dev/sda); the workload writes known patterns with O_DIRECT
(``dio_write``/``dio_read`` from /lib/vhtest.sh: busybox dd with bs=64k and
byte offsets, since busybox silently drops O_DIRECT for bs < 4096), reads them
back with O_DIRECT, checks the device's sector counters, makes an
ext4 file system, copies a file through it, and (virtio only) runs fio.  After
QEMU exits, the host image must hold the patterns at the offsets written.

Run: ``python -m pytest tests/guest -q -m qemu`` (add ``-s`` to see timings).
"""

from __future__ import annotations

import re
import shutil
import stat
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from . import build, qemu, workloads

MiB = workloads.MiB
IMG_SIZE = 64 * MiB
PATTERNS = workloads.default_patterns(IMG_SIZE)


VARIANTS = {
    # name: (guest device, QEMU drive/device args (IMG substituted), run fio?)
    "virtio": (
        "vda",
        ["-drive", "file=IMG,format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0"],
        True,
    ),
    "ide": ("sda", ["-drive", "file=IMG,format=raw,if=ide"], False),
}

needs_qemu = pytest.mark.skipif(
    not qemu.qemu_available() or not list(Path("/boot").glob("vmlinuz-*")),
    reason="needs qemu-system-x86_64 and a guest kernel in /boot",
)


@pytest.fixture(scope="session")
def base_initramfs() -> Path:
    t = time.monotonic()
    path = build.build_base_initramfs(build.default_cache_dir())
    print(
        f"\nbase initramfs {path} ({path.stat().st_size / MiB:.1f} MiB) "
        f"ready in {time.monotonic() - t:.2f}s"
    )
    return path


@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_guest_block_smoke(
    variant: str,
    tmp_path: Path,
    base_initramfs: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dev, dev_args, fio = VARIANTS[variant]
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)  # sparse
    script = workloads.blk_script(dev, PATTERNS, fio=fio)
    files = workloads.blk_files(PATTERNS)
    initrd = build.make_initrd(base_initramfs, script, tmp_path / "initrd.img", files)
    args = [a.replace("IMG", str(img)) if a.startswith("file=IMG") else a for a in dev_args]

    t0 = time.monotonic()
    with qemu.Guest(build.kernel_path(), initrd, args, log_path=tmp_path / "console.log") as g:
        rc, text = g.run_workload(timeout=150)
        boot, work = g.boot_time(), g.workload_time()
    total = time.monotonic() - t0
    res = qemu.results(text)
    print(f"\n[{variant}] boot {boot:.1f}s workload {work:.1f}s total {total:.1f}s results {res}")
    record_property("boot_s", round(boot or -1, 2))
    record_property("total_s", round(total, 2))

    assert rc == 0, f"workload failed (rc={rc}):\n{text[-3000:]}"
    workloads.check_blk_results(res, PATTERNS, IMG_SIZE, text)
    if fio and shutil.which("fio"):
        assert res["fio_version"].startswith("fio-")
        for eng in ("libaio", "psync"):
            assert res[f"fio_{eng}_err"] == "0", res
            assert float(res[f"fio_{eng}_iops"]) > 0, res

    # the host image holds what the guest wrote, where it wrote it
    workloads.check_image(img, PATTERNS)
    assert boot is not None and boot < 60, f"boot took {boot}s"


@pytest.mark.qemu
@needs_qemu
def test_workload_exit_code_and_results(tmp_path: Path) -> None:
    """Module-level run_workload(): exit code and RESULT lines come back; a
    minimal (no fio) base image; extra files land where asked."""
    base = build.build_base_initramfs(build.default_cache_dir(), binaries=())
    script = (
        'echo "RESULT greeting=hello world"\n'
        'echo "RESULT data=$(cat /etc/extra/thing)"\n'
        'echo "RESULT cmdline=$(cat /proc/cmdline)"\n'
        "exit 3\n"
    )
    t = time.monotonic()
    rc, text = qemu.run_workload(
        script,
        workdir=tmp_path,
        base=base,
        files={"/etc/extra/thing": b"42"},
        shared_mem=False,
        mem_mb=256,
        append_extra="vhtest.marker=1",
        timeout=90,
    )
    print(f"\n[minimal] rc={rc} total {time.monotonic() - t:.1f}s")
    assert rc == 3, text
    res = qemu.results(text)
    assert res["greeting"] == "hello world"
    assert res["data"] == "42"
    assert "vhtest.marker=1" in res["cmdline"]
    assert (tmp_path / "console.log").exists()


@pytest.mark.qemu
@needs_qemu
def test_guest_diagnostics(tmp_path: Path, base_initramfs: Path) -> None:
    """Timeouts and early QEMU exits raise with the console tail in the message."""
    initrd = build.make_initrd(base_initramfs, "sleep 60\n", tmp_path / "initrd.img")
    with qemu.Guest(build.kernel_path(), initrd, log_path=tmp_path / "a.log") as g:
        with pytest.raises(qemu.GuestTimeout, match="timed out after 1s"):
            g.wait_for("never printed", timeout=1)
        assert g.running()
    assert not g.running()  # the context manager killed it

    bad = ["-device", "no-such-device"]
    with (
        qemu.Guest(build.kernel_path(), initrd, bad, log_path=tmp_path / "b.log") as g,
        pytest.raises(qemu.GuestError, match=re.compile("exited.*no-such-device", re.DOTALL)),
    ):
        g.wait_for(qemu.START_MARKER, timeout=30)


def test_results_parser() -> None:
    text = "noise\r\nRESULT a=1\r\nRESULT b.c=x y z  \nxRESULT d=no\nRESULT a=2\n"
    assert qemu.results(text) == {"a": "2", "b.c": "x y z"}


def test_qemu_base_args() -> None:
    args = qemu.qemu_base_args(Path("/k"), Path("/i"), mem_mb=256, append_extra="foo=1")
    assert args[0] == qemu.QEMU
    assert args[args.index("-m") + 1] == "256"
    assert args[args.index("-append") + 1] == "console=ttyS0 quiet panic=-1 foo=1"
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in args
    assert "-numa" not in qemu.qemu_base_args(Path("/k"), Path("/i"), shared_mem=False)


# ---------------------------------------------------------------------------
# no-QEMU checks of the initramfs builder (fast)
# ---------------------------------------------------------------------------


def _parse_newc(buf: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry, stopping at TRAILER!!!."""
    out: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        assert buf[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(buf[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = buf[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        data = buf[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, data))


def test_workload_cpio_format() -> None:
    blob = build.workload_cpio("echo hi\n", {"/data/x/y.bin": b"\x01\x02\x03", "/run.sh": b"true"})
    assert len(blob) % 4 == 0
    ents = {n: (m, d) for n, m, d in _parse_newc(blob)}
    assert ents["workload.sh"] == (stat.S_IFREG | 0o755, b"echo hi\n")
    assert stat.S_ISDIR(ents["data"][0]) and stat.S_ISDIR(ents["data/x"][0])
    assert ents["data/x/y.bin"] == (stat.S_IFREG | 0o644, b"\x01\x02\x03")
    assert ents["run.sh"][0] == stat.S_IFREG | 0o755


def test_base_initramfs_contents(tmp_path: Path) -> None:
    if not list(Path("/boot").glob("vmlinuz-*")) or not build.BUSYBOX.exists():
        pytest.skip("no guest kernel or busybox")
    base = build.build_base_initramfs(tmp_path, binaries=())
    t = time.monotonic()
    assert build.build_base_initramfs(tmp_path, binaries=()) == base
    assert time.monotonic() - t < 0.5  # cached
    raw = base.read_bytes()
    assert len(raw) % 4 == 0  # an appended plain cpio must start 4-byte aligned
    d = zlib.decompressobj(wbits=31)  # gzip member, then zero padding
    cpio = d.decompress(raw)
    assert d.eof and d.unused_data.strip(b"\0") == b""
    ents = {n: (m, d) for n, m, d in _parse_newc(cpio)}
    assert stat.S_IMODE(ents["init"][0]) == 0o755
    assert ents["bin/busybox"][1] == build.BUSYBOX.read_bytes()
    order = ents["lib/modules/guest/order"][1].decode().split()
    assert (
        order.index("virtio_ring.ko") < order.index("virtio_pci.ko") < order.index("virtio_blk.ko")
    )
    assert order.index("crc32c_generic.ko") < order.index("ext4.ko")
    for m in order:
        assert ents[f"lib/modules/guest/{m}"][1][:4] == b"\x7fELF"
