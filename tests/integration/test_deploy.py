"""Running the daemon the way services run: socket access for another user, systemd
socket activation and readiness, a pid file, log levels and syslog, a config file for
many disks, and the usage errors a confused launcher gets (exit 2, one line, nothing
left behind).

Socket activation is tested with systemd-socket-activate(1), the launcher Debian's
systemd package ships for exactly this (it speaks LISTEN_FDS without systemd as PID 1),
and by hand where a launcher must be wrong on purpose.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, connect_guest, pattern
from tests.support.daemon import (
    IMAGE_SIZE,
    Daemon,
    Launch,
    Ready,
    check_usage_error,
    device_command,
    make_image,
    run_program,
)
from tests.support.net import BROADCAST, NetPort, tagged_frame

SECTOR = 512
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
#: a group every Debian system has, that root is not in
GROUP = "users"
NOBODY = 65534


def blk(*args: str, timeout: float = 20.0, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_program("blk", *args, timeout=timeout, **kw)  # type: ignore[arg-type]


def blk_argv(sock: Path, img: Path, *args: str) -> list[str]:
    return [*device_command("blk"), "--socket-path", str(sock), "--blk-file", str(img), *args]


def usage_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    check_usage_error(r, "vhost-user-blk", *needles)


def round_trip(d: Daemon, socket_path: Path, image: Path, sector: int, seed: int) -> None:
    """Write through ``socket_path`` and find the bytes in ``image``."""
    data = pattern(seed, 8192)
    with connect_guest(_on(d, socket_path)) as g:
        assert g.blk.write(sector, data) == VIRTIO_BLK_S_OK
        assert g.blk.read(sector, len(data)) == data
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), len(data), sector * SECTOR) == data


def _on(d: Daemon, socket_path: Path) -> Daemon:
    """``d`` as seen on one of its sockets."""
    return dataclasses.replace(d, sockets=[socket_path])


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket the daemon is told
    about in $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, state: str, timeout: float = 20.0) -> str:
        """The first message carrying line ``state`` (e.g. READY=1)."""
        deadline = time.monotonic() + timeout
        for m in self.messages:
            if state in m.splitlines():
                return m
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {state} within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                m = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(m)
            if state in m.splitlines():
                return m

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify")
    yield n
    n.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Daemons a test started; each must exit cleanly at the end."""
    started: list[Daemon] = []
    yield started
    for d in reversed(started):
        if not d.checked:
            d.check_clean_exit()


def start(
    started: list[Daemon],
    argv: Sequence[str],
    log: Path,
    sockets: Sequence[Path] = (),
    **options: object,
) -> Daemon:
    d = Launch(tuple(argv), tuple(sockets), **options).start(log)  # type: ignore[arg-type]
    started.append(d)
    return d


def image(tmp_path: Path, name: str = "disk") -> Path:
    img = tmp_path / f"{name}.img"
    make_image(img, IMAGE_SIZE)
    return img


# =========================================================================================
# Socket access
# =========================================================================================


