"""Fixtures of the libvirt tests (tests/libvirt/instance.py runs the daemons).

* ``libvirt_root`` (session) -- a directory under /tmp that QEMU, run by libvirt as
  user libvirt-qemu, can traverse (pytest's own tmp dirs are 0700 root): libvirt's
  private state, the guest kernel and each test's files. Removed at the end, after its
  logs are copied to pytest's base temp dir (``libvirt-logs``), which pytest keeps.
* ``libvirt`` (session) -- libvirtd and virtlogd in their own mount namespace, started
  once for every test here; at the end every domain is destroyed, the daemons must
  stop on SIGTERM and no process (QEMU, virtiofsd) may be left in their namespace.
* ``lv_workdir`` -- a directory of ``libvirt_root`` for one test.
* ``lv_kernel`` (session) -- a copy of the guest kernel: libvirt's DAC driver chowns
  what a domain boots to libvirt-qemu, and /boot's file is not ours to chown.
* ``fio_base`` (session) -- the guest initramfs of tests/qemu plus fio (the cached one
  the crash and migration tests use).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest import build
from tests.qemu.harness import guest_binaries

from .instance import PrivateLibvirt, why_not_supported

FIO = Path("/usr/bin/fio")


@pytest.fixture(scope="session")
def libvirt_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = Path(tempfile.gettempdir()) / f"vhtest-libvirt-{os.getpid()}-{secrets.token_hex(3)}"
    root.mkdir(mode=0o755)
    root.chmod(0o755)  # whatever the umask
    yield root
    logs = tmp_path_factory.getbasetemp() / "libvirt-logs"
    for sub in ("libvirt/log", "libvirt/libvirtd.out", "libvirt/virtlogd.out", "work"):
        src = root / sub
        if src.is_dir():
            shutil.copytree(src, logs / sub, dirs_exist_ok=True, ignore=_bulky)
        elif src.exists():
            (logs / sub).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, logs / sub)
    shutil.rmtree(root)


def _bulky(directory: str, names: list[str]) -> list[str]:
    """What not to keep of a test's files: images, kernels, initramfs."""
    return [n for n in names if n.endswith((".img", ".initrd", "vmlinuz"))]


@pytest.fixture(scope="session")
def libvirt(libvirt_root: Path) -> Iterator[PrivateLibvirt]:
    why = why_not_supported()
    if why is not None:
        pytest.skip(why)
    lv = PrivateLibvirt(libvirt_root / "libvirt", build.default_cache_dir() / "libvirt-cache")
    lv.start()
    print(f"\nlibvirtd and virtlogd up in {lv.started_in:.1f}s ({lv.uri})")
    yield lv
    t = time.monotonic()
    problems = lv.stop()
    print(f"\nlibvirt stopped in {time.monotonic() - t:.1f}s")
    if problems:
        pytest.fail("stopping libvirt: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def lv_workdir(libvirt_root: Path, request: pytest.FixtureRequest) -> Path:
    # short: a unix socket's path is at most 107 bytes
    d = libvirt_root / "work" / request.node.name.replace("/", "_")[:24]
    d.mkdir(mode=0o755, parents=True)
    for p in (d, d.parent):
        p.chmod(0o755)
    return d


@pytest.fixture(scope="session")
def lv_kernel(libvirt_root: Path) -> Path:
    kernel = libvirt_root / "vmlinuz"
    shutil.copy(build.kernel_path(), kernel)
    kernel.chmod(0o644)
    return kernel


@pytest.fixture(scope="session")
def fio_base() -> Path:
    if not FIO.exists():
        pytest.skip("needs fio on the host (it is copied into the guest)")
    return build.build_base_initramfs(
        build.default_cache_dir(), binaries=[*guest_binaries(), str(FIO)]
    )
