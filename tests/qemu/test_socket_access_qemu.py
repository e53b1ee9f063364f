"""--socket-group with a real QEMU run as another user, as libvirt runs it (user
libvirt-qemu): a QEMU in the socket's group attaches, one outside it is refused, and
the daemon serves on.

QEMU runs as nobody (setpriv), with or without the group as a supplementary group,
paused before the guest runs (-S): vhost-user-blk-pci's realize has then done the
vhost-user handshake (features, queue count, config space), which is what attaching
means. The full boot under another user is the libvirt test's (tests/libvirt).
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, spawn_blk

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

GROUP = "users"  # in every Debian system; root and nobody are not members
NOBODY = 65534


def _qemu_as_nobody(sock: Path, groups: list[int], log: Path) -> subprocess.Popen[bytes]:
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    argv = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        *group_args,
        "qemu-system-x86_64",
        "-machine",
        "q35,accel=tcg",
        "-m",
        "128M",
        "-smp",
        "4",  # QEMU then asks for 4 queues: the daemon's default offer must cover it
        "-object",
        "memory-backend-memfd,id=mem,size=128M,share=on",
        "-numa",
        "node,memdev=mem",
        "-chardev",
        f"socket,id=c0,path={sock}",
        "-device",
        "vhost-user-blk-pci,chardev=c0",  # QEMU's default queue count: one per vCPU
        "-nodefaults",
        "-display",
        "none",
        "-S",
    ]
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f)


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    pub = tmp_path / "pub"
    pub.mkdir()
    for p in (pub, *pub.parents):
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o011)  # nobody may reach the socket's directory
    return spawn_blk(tmp_path, "blk", "-v", "--socket-group", GROUP, socket_path=pub / "blk.sock")


def test_qemu_in_group_attaches_outsider_refused(daemon: Daemon, tmp_path: Path) -> None:
    gid = grp.getgrnam(GROUP).gr_gid
    try:
        outsider = _qemu_as_nobody(daemon.socket_path, [], tmp_path / "outsider.log")
        assert outsider.wait(60) != 0
        text = (tmp_path / "outsider.log").read_text()
        assert "Permission denied" in text, text
        assert f"uid {NOBODY}" not in daemon.log_text()

        member = _qemu_as_nobody(daemon.socket_path, [gid], tmp_path / "member.log")
        try:
            line = daemon.wait_log(
                f"front end connected: pid {member.pid} (qemu-system-x86)", 1, 60
            )
            assert f"uid {NOBODY}, gid {NOBODY}" in line[0]
            daemon.wait_log("<- GetConfig(", 1, 60)  # realize read the config space
            time.sleep(1)
            assert member.poll() is None, (tmp_path / "member.log").read_text()
        finally:
            member.kill()
            member.wait(30)
        daemon.wait_log("disconnected:", daemon.probe_disconnects + 1, 30)
    finally:
        daemon.check_clean_exit()
    assert os.path.exists(daemon.image_path)
