"""The ``vhost-user-blk`` program: options, the image and socket it sets up, and the
vhost-user back-end program conventions (--socket-path, --fd, --print-capabilities).

Bad arguments must give exit status 2 and one line on stderr, never a traceback; a
daemon that starts must serve I/O that reaches the image.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.blk import SECTOR_SIZE, VIRTIO_BLK_S_OK, connect_guest
from tests.support.daemon import (
    IMAGE_SIZE,
    Daemon,
    StartDaemon,
    check_usage_error,
    device_command,
    run_program,
)
from tests.support.frontend import FrontEnd, GiB, GuestRam, KiB, MiB
from vhost import cli, registry

SECTOR = SECTOR_SIZE


def run_cli(
    *args: str, module: bool = False, timeout: float = 20.0, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return run_program("blk", *args, module=module, timeout=timeout, pass_fds=pass_fds)


def assert_usage_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, nothing on stdout, no traceback."""
    check_usage_error(r, "vhost-user-blk", *needles)


def io_round_trip(d: Daemon, sector: int = 64, seed: int = 7) -> None:
    data = bytes((seed + k) % 251 for k in range(8 * KiB))
    with connect_guest(d) as g:
        assert g.blk.write(sector, data) == VIRTIO_BLK_S_OK
        assert g.blk.read(sector, len(data)) == data
    with open(d.image_path, "rb") as f:
        assert os.pread(f.fileno(), len(data), sector * SECTOR) == data


# --- capabilities and help -----------------------------------------------------------


def test_print_capabilities() -> None:
    r = run_cli("--print-capabilities")
    assert r.returncode == 0, r.stderr
    caps = json.loads(r.stdout)
    assert caps["type"] == "block"
    assert isinstance(caps["features"], list)
    assert set(caps["features"]) <= {"read-only", "blk-file"}
    assert "read-only" in caps["features"] and "blk-file" in caps["features"]
    assert r.stderr == ""


# The spec's back-end program conventions: with --print-capabilities "the other options
# are ignored", so no option, however wrong or missing, may stop the JSON or exit 0.
IGNORED_WITH_CAPABILITIES = {
    "alone": [],
    "unknown option": ["--bogus"],
    "option missing its value": ["--socket-path"],
    "bad value": ["--fd", "not-a-number"],
    "conflicting options": ["--client", "--fd", "3", "--socket-path", "x.sock"],
    "device option without its required ones": ["--num-queues", "0"],
    "with --help": ["--help"],
    "stray argument": ["stray"],
}


