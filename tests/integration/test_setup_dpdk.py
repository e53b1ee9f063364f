"""scripts/setup-dpdk and tests.dpdk.remove_stale_hugepage_files remove only what this
project's DPDK runs left behind, on a machine they share with others.

The hugetlbfs mount at /dev/hugepages holds libvirt's directory (libvirt/qemu), QEMU's
guest RAM and other DPDK applications' files; /var/run/dpdk other applications' runtime
directories. Ours are named with tests/dpdk.py's file prefix ``pt<pid>x<n>``, and one is
stale when process <pid> is gone and nothing maps it. Each test puts next to a stale
file of ours: a directory (libvirt-like, with a file inside named like ours), a foreign
file, a foreign DPDK-style file, a file of ours whose owner still runs, and one of ours
whose owner is gone but which a live process maps; only the stale one may go. Everything
created is removed afterwards.

Needs root and hugetlbfs at /dev/hugepages; the script test also needs dpdk-testpmd
installed (so that scripts/setup-dpdk does not run apt-get).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import dpdk

REPO = Path(__file__).resolve().parents[2]
MOUNT = dpdk.HUGEPAGE_MOUNT
RUNTIME = Path("/var/run/dpdk")
HUGEPAGE = dpdk.HUGEPAGE_KB * 1024

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not dpdk._hugetlbfs_mounted(), reason="no hugetlbfs at /dev/hugepages (scripts/setup)"
    ),
]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    assert not dpdk._pid_alive(p.pid)
    return p.pid


@dataclass
class Machine:
    """What a test put under the mount and /var/run/dpdk."""

    stale: Path  # ours, owner gone, not mapped: the one thing to remove
    stale_runtime: Path  # our runtime dir, owner gone
    kept: list[Path]  # everything else, which must survive
    mapped: mmap.mmap

    def make_stale(self) -> None:
        _hugepage_file(self.stale)
        self.stale_runtime.mkdir(parents=True, exist_ok=True)
        (self.stale_runtime / "config").write_bytes(b"\0" * 64)


def _hugepage_file(path: Path, pages: int = 1) -> None:
    """A file on hugetlbfs holding ``pages`` pages, as a killed DPDK run leaves one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, pages * HUGEPAGE)
        with mmap.mmap(fd, pages * HUGEPAGE) as m:
            m[0] = 1  # fault a page in: the file now holds it
    finally:
        os.close(fd)


@pytest.fixture
def machine() -> Iterator[Machine]:
    dead = _dead_pid()
    me = os.getpid()
    created: list[Path] = []

    def make_dir(p: Path) -> Path:
        """mkdir -p, remembering the topmost directory it made (to remove at the end)."""
        top = p
        while not top.parent.exists():
            top = top.parent
        if not p.exists():
            p.mkdir(parents=True)
            created.append(top)
        return p

    # libvirt's own directory, as libvirtd makes it (only removed again if made here)
    make_dir(MOUNT / "libvirt" / "qemu")
    libvirt_like = make_dir(MOUNT / f"vhtest{me}-libvirt")
    inside = libvirt_like / f"pt{dead}x7map_0"  # named like ours, but in a directory
    foreign = MOUNT / f"vhtest{me}-foreign"
    foreign_dpdk = MOUNT / f"vhtest{me}rtemap_0"  # another DPDK prefix
    ours_running = MOUNT / f"pt{me}x9999map_0"  # ours, and its owner (us) still runs
    ours_mapped = MOUNT / f"pt{dead}x8map_0"  # owner gone, but a live process maps it
    foreign_runtime = make_dir(RUNTIME / f"vhtest{me}")
    stale_runtime = RUNTIME / f"pt{dead}x6"
    for p in (inside, foreign, foreign_dpdk, ours_running, ours_mapped):
        _hugepage_file(p)
        created.append(p)
    (foreign_runtime / "config").write_bytes(b"\0" * 64)
    fd = os.open(ours_mapped, os.O_RDWR)
    mapped = mmap.mmap(fd, HUGEPAGE)
    os.close(fd)
    m = Machine(
        stale=MOUNT / f"pt{dead}x5map_0",
        stale_runtime=stale_runtime,
        kept=[
            MOUNT / "libvirt" / "qemu",
            libvirt_like,
            inside,
            foreign,
            foreign_dpdk,
            ours_running,
            ours_mapped,
            foreign_runtime / "config",
        ],
        mapped=mapped,
    )
    created += [m.stale, stale_runtime]
    try:
        m.make_stale()
        yield m
    finally:
        mapped.close()
        for p in reversed(created):
            with contextlib.suppress(FileNotFoundError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()


def _check_only_stale_gone(m: Machine) -> None:
    assert not m.stale.exists()
    for p in m.kept:
        assert p.exists(), f"{p} was removed: it is not ours"


def _setup_dpdk() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "scripts" / "setup-dpdk")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HUGEPAGES": "0"},  # leave the reservation as it is
    )


@pytest.mark.skipif(not dpdk.testpmd_available(), reason="dpdk-testpmd not installed")
def test_setup_dpdk_removes_only_ours(machine: Machine) -> None:
    r = _setup_dpdk()
    assert r.returncode == 0, r.stdout + r.stderr
    # (a count above 1 would be other stale files of ours, from runs killed on this machine)
    assert re.search(r"removed \d+ stale hugepage file\(s\) of our DPDK runs", r.stdout), r.stdout
    assert re.search(r"removed \d+ stale runtime dir\(s\) of our DPDK runs", r.stdout), r.stdout
    _check_only_stale_gone(machine)
    assert not machine.stale_runtime.exists()

    # again, with nothing stale left: nothing else goes either
    r = _setup_dpdk()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no stale hugepage files of ours" in r.stdout, r.stdout
    _check_only_stale_gone(machine)


def test_remove_stale_hugepage_files_removes_only_ours(machine: Machine) -> None:
    removed = dpdk.remove_stale_hugepage_files()
    assert str(machine.stale) in removed
    for f in removed:
        assert dpdk.OWN_HUGEPAGE_FILE.fullmatch(Path(f).name), f
    _check_only_stale_gone(machine)
    assert dpdk.remove_stale_hugepage_files() == []
    _check_only_stale_gone(machine)
