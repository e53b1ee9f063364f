"""``vhost-user-blk`` serving several disks from one process: repeated --socket-path and
--blk-file pair up in order, one disk per socket.

What must hold: each socket serves its own image (bytes written through socket k land
in image k and nowhere else, config and GET_ID are per disk), the disks are served at
the same time and independently (a front end leaving one disk does not disturb the
other), options that do not pair up are a usage error (exit 2, one line), and a start
refused half way leaves no socket file and no image it created.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.blk import SECTOR_SIZE, VIRTIO_BLK_S_OK, connect_guest
from tests.support.daemon import Daemon, StartDaemon, check_usage_error, run_program
from tests.support.frontend import KiB, MiB

SECTOR = SECTOR_SIZE


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_program("blk", *args)


def assert_usage_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    check_usage_error(r, "vhost-user-blk", *needles)


def start_disks(
    start_daemon: StartDaemon, tmp_path: Path, sizes: list[int], *args: str
) -> list[Daemon]:
    """One daemon serving ``len(sizes)`` disks; a Daemon view per disk (same process,
    its own socket and image). ``args`` go after the disk options."""
    extra: list[str] = []
    images, sockets = [], []
    for k, size in enumerate(sizes):
        images.append(tmp_path / f"disk{k}.img")
        sockets.append(tmp_path / f"disk{k}.sock")
        with open(images[k], "wb") as f:
            f.truncate(size)
        if k:
            extra += ["--socket-path", str(sockets[k]), "--blk-file", str(images[k])]
    first = start_daemon(*extra, *args, socket_path=sockets[0], image=images[0])
    return [
        dataclasses.replace(first, sockets=[s], image=i)
        for s, i in zip(sockets, images, strict=True)
    ]


def pattern(seed: int, n: int = 8 * KiB) -> bytes:
    return bytes((seed * 37 + k) % 251 for k in range(n))


def image_bytes(path: Path, sector: int, n: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), n, sector * SECTOR)


# --- serving ---------------------------------------------------------------------------


def test_each_socket_serves_its_own_image(start_daemon: StartDaemon, tmp_path: Path) -> None:
    sizes = [8 * MiB, 16 * MiB, 4 * MiB]
    disks = start_disks(
        start_daemon,
        tmp_path,
        sizes,
        "--serial",
        "disk-zero",
        "--serial",
        "disk-one",
        "--serial",
        "disk-two",
    )
    assert len({d.pid for d in disks}) == 1
    guests = [connect_guest(d) for d in disks]  # all connected at once
    try:
        # The same sector on every disk, different data: each must land in its own file.
        for k, g in enumerate(guests):
            assert g.blk.write(64, pattern(k)) == VIRTIO_BLK_S_OK
        for k, g in enumerate(guests):
            assert g.blk.read(64, 8 * KiB) == pattern(k)
            assert g.capacity() == sizes[k] // SECTOR
            assert g.blk.get_id() == [b"disk-zero", b"disk-one", b"disk-two"][k]
        # Disk 2's last sectors, and the same offset on disk 0 (past disk 2's end).
        end2 = sizes[2] // SECTOR
        assert guests[2].blk.write(end2 - 8, pattern(9, 4 * KiB)) == VIRTIO_BLK_S_OK
        assert guests[2].blk.write(end2, pattern(9, 4 * KiB)) != VIRTIO_BLK_S_OK
        assert guests[0].blk.write(end2, pattern(10, 4 * KiB)) == VIRTIO_BLK_S_OK
    finally:
        for g in guests:
            g.close()
    for k, d in enumerate(disks):
        assert image_bytes(d.image_path, 64, 8 * KiB) == pattern(k)
        assert os.stat(d.image_path).st_size == sizes[k]  # nothing grew
    assert image_bytes(disks[2].image_path, sizes[2] // SECTOR - 8, 4 * KiB) == pattern(9, 4 * KiB)
    assert image_bytes(disks[0].image_path, sizes[2] // SECTOR, 4 * KiB) == pattern(10, 4 * KiB)
    assert image_bytes(disks[1].image_path, sizes[2] // SECTOR, 4 * KiB) == bytes(4 * KiB)


def test_disks_are_independent(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Interleaved I/O on two disks; one front end leaving (and a new one coming) on
    disk 0 while disk 1's front end stays connected and keeps working."""
    a, b = start_disks(start_daemon, tmp_path, [8 * MiB, 8 * MiB], "--num-queues", "2")
    with connect_guest(b, queues=None) as gb:
        assert len(gb.drivers) == 2  # --num-queues applies to every disk
        with connect_guest(a, queues=None) as ga:
            assert len(ga.drivers) == 2
            for i in range(8):
                assert ga.drivers[i % 2].write(i * 16, pattern(i, 4 * KiB)) == VIRTIO_BLK_S_OK
                status = gb.drivers[i % 2].write(i * 16, pattern(100 + i, 4 * KiB))
                assert status == VIRTIO_BLK_S_OK
        a.wait_disconnects(1)
        for i in range(8):
            assert gb.blk.read(i * 16, 4 * KiB) == pattern(100 + i, 4 * KiB)
        with connect_guest(a) as ga:
            for i in range(8):
                assert ga.blk.read(i * 16, 4 * KiB) == pattern(i, 4 * KiB)
        assert gb.drivers[1].write(200, pattern(7)) == VIRTIO_BLK_S_OK
    assert image_bytes(b.image_path, 200, 8 * KiB) == pattern(7)
    assert image_bytes(a.image_path, 200, 8 * KiB) == bytes(8 * KiB)
    log = a.log_text()
    assert log.count("serving ") == 2
    assert "vub1" in log  # one attach line naming both disks