@pytest.mark.parametrize("device", registry.names())
def test_print_capabilities_ignores_every_other_option(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every registered device, with whatever else before or after it on the command
    line: its JSON on stdout, nothing on stderr, status 0 (in process: vhost.cli.run,
    what the programs call; the programs themselves are run below)."""
    device_type = registry.load(device)
    want = device_type.capabilities()
    for others in IGNORED_WITH_CAPABILITIES.values():
        for args in (["--print-capabilities", *others], [*others, "--print-capabilities"]):
            assert cli.run(device_type, args) == 0, args
            out, err = capsys.readouterr()
            assert err == "" and json.loads(out) == want, (args, out, err)


@pytest.mark.parametrize(
    ("device", "args"),
    [
        ("blk", ["--bogus"]),
        ("net", ["--socket-path"]),  # and net's required --tap/--switch is missing
        ("rng", ["--client", "--fd", "3"]),
    ],
)
def test_print_capabilities_programs(device: str, args: list[str]) -> None:
    """``python -m vhost NAME`` and the console script, with a wrong option each."""
    want = registry.load(device).capabilities()
    for module in (True, False):
        r = run_program(device, "--print-capabilities", *args, module=module)
        assert (r.returncode, r.stderr) == (0, ""), (device, args, r.stderr)
        assert json.loads(r.stdout) == want


def test_print_capabilities_without_blk_file(tmp_path: Path) -> None:
    """vhost-user-blk needs --blk-file to serve, not to say what it can do; nothing is
    created."""
    r = run_cli("--socket-path", str(tmp_path / "s.sock"), "--print-capabilities")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["type"] == "block"
    assert not (tmp_path / "s.sock").exists()


def test_help() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for opt in (
        "--socket-path",
        "--fd",
        "--blk-file",
        "--size",
        "--read-only",
        "--num-queues",
        "--serial",
        "--print-capabilities",
    ):
        assert opt in r.stdout


def test_python_m_vhost_is_the_same_program(tmp_path: Path, start_daemon: StartDaemon) -> None:
    for args in (
        ["--print-capabilities"],
        ["--help"],
        ["--socket-path", "x"],
        ["--socket-path", str(tmp_path / "s"), "--blk-file", str(tmp_path / "none")],
    ):
        a, b = run_cli(*args), run_cli(*args, module=True)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
    d = start_daemon("--serial", "via-python-m", command=device_command("blk", module=True))
    io_round_trip(d)
    with connect_guest(d) as g:
        assert g.blk.get_id() == b"via-python-m"


# --- argument errors -----------------------------------------------------------------


def test_missing_blk_file(tmp_path: Path) -> None:
    r = run_cli("--socket-path", str(tmp_path / "s"))
    assert_usage_error(r, "--blk-file")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args", [[], ["--socket-path", "S", "--fd", "3"]], ids=["neither", "both"])
def test_socket_path_xor_fd(tmp_path: Path, args: list[str]) -> None:
    args = [str(tmp_path / "s") if a == "S" else a for a in args]
    r = run_cli(*args, "--blk-file", str(tmp_path / "img"), "--size", "1M")
    assert_usage_error(r, "--socket-path", "--fd")
    assert not (tmp_path / "img").exists()


def test_missing_image_without_size(tmp_path: Path) -> None:
    img = tmp_path / "missing.img"
    r = run_cli("--socket-path", str(tmp_path / "s"), "--blk-file", str(img))
    assert_usage_error(r, str(img), "no such file", "--size")
    assert not img.exists()
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("size", ["abc", "100", "0", "-512", "1.5G", "12Q", "", "511"])
def test_bad_size(tmp_path: Path, size: str) -> None:
    img = tmp_path / "new.img"
    r = run_cli("--socket-path", str(tmp_path / "s"), "--blk-file", str(img), "--size", size)
    assert_usage_error(r, "bad size")
    assert not img.exists()


@pytest.mark.parametrize("n", ["0", "-1", "65", "two"])
def test_bad_num_queues(tmp_path: Path, n: str) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(MiB))
    r = run_cli("--socket-path", str(tmp_path / "s"), "--blk-file", str(img), "--num-queues", n)
    assert_usage_error(r, "--num-queues")
    assert not (tmp_path / "s").exists()


def test_serial_longer_than_20_bytes(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(MiB))
    r = run_cli("--socket-path", str(tmp_path / "s"), "--blk-file", str(img), "--serial", "x" * 21)
    assert_usage_error(r, "--serial", "20 bytes")
    # 20 bytes of UTF-8 is the limit, not 20 characters
    r = run_cli("--socket-path", str(tmp_path / "s"), "--blk-file", str(img), "--serial", "é" * 11)
    assert_usage_error(r, "--serial")


def test_image_not_a_file(tmp_path: Path) -> None:
    r = run_cli("--socket-path", str(tmp_path / "s"), "--blk-file", str(tmp_path))
    assert_usage_error(r, "not a regular file")


def test_image_smaller_than_a_sector(tmp_path: Path) -> None:
    img = tmp_path / "tiny"
    img.write_bytes(bytes(100))
    r = run_cli("--socket-path", str(tmp_path / "s"), "--blk-file", str(img))
    assert_usage_error(r, "smaller than one sector")


def test_read_only_cannot_create(tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    r = run_cli(
        "--socket-path", str(tmp_path / "s"), "--blk-file", str(img), "--size", "1M", "--read-only"
    )
    assert_usage_error(r, "--read-only")
    assert not img.exists()


# --- the image -------------------------------------------------------------------------


def test_size_creates_sparse_image(start_daemon: StartDaemon, tmp_path: Path) -> None:
    img = tmp_path / "created.img"
    d = start_daemon("--size", "1G", image=img, image_size=None)
    st = os.stat(img)
    assert st.st_size == GiB
    assert st.st_blocks == 0  # sparse
    assert stat.S_IMODE(st.st_mode) == 0o600
    with connect_guest(d) as g:
        assert g.capacity() == GiB // SECTOR
        data = b"\x5a" * 4096
        assert g.blk.write(GiB // SECTOR - 8, data) == VIRTIO_BLK_S_OK
    with open(img, "rb") as f:
        assert os.pread(f.fileno(), 4096, GiB - 4096) == data
    assert os.stat(img).st_size == GiB
    assert os.stat(img).st_blocks * 512 <= 64 * KiB


@pytest.mark.parametrize(
    ("text", "nbytes"), [("512", 512), ("64K", 64 * KiB), ("3MiB", 3 * MiB), ("2m", 2 * MiB)]
)
def test_size_units(start_daemon: StartDaemon, tmp_path: Path, text: str, nbytes: int) -> None:
    img = tmp_path / "u.img"
    d = start_daemon("--size", text, image=img, image_size=None)
    assert os.stat(img).st_size == nbytes
    with connect_guest(d) as g:
        assert g.capacity() == nbytes // SECTOR


def test_size_ignored_for_existing_image(start_daemon: StartDaemon) -> None:
    d = start_daemon("--size", "1G")
    assert os.stat(d.image_path).st_size == IMAGE_SIZE
    with connect_guest(d) as g:
        assert g.capacity() == IMAGE_SIZE // SECTOR


# --- the socket ------------------------------------------------------------------------


def test_socket_mode_is_0600(start_daemon: StartDaemon) -> None:
    d = start_daemon(umask=0)
    st = os.lstat(d.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    io_round_trip(d)


def test_socket_in_use_by_live_daemon(start_daemon: StartDaemon, tmp_path: Path) -> None:
    d = start_daemon()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    r = run_cli("--socket-path", str(d.socket_path), "--blk-file", str(other))
    assert_usage_error(r, str(d.socket_path), "in use")
    # the first daemon is unharmed, still owns the socket and serves I/O
    assert d.proc.poll() is None
    assert stat.S_ISSOCK(os.lstat(d.socket_path).st_mode)
    io_round_trip(d)


def test_refused_start_leaves_no_new_image(start_daemon: StartDaemon, tmp_path: Path) -> None:
    d = start_daemon()
    new = tmp_path / "never-served.img"
    r = run_cli("--socket-path", str(d.socket_path), "--blk-file", str(new), "--size", "1M")
    assert_usage_error(r, "in use")
    assert not new.exists()


def test_socket_path_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "regular"
    path.write_text("keep me")
    img = tmp_path / "img"
    img.write_bytes(bytes(MiB))
    r = run_cli("--socket-path", str(path), "--blk-file", str(img))
    assert_usage_error(r, "not a socket")
    assert path.read_text() == "keep me"


def test_socket_in_missing_directory(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(MiB))
    r = run_cli("--socket-path", str(tmp_path / "no" / "such" / "s"), "--blk-file", str(img))
    assert_usage_error(r, "directory", str(tmp_path / "no" / "such"), "does not exist")


def test_stale_socket_is_replaced(start_daemon: StartDaemon, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    d = start_daemon(socket_path=path)
    assert d.proc.poll() is None
    io_round_trip(d)
    assert "in use" not in d.log_text()


def test_socket_removed_on_exit(start_daemon: StartDaemon) -> None:
    d = start_daemon()
    io_round_trip(d)
    assert d.terminate() == 0
    assert not os.path.lexists(d.socket_path)


# --- --fd --------------------------------------------------------------------------------


def test_inherited_listening_socket(start_daemon: StartDaemon, tmp_path: Path) -> None:
    path = tmp_path / "inherited.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(8)
    try:
        d = start_daemon("--num-queues", "2", listen_fd=lsock.fileno(), socket_path=path)
    finally:
        lsock.close()  # the daemon holds its own copy
    assert d.proc.poll() is None
    io_round_trip(d, sector=8)
    with connect_guest(d, queues=None) as g:
        assert len(g.drivers) == 2
        assert g.drivers[1].write(16, b"\x11" * 512) == VIRTIO_BLK_S_OK
        assert g.drivers[0].read(16, 512) == b"\x11" * 512
    assert "on fd " in d.log_text()
    assert d.terminate() == 0


def test_fd_not_a_socket(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(MiB))
    r_end, w_end = os.pipe()
    try:
        r = run_cli("--fd", str(r_end), "--blk-file", str(img), pass_fds=(r_end,))
    finally:
        os.close(r_end)
        os.close(w_end)
    assert_usage_error(r, f"--fd {r_end}")


def test_fd_not_listening(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(MiB))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "bound-only"))
    try:
        r = run_cli("--fd", str(s.fileno()), "--blk-file", str(img), pass_fds=(s.fileno(),))
    finally:
        s.close()
    assert_usage_error(r, "not a listening socket")


def test_fd_not_open(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(MiB))
    r = run_cli("--fd", "200", "--blk-file", str(img))
    assert_usage_error(r, "--fd 200")


# --- signals -------------------------------------------------------------------------------


def test_sigint_is_a_clean_stop(start_daemon: StartDaemon) -> None:
    d = start_daemon()
    io_round_trip(d)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(10) == 0
    assert not os.path.lexists(d.socket_path)


def test_sigterm_as_soon_as_socket_accepts(tmp_path: Path) -> None:
    """A supervisor may stop the daemon as soon as its socket accepts connections.

    The window between listen() and the signal handlers is a few milliseconds; to hit it
    every time, the daemon's stderr is a pipe filled to the brim beforehand, so the
    daemon blocks on its first log line until the test drains the pipe (after SIGTERM)."""
    path = tmp_path / "early.sock"
    img = tmp_path / "img"
    img.write_bytes(bytes(MiB))
    r_end, w_end = os.pipe()
    os.set_blocking(w_end, False)
    try:
        while True:
            os.write(w_end, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w_end, True)
    proc = subprocess.Popen(
        [*device_command("blk"), "--socket-path", str(path), "--blk-file", str(img)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=w_end,
    )
    os.close(w_end)
    drained = bytearray()
    drain = threading.Thread(target=_read_to_eof, args=(r_end, drained))
    try:
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert proc.poll() is None, "daemon exited at startup"
                assert time.monotonic() < deadline, "socket never accepted"
                time.sleep(0.005)
            finally:
                s.close()
        proc.send_signal(signal.SIGTERM)
    except BaseException:
        proc.kill()
        raise
    finally:
        drain.start()  # unblocks the daemon's log writes
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        drain.join(10)
        os.close(r_end)
    assert b"Traceback" not in drained
    assert rc == 0, rc
    assert not os.path.lexists(path)


def _read_to_eof(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 65536):
        into += chunk


def test_second_daemon_starts_after_first_exits(start_daemon: StartDaemon) -> None:
    d1 = start_daemon()
    io_round_trip(d1, sector=100, seed=1)
    assert d1.terminate() == 0
    d2 = start_daemon(socket_path=d1.socket_path, image=d1.image_path)
    with connect_guest(d2) as g:
        data = bytes((1 + k) % 251 for k in range(8 * KiB))
        assert g.blk.read(100, len(data)) == data  # what the first daemon wrote
    fe = FrontEnd(d2.socket_path, GuestRam(MiB)).connect()
    try:
        assert fe.get_features() != 0
    finally:
        fe.close()
        fe.ram.close()