def _connect_as(path: Path, uid: int, groups: Sequence[int]) -> subprocess.CompletedProcess[str]:
    """connect() to ``path`` from a process run as ``uid`` with supplementary
    ``groups`` (setpriv, util-linux)."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\n"
        "except OSError as e:\n print(e.strerror); sys.exit(1)\n"
        "print('connected')\n"
    )
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            *group_args,
            "python3",
            "-c",
            code,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    """A directory another user can reach (pytest's tmp_path is root's alone)."""
    d = tmp_path / "pub"
    d.mkdir()
    for p in (d, *d.parents):
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o011)
    return d


def test_default_socket_is_private(tmp_path: Path, running: list[Daemon], shared_dir: Path) -> None:
    sock = shared_dir / "d.sock"
    start(
        running,
        [*device_command("blk"), "--socket-path", str(sock), "--blk-file", str(image(tmp_path))],
        tmp_path / "d.log",
        [sock],
    )
    st = sock.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == 0
    r = _connect_as(sock, NOBODY, [grp.getgrnam(GROUP).gr_gid])
    assert r.returncode == 1 and "Permission denied" in r.stdout, r


def test_socket_group_lets_members_in(
    tmp_path: Path, running: list[Daemon], shared_dir: Path
) -> None:
    gid = grp.getgrnam(GROUP).gr_gid
    img = image(tmp_path)
    sock = shared_dir / "g.sock"
    d = start(
        running,
        blk_argv(sock, img, "--socket-group", GROUP),
        tmp_path / "g.log",
        [sock],
    )
    st = sock.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
    member = _connect_as(sock, NOBODY, [gid])
    assert (member.returncode, member.stdout.strip()) == (0, "connected"), member
    # the daemon names who connected
    d.wait_log(f"uid {NOBODY}, gid {NOBODY}")
    outsider = _connect_as(sock, NOBODY, [])
    assert outsider.returncode == 1 and "Permission denied" in outsider.stdout, outsider
    round_trip(d, sock, img, 64, 3)  # root still serves I/O


def test_socket_mode(tmp_path: Path, running: list[Daemon]) -> None:
    sock = tmp_path / "m.sock"
    start(
        running,
        blk_argv(sock, image(tmp_path), "--socket-mode", "0640"),
        tmp_path / "m.log",
        [sock],
    )
    assert stat.S_IMODE(sock.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--socket-group", "no-such-group-here"], ["--socket-group", "no such group"]),
        (["--socket-mode", "rw"], ["--socket-mode", "octal"]),
        (["--socket-mode", "1777"], ["--socket-mode"]),
    ],
)
def test_bad_access_options_start_nothing(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    sock, img = tmp_path / "x.sock", tmp_path / "new.img"
    r = blk("--socket-path", str(sock), "--blk-file", str(img), "--size", "1M", *args)
    usage_error(r, *needles)
    assert not sock.exists() and not img.exists()


# =========================================================================================
# Usage errors a launcher may cause: nothing half started
# =========================================================================================


def test_socket_path_too_long(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    img = tmp_path / "new.img"
    r = blk("--socket-path", str(long_dir / "s.sock"), "--blk-file", str(img), "--size", "1M")
    usage_error(r, "too long", "107")
    assert not img.exists()


def test_second_socket_bad_leaves_first_unmade(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "missing" / "b.sock"
    imgs = [tmp_path / "a.img", tmp_path / "b.img"]
    r = blk(
        "--socket-path",
        str(a),
        "--blk-file",
        str(imgs[0]),
        "--socket-path",
        str(b),
        "--blk-file",
        str(imgs[1]),
        "--size",
        "1M",
    )
    usage_error(r, "does not exist")
    assert not a.exists() and not any(i.exists() for i in imgs)


def _free_tcp_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_metrics_port_in_use(tmp_path: Path) -> None:
    taken = _free_tcp_port()
    try:
        port = taken.getsockname()[1]
        sock, img = tmp_path / "s.sock", tmp_path / "new.img"
        r = blk(
            "--socket-path",
            str(sock),
            "--blk-file",
            str(img),
            "--size",
            "1M",
            "--metrics",
            f"127.0.0.1:{port}",
        )
        usage_error(r, "--metrics", str(port), "in use")
        assert not sock.exists() and not img.exists()
    finally:
        taken.close()


def _with_listen_fds(
    fd: int, *args: str, names: str | None = None, pid: str = "$$"
) -> subprocess.CompletedProcess[str]:
    """The program with ``fd`` passed as fd 3 and LISTEN_FDS=1 (LISTEN_PID ``pid``:
    the program's own by default), as a launcher would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_FDS"] = "1"
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return subprocess.run(
        ["sh", "-c", f'LISTEN_PID={pid} exec "$@"', "sh", *device_command("blk"), *args],
        env=env,
        pass_fds=(3,),
        preexec_fn=lambda: os.dup2(fd, 3),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("kind", ["tcp", "pipe", "udp", "unix-not-listening"])
def test_listen_fds_must_be_listening_unix_sockets(tmp_path: Path, kind: str) -> None:
    keep: list[object] = []
    if kind == "tcp":
        s = _free_tcp_port()
        keep.append(s)
        fd = s.fileno()
        needles = ["fd 3", "TCP"]
    elif kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        keep.append(s)
        fd = s.fileno()
        needles = ["fd 3", "unix stream socket"]
    elif kind == "pipe":
        r_end, w_end = os.pipe()
        keep += [r_end, w_end]
        fd = r_end
        needles = ["fd 3", "not a socket"]
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / "quiet.sock"))
        keep.append(s)
        fd = s.fileno()
        needles = ["fd 3", "does not listen"]
    img = tmp_path / "new.img"
    try:
        r = _with_listen_fds(fd, "--blk-file", str(img), "--size", "1M")
        usage_error(r, "LISTEN_FDS", *needles)
        assert not img.exists()
    finally:
        for k in keep:
            os.close(k) if isinstance(k, int) else k.close()  # type: ignore[attr-defined]


