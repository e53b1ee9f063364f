"""The pieces the real-QEMU tests put together: QEMU guests booted on the minimal
initramfs, the host binaries copied into it, and the options that attach a guest to a
``vhost-user-blk`` daemon. The daemons themselves are tests/support/daemon.py's
(:func:`~tests.support.daemon.spawn_blk_for_qemu`): up once their first connection is
logged, in a session of their own, with the longer timeouts of TCG guests.

Boundary: no assertions about virtio-blk behaviour here (the tests make those).
"""

from __future__ import annotations

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
#: the ``guests`` fixture: ``boot(script, extra_args, *, name="guest", files=None)``
BootGuest = Callable[..., qemu.Guest]

needs_qemu = pytest.mark.skipif(
    not qemu.qemu_available() or not list(Path("/boot").glob("vmlinuz-*")),
    reason="needs qemu-system-x86_64 and a guest kernel in /boot",
)
_why_no_netns = netns_supported()
needs_netns = pytest.mark.skipif(_why_no_netns is not None, reason=_why_no_netns or "")


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
) -> qemu.Guest:
    """Start (not wait for) a TCG guest with shared memory running ``script``;
    initrd and console log are ``<workdir>/<name>.initrd`` / ``.console.log``."""
    initrd = build.make_initrd(base, script, workdir / f"{name}.initrd", files)
    return qemu.Guest(
        build.kernel_path(),
        initrd,
        extra_args,
        mem_mb=mem_mb,
        shared_mem=True,
        log_path=workdir / f"{name}.console.log",
    )
