"""The pieces the real-QEMU tests put together: QEMU guests booted on the minimal
initramfs, the host binaries copied into it, and the options that attach a guest to a
``vhost-user-blk`` daemon. The daemons themselves are tests/support/daemon.py's
(:func:`~tests.support.daemon.spawn_blk_for_qemu`): up once their first connection is
logged, in a session of their own, with the longer timeouts of TCG guests.

Boundary: no assertions about virtio-blk behaviour here (the tests make those).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.netns import netns_supported
from tests.support.daemon import Daemon

# Host binaries for the guest image (when present on the host): e2fsprogs' mke2fs as
# mkfs.ext4 (real journalled ext4), and util-linux blkdiscard for ``-z`` (BLKZEROOUT,
# i.e. VIRTIO_BLK_T_WRITE_ZEROES), kept off PATH so busybox's blkdiscard stays the
# default.  No fio: it makes the image 15x bigger and each boot ~2.5 s slower.
UL_BLKDISCARD = "/usr/libexec/ul/blkdiscard"
GUEST_BINARIES: tuple[tuple[str, str], ...] = (
    ("/sbin/mke2fs", "/usr/sbin/mkfs.ext4"),
    ("/usr/sbin/blkdiscard", UL_BLKDISCARD),
)

#: the ``blk_daemon`` fixture: ``start(*args, image=None, image_size=None, socket_path=None)``
StartDaemon = Callable[..., Daemon]
#: the ``guests`` fixture: ``boot(script, extra_args, *, name="guest", files=None,
#: ram="memfd")``
BootGuest = Callable[..., qemu.Guest]

needs_qemu = pytest.mark.skipif(
    not qemu.qemu_available() or not list(Path("/boot").glob("vmlinuz-*")),
    reason="needs qemu-system-x86_64 and a guest kernel in /boot",
)
_why_no_netns = netns_supported()
needs_netns = pytest.mark.skipif(_why_no_netns is not None, reason=_why_no_netns or "")


#: where guest RAM goes for ``ram="hugepages"`` (scripts/setup-dpdk mounts it)
HUGEPAGES_DIR = "/dev/hugepages"
#: the guest RAM backends a test may ask for: a shared memfd (the default), or a file on
#: hugetlbfs, as OVS-DPDK, SPDK and Kata deployments run it
RAM_BACKENDS = ("memfd", "hugepages")


def _free_huge_bytes() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(info["HugePages_Free"]) * int(info["Hugepagesize"].split()[0]) * 1024


def skip_unless_ram(ram: str, mem_mb: int = 512) -> None:
    """Skip the test when ``ram`` ("hugepages") cannot hold a guest of ``mem_mb``."""
    if ram != "hugepages":
        return
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    if not any(m[1] == HUGEPAGES_DIR and m[2] == "hugetlbfs" for m in mounts):
        pytest.skip(f"no hugetlbfs at {HUGEPAGES_DIR} (scripts/setup-dpdk mounts it)")
    if _free_huge_bytes() < mem_mb << 20:
        pytest.skip(f"fewer than {mem_mb} MiB of free huge pages (scripts/setup-dpdk)")


def wait_hugepage_maps(pid: int, timeout: float) -> list[str]:
    """The lines of /proc/PID/maps that map files on :data:`HUGEPAGES_DIR` (QEMU unlinks
    its RAM file there, so they end in "(deleted)"), once there are some: a back end has
    mapped hugetlbfs guest RAM. Raises TimeoutError if none appears in ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/maps") as f:
            found = [line.strip() for line in f if f" {HUGEPAGES_DIR}/" in line]
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} mapped nothing from {HUGEPAGES_DIR}")
        time.sleep(0.2)


def with_ram(args: list[str], ram: str, mem_mb: int = 512) -> list[str]:
    """QEMU ``args`` (from :func:`tests.guest.qemu.qemu_base_args` with shared memory)
    with guest RAM from backend ``ram``: "memfd" leaves them as they are; "hugepages"
    puts RAM in a file on hugetlbfs (``memory-backend-file,mem-path=...,share=on``)."""
    if ram == "memfd":
        return list(args)
    if ram != "hugepages":
        raise ValueError(f"unknown guest RAM backend {ram!r}")
    memfd = f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on"
    i = args.index(memfd)
    hugepages = f"memory-backend-file,id=mem,size={mem_mb}M,mem-path={HUGEPAGES_DIR},share=on"
    return [*args[:i], hugepages, *args[i + 1 :]]


def guest_binaries() -> list[tuple[str, str]]:
    return [(h, g) for h, g in GUEST_BINARIES if Path(h).exists()]


def blk_qemu_args(d: Daemon, num_queues: int = 1, chardev_opts: str = "") -> list[str]:
    """QEMU options attaching a vhost-user-blk-pci device to daemon ``d``."""
    return [
        "-chardev",
        f"socket,id=vub0,path={d.socket_path}{chardev_opts}",
        "-device",
        f"vhost-user-blk-pci,chardev=vub0,num-queues={num_queues}",
    ]


def boot_guest(
    base: Path,
    script: str,
    workdir: Path,
    name: str,
    extra_args: Sequence[str],
    *,
    files: dict[str, bytes] | None = None,
    mem_mb: int = 512,
    ram: str = "memfd",
) -> qemu.Guest:
    """Start (not wait for) a TCG guest with shared memory running ``script``;
    initrd and console log are ``<workdir>/<name>.initrd`` / ``.console.log``.
    ``ram``: the guest RAM backend (:data:`RAM_BACKENDS`, see :func:`with_ram`)."""
    initrd = build.make_initrd(base, script, workdir / f"{name}.initrd", files)
    g = qemu.Guest(
        build.kernel_path(),
        initrd,
        extra_args,
        mem_mb=mem_mb,
        shared_mem=True,
        log_path=workdir / f"{name}.console.log",
        start=False,
    )
    g.args = with_ram(g.args, ram, mem_mb)
    g.start()
    return g