def test_listen_fds_for_another_pid_are_not_taken(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "other.sock"))
    s.listen()
    try:
        r = _with_listen_fds(s.fileno(), "--blk-file", str(image(tmp_path)), pid="1")
        usage_error(r, "--socket-path", "LISTEN_FDS")
    finally:
        s.close()


def test_listen_fdnames_must_match_count(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "n.sock"))
    s.listen()
    try:
        r = _with_listen_fds(s.fileno(), "--blk-file", str(image(tmp_path)), names="a:b")
        usage_error(r, "LISTEN_FDNAMES")
        r = _with_listen_fds(
            s.fileno(), "--blk-file", str(image(tmp_path)), "--socket-name", "zz", names="a"
        )
        usage_error(r, "--socket-name zz", "LISTEN_FDNAMES: a")
    finally:
        s.close()


# =========================================================================================
# systemd: activation, readiness, pid file
# =========================================================================================

needs_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="systemd-socket-activate missing"
)


def _activate_env(notify: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(notify.path)}


def _wait_socket(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@needs_activate
def test_socket_activation_starts_on_demand_and_reports_ready(
    tmp_path: Path, notify: NotifySocket, running: list[Daemon]
) -> None:
    """systemd-socket-activate listens; the daemon starts on the first connection, serves
    the passed socket (not one of its own), says READY=1 and, at SIGTERM, STOPPING=1."""
    img = image(tmp_path)
    sock = tmp_path / "act.sock"
    pidfile = tmp_path / "d.pid"
    argv = [
        str(SOCKET_ACTIVATE),
        "-l",
        str(sock),
        "--fdname=disk0",
        "-E",
        "NOTIFY_SOCKET",
        *device_command("blk"),
        "--blk-file",
        str(img),
        "--pidfile",
        str(pidfile),
    ]
    d = start(
        running,
        argv,
        tmp_path / "act.log",
        [sock],
        ready=Ready.STARTED,
        owns_sockets=False,
        env=_activate_env(notify),
    )
    _wait_socket(sock)
    assert not pidfile.exists()  # nothing runs before the first connection
    round_trip(d, sock, img, 128, 9)  # this connection starts the daemon
    ready = notify.wait_for("READY=1")
    assert "STATUS=serving 1 device(s)" in ready.splitlines()
    assert f"MAINPID={d.pid}" in ready.splitlines()  # the launcher exec'd the daemon
    assert int(pidfile.read_text()) == d.pid
    assert d.log_lines("systemd socket disk0")
    d.proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert d.proc.wait(20) == 0
    d.checked = True
    assert not pidfile.exists()
    assert sock.exists()  # the launcher's socket file: not ours to remove


@needs_activate
def test_socket_activation_names_map_sockets_to_disks(
    tmp_path: Path, notify: NotifySocket, running: list[Daemon]
) -> None:
    """Two passed sockets named a and b; --socket-name pairs each with its disk whatever
    the order the launcher passes them in."""
    imgs = {n: image(tmp_path, n) for n in ("a", "b")}
    socks = {n: tmp_path / f"{n}.sock" for n in ("a", "b")}
    argv = [
        str(SOCKET_ACTIVATE),
        "-l",
        str(socks["a"]),
        "-l",
        str(socks["b"]),
        "--fdname=a:b",
        "-E",
        "NOTIFY_SOCKET",
        *device_command("blk"),
        "--socket-name",
        "b",
        "--blk-file",
        str(imgs["b"]),
        "--socket-name",
        "a",
        "--blk-file",
        str(imgs["a"]),
    ]
    d = start(
        running,
        argv,
        tmp_path / "ab.log",
        list(socks.values()),
        ready=Ready.STARTED,
        owns_sockets=False,
        env=_activate_env(notify),
    )
    for s in socks.values():
        _wait_socket(s)
    round_trip(d, socks["a"], imgs["a"], 8, 1)
    notify.wait_for("READY=1")
    round_trip(d, socks["b"], imgs["b"], 64, 2)
    with open(imgs["a"], "rb") as f:  # b's bytes went to b only
        assert os.pread(f.fileno(), 8192, 64 * SECTOR) == bytes(8192)


def test_ready_after_listening_and_pidfile(
    tmp_path: Path, notify: NotifySocket, running: list[Daemon]
) -> None:
    """Without activation: READY=1 comes once the socket accepts; the pid file holds the
    pid then, and a second daemon on the same pid file is refused."""
    img = image(tmp_path)
    sock, pidfile = tmp_path / "r.sock", tmp_path / "r.pid"
    d = start(
        running,
        blk_argv(sock, img, "--pidfile", str(pidfile)),
        tmp_path / "r.log",
        [sock],
        ready=Ready.STARTED,
        env=_activate_env(notify),
    )
    notify.wait_for("READY=1")
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(sock))  # listening when it said so
    assert pidfile.read_text() == f"{d.pid}\n"
    d.wait_log("ready: 1 device")
    other = tmp_path / "other.sock"
    r = blk(
        "--socket-path",
        str(other),
        "--blk-file",
        str(image(tmp_path, "o")),
        "--pidfile",
        str(pidfile),
    )
    usage_error(r, "--pidfile", "running")
    assert not other.exists()
    assert pidfile.read_text() == f"{d.pid}\n"  # left as it was
    d.check_clean_exit()
    assert not pidfile.exists()


