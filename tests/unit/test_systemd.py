"""vhost.systemd: which passed fds are taken, that the variables are gone afterwards,
and what sd_notify sends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vhost import systemd

# A child that takes its passed sockets and reports them and what is left of the
# environment (fds must start at 3, which only a fresh process can promise).
CHILD = """
import json, os
from vhost import systemd
got = systemd.activated_sockets()
print(json.dumps({
    "sockets": [
        [a.sock.fileno(), a.name, a.path, os.get_inheritable(a.sock.fileno())] for a in got
    ],
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}))
"""


def _child(fds: list[int], env: dict[str, str], pid: str = "$$") -> dict[str, object]:
    import json

    base = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}

    def place() -> None:
        for i, fd in enumerate(fds):
            os.dup2(fd, 3 + i)

    r = subprocess.run(
        ["sh", "-c", f'LISTEN_PID={pid} exec "$@"', "sh", sys.executable, "-c", CHILD],
        env={**base, **env},
        pass_fds=tuple(range(3, 3 + len(fds))),
        preexec_fn=place,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out: dict[str, object] = json.loads(r.stdout)
    return out


def _listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    return s


def test_takes_named_sockets_and_unsets_variables(tmp_path: Path) -> None:
    a, b = _listener(tmp_path / "a.sock"), _listener(tmp_path / "b.sock")
    try:
        got = _child([a.fileno(), b.fileno()], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "disk0:disk1"})
    finally:
        a.close()
        b.close()
    assert got["sockets"] == [
        [3, "disk0", str(tmp_path / "a.sock"), False],
        [4, "disk1", str(tmp_path / "b.sock"), False],
    ]
    assert got["left"] == []


def test_fds_for_another_pid_are_left_alone(tmp_path: Path) -> None:
    a = _listener(tmp_path / "a.sock")
    try:
        got = _child([a.fileno()], {"LISTEN_FDS": "1"}, pid="1")
    finally:
        a.close()
    assert got == {"sockets": [], "left": []}


def test_no_variables_no_sockets() -> None:
    assert systemd.activated_sockets({}) == []


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())}, "LISTEN_FDS='x'"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, "LISTEN_PID='me'"),
        ({"LISTEN_FDS": "-1", "LISTEN_PID": str(os.getpid())}, "LISTEN_FDS=-1"),
        (
            {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "a:b"},
            "LISTEN_FDNAMES",
        ),
    ],
)
def test_nonsense_is_refused_and_unset(env: dict[str, str], needle: str) -> None:
    environ = dict(env)
    with pytest.raises(systemd.ActivationError, match=needle.replace("(", r"\(")):
        systemd.activated_sockets(environ)
    assert environ == {}


def test_notify_path_and_abstract(tmp_path: Path) -> None:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "n"))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(f"\0vhost-test-{os.getpid()}")
    try:
        assert systemd.notify("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": str(tmp_path / "n")})
        assert rx.recv(100) == b"READY=1\nSTATUS=x"
        assert systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": f"@vhost-test-{os.getpid()}"})
        assert abstract.recv(100) == b"STOPPING=1"
    finally:
        rx.close()
        abstract.close()
    # no manager, or one gone: quietly False
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "relative"})
