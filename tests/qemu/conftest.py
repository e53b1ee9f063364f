"""Fixtures for the real-QEMU tests.

* ``guest_base`` -- the (cached) minimal guest initramfs: busybox, modules,
  mkfs.ext4 and util-linux blkdiscard; no fio.
* ``blk_daemon`` -- a factory starting ``vhost-user-blk`` in ``tmp_path``
  (:func:`~tests.support.daemon.spawn_blk_for_qemu`); at teardown every daemon (latest
  first) gets SIGTERM and must exit 0, log no traceback and remove its socket.
* ``guests`` -- a factory booting QEMU guests (``ram="hugepages"`` puts guest RAM on
  hugetlbfs: :func:`~tests.qemu.harness.with_ram`); at teardown every QEMU still running
  is SIGKILLed (before the daemons are stopped).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.support.daemon import daemons, spawn_blk_for_qemu

from .harness import BootGuest, StartDaemon, boot_guest, guest_binaries


@pytest.fixture(scope="session")
def guest_base() -> Path:
    t = time.monotonic()
    path = build.build_base_initramfs(build.default_cache_dir(), binaries=guest_binaries())
    print(
        f"\nminimal initramfs {path.name} ({path.stat().st_size / (1 << 20):.1f} MiB) "
        f"ready in {time.monotonic() - t:.2f}s"
    )
    return path


@pytest.fixture
def blk_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """``blk_daemon(*args, image=None, image_size=None, socket_path=None)``."""
    with daemons(spawn_blk_for_qemu, tmp_path, "blk") as group:
        yield group.start


@pytest.fixture
def guests(blk_daemon: StartDaemon, tmp_path: Path, guest_base: Path) -> Iterator[BootGuest]:
    """Depends on ``blk_daemon`` so QEMU is killed before the daemons are stopped."""
    booted: list[qemu.Guest] = []

    def boot(
        script: str,
        extra_args: Sequence[str],
        *,
        name: str = "guest",
        files: dict[str, bytes] | None = None,
        ram: str = "memfd",
    ) -> qemu.Guest:
        g = boot_guest(guest_base, script, tmp_path, name, extra_args, files=files, ram=ram)
        booted.append(g)
        return g

    yield boot

    for g in booted:
        g.kill()