# =========================================================================================
# Logging
# =========================================================================================


def test_log_level_warning_keeps_info_out(tmp_path: Path, running: list[Daemon]) -> None:
    sock = tmp_path / "q.sock"
    d = start(
        running,
        blk_argv(sock, image(tmp_path), "--log-level", "warning"),
        tmp_path / "q.log",
        [sock],
        ready=Ready.ACCEPTS,
    )
    with connect_guest(d) as g:
        assert g.blk.write(8, bytes(4096)) == VIRTIO_BLK_S_OK
    d.check_clean_exit()
    text = d.log_text()
    assert "front end connected" not in text and "ready" not in text, text
    # the same daemon at the default level says both
    d2 = start(running, d.argv[:-2], tmp_path / "q2.log", [sock], ready=Ready.ACCEPTS)
    d2.wait_log("ready: 1 device")


def test_syslog(tmp_path: Path, running: list[Daemon]) -> None:
    log_sock = tmp_path / "log"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(log_sock))
    rx.settimeout(10)
    sock = tmp_path / "sl.sock"
    try:
        d = start(
            running,
            blk_argv(sock, image(tmp_path), "--syslog", "--syslog-socket", str(log_sock)),
            tmp_path / "sl.log",
            [sock],
            ready=Ready.ACCEPTS,
        )
        got = []
        while not any("ready: 1 device" in m for m in got):
            got.append(rx.recv(4096).decode())
        # <daemon.info>: facility 3 * 8 + priority 6
        line = next(m for m in got if "ready: 1 device" in m)
        assert line.startswith(f"<30>vhost-user-blk[{d.pid}]: INFO vhost: ready"), line
        d.check_clean_exit()
        assert "ready" not in d.log_text()  # not on stderr as well
    finally:
        rx.close()
    r = blk(
        "--socket-path",
        str(tmp_path / "x.sock"),
        "--blk-file",
        str(image(tmp_path)),
        "--syslog",
        "--syslog-socket",
        str(tmp_path / "nolog"),
    )
    usage_error(r, "--syslog", "cannot reach")


