"""Fixtures for the real-QEMU tests.

* ``guest_base`` -- the (cached) minimal guest initramfs: busybox, modules,
  mkfs.ext4 and util-linux blkdiscard; no fio.
* ``blk_daemon`` -- a factory starting ``vhost-user-blk`` in ``tmp_path``; at teardown
  every daemon (latest first) gets SIGTERM and must exit 0, log no traceback and
  remove its socket.
* ``guests`` -- a factory booting QEMU guests; at teardown every QEMU still running is
  SIGKILLed (before the daemons are stopped).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.guest import build, qemu

from .harness import BlkDaemon, BootGuest, StartDaemon, boot_guest, guest_binaries, start_daemon


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
    started: list[BlkDaemon] = []
    counter = iter(range(1000))

    def start(
        *args: str,
        image: Path | None = None,
        image_size: int | None = None,
        socket_path: Path | None = None,
    ) -> BlkDaemon:
        d = start_daemon(
            tmp_path,
            f"blk{next(counter)}",
            args,
            image=image,
            image_size=image_size,
            socket_path=socket_path,
        )
        started.append(d)
        return d

    yield start

    errors: list[str] = []
    for d in reversed(started):  # a later daemon may serve an earlier one's socket
        try:
            d.check_clean_exit()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


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
    ) -> qemu.Guest:
        g = boot_guest(guest_base, script, tmp_path, name, extra_args, files=files)
        booted.append(g)
        return g

    yield boot

    for g in booted:
        g.kill()