def test_sigterm_stops_every_disk(start_daemon: StartDaemon, tmp_path: Path) -> None:
    disks = start_disks(start_daemon, tmp_path, [MiB, MiB])
    for k, d in enumerate(disks):
        with connect_guest(d, ram_size=8 * MiB) as g:
            assert g.blk.write(0, pattern(k, 512)) == VIRTIO_BLK_S_OK
    disks[0].proc.send_signal(signal.SIGTERM)
    assert disks[0].proc.wait(10) == 0
    for k, d in enumerate(disks):
        assert not os.path.lexists(d.socket_path)
        assert image_bytes(d.image_path, 0, 512) == pattern(k, 512)


def test_read_only_applies_to_every_disk(start_daemon: StartDaemon, tmp_path: Path) -> None:
    disks = start_disks(start_daemon, tmp_path, [MiB, MiB], "--read-only")
    for d in disks:
        with connect_guest(d, ram_size=8 * MiB) as g:
            assert g.blk.write(0, b"\1" * 512) != VIRTIO_BLK_S_OK
            assert g.blk.read(0, 512) == bytes(512)


# --- options that do not pair up ---------------------------------------------------------


@pytest.fixture
def two_images(tmp_path: Path) -> tuple[str, str]:
    paths = (tmp_path / "x.img", tmp_path / "y.img")
    for p in paths:
        p.write_bytes(bytes(MiB))
    return str(paths[0]), str(paths[1])


def _sockets(tmp_path: Path, n: int) -> list[str]:
    return [str(tmp_path / f"s{k}") for k in range(n)]


def test_more_sockets_than_files(tmp_path: Path, two_images: tuple[str, str]) -> None:
    s0, s1 = _sockets(tmp_path, 2)
    r = run_cli("--socket-path", s0, "--blk-file", two_images[0], "--socket-path", s1)
    assert_usage_error(r, "2 --socket-path but 1 --blk-file")
    assert not os.path.lexists(s0) and not os.path.lexists(s1)


def test_more_files_than_sockets(tmp_path: Path, two_images: tuple[str, str]) -> None:
    (s0,) = _sockets(tmp_path, 1)
    r = run_cli("--socket-path", s0, "--blk-file", two_images[0], "--blk-file", two_images[1])
    assert_usage_error(r, "1 --socket-path but 2 --blk-file")
    assert not os.path.lexists(s0)


def test_fd_serves_one_disk(tmp_path: Path, two_images: tuple[str, str]) -> None:
    r = run_cli("--fd", "3", "--blk-file", two_images[0], "--blk-file", two_images[1])
    assert_usage_error(r, "--fd", "one disk")


def test_serial_count_must_match(tmp_path: Path, two_images: tuple[str, str]) -> None:
    s0, s1 = _sockets(tmp_path, 2)
    disks = [
        "--socket-path",
        s0,
        "--blk-file",
        two_images[0],
        "--socket-path",
        s1,
        "--blk-file",
        two_images[1],
    ]
    r = run_cli(*disks, "--serial", "only-one")
    assert_usage_error(r, "1 --serial for 2 disks")
    r = run_cli(*disks, "--serial", "a", "--serial", "b", "--serial", "c")
    assert_usage_error(r, "3 --serial for 2 disks")
    assert not os.path.lexists(s0) and not os.path.lexists(s1)


@pytest.mark.parametrize("option", ["--socket-path", "--blk-file"])
def test_same_path_twice(tmp_path: Path, two_images: tuple[str, str], option: str) -> None:
    s0, s1 = _sockets(tmp_path, 2)
    x, y = two_images
    if option == "--socket-path":
        s1 = os.path.join(tmp_path, ".", "s0")  # the same file, spelled differently
    else:
        y = x
    r = run_cli("--socket-path", s0, "--blk-file", x, "--socket-path", s1, "--blk-file", y)
    assert_usage_error(r, option, "given twice")
    assert not os.path.lexists(s0)


def test_refused_second_disk_leaves_no_trace(tmp_path: Path) -> None:
    """Disk 0's image is created (--size), disk 1's cannot be used: nothing is left."""
    s0, s1 = _sockets(tmp_path, 2)
    new, tiny = tmp_path / "new.img", tmp_path / "tiny.img"
    tiny.write_bytes(bytes(100))
    for bad, needle in ((tmp_path, "not a regular file"), (tiny, "smaller than one sector")):
        r = run_cli(
            "--socket-path",
            s0,
            "--blk-file",
            str(new),
            "--socket-path",
            s1,
            "--blk-file",
            str(bad),
            "--size",
            "1M",
        )
        assert_usage_error(r, str(bad), needle)
        assert not new.exists()
        assert not os.path.lexists(s0) and not os.path.lexists(s1)


def test_second_socket_in_use_leaves_no_trace(start_daemon: StartDaemon, tmp_path: Path) -> None:
    busy = start_daemon()
    s0 = str(tmp_path / "free.sock")
    new0, new1 = tmp_path / "new0.img", tmp_path / "new1.img"
    r = run_cli(
        "--socket-path",
        s0,
        "--blk-file",
        str(new0),
        "--socket-path",
        str(busy.socket_path),
        "--blk-file",
        str(new1),
        "--size",
        "1M",
    )
    assert_usage_error(r, str(busy.socket_path), "in use")
    assert not os.path.lexists(s0)
    assert not new0.exists() and not new1.exists()
    assert busy.proc.poll() is None
    with connect_guest(busy) as g:
        assert g.blk.write(0, b"\2" * 512) == VIRTIO_BLK_S_OK