# =========================================================================================
# The config file
# =========================================================================================


def test_config_file_serves_disks_with_their_own_options(
    tmp_path: Path, running: list[Daemon]
) -> None:
    a, b = image(tmp_path, "a"), image(tmp_path, "b")
    sa, sb = tmp_path / "a.sock", tmp_path / "b.sock"
    conf = tmp_path / "disks.toml"
    conf.write_text(
        f'log-level = "info"\n\n'
        f'[[device]]\nsocket-path = "{sa}"\nblk-file = "{a}"\nnum-queues = 2\nserial = "disk-a"\n\n'
        f'[[device]]\nsocket-path = "{sb}"\nblk-file = "{b}"\nread-only = true\n'
    )
    d = start(
        running, [*device_command("blk"), "--config", str(conf)], tmp_path / "c.log", [sa, sb]
    )
    round_trip(d, sa, a, 32, 5)
    with connect_guest(_on(d, sb)) as g:
        assert g.fe.queue_num == 64
        assert g.blk.write(0, bytes(4096)) == VIRTIO_BLK_S_IOERR  # b alone is read-only
    with connect_guest(_on(d, sa)) as g:
        assert g.fe.queue_num == 2


@pytest.mark.parametrize(
    "text,cli,needles",
    [
        (
            "[[device]]\nblk-file = 'x'\nwhat = 1\n",
            [],
            ["[[device]] 1", "unknown device option 'what'"],
        ),
        ("pidfile = 3\nfoo = 1\n[[device]]\n", [], ["unknown program-wide option 'foo'"]),
        ("socket-group = 'x'\n", [], ["no [[device]]"]),
        ("[[device\n", [], ["not valid TOML"]),
        ("[[device]]\nblk-file = '/nonexistent/x.img'\n", [], ["[[device]] 1", "--socket-path"]),
        (
            "[[device]]\nsocket-path = 's'\nblk-file = 'x'\n",
            ["--blk-file", "y"],
            ["--config", "--blk-file", "command line"],
        ),
    ],
)
def test_bad_config(tmp_path: Path, text: str, cli: list[str], needles: list[str]) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    r = blk("--config", str(conf), *cli)
    usage_error(r, *needles)


def test_config_missing_file(tmp_path: Path) -> None:
    usage_error(blk("--config", str(tmp_path / "nope.toml")), "--config", "No such file")


def test_config_net_ports_share_a_switch(tmp_path: Path, running: list[Daemon]) -> None:
    """Ports in separate [[device]] tables naming one switch are ports of one switch: a
    frame sent on one arrives on the other."""
    socks = [tmp_path / f"p{i}.sock" for i in range(2)]
    conf = tmp_path / "ports.toml"
    conf.write_text("".join(f'[[device]]\nsocket-path = "{s}"\nswitch = "sw"\n' for s in socks))
    d = start(running, [*device_command("net"), "--config", str(conf)], tmp_path / "n.log", socks)
    assert len(d.log_lines("switch sw")) == 2, d.log_text()
    a, b = NetPort(socks[0]), NetPort(socks[1])
    try:
        b.post_rx(8)
        f = tagged_frame(BROADCAST, a.mac, 1)
        a.send(f)
        assert [g.frame for g in b.receive(1)] == [f]
    finally:
        a.close()
        b.close()
