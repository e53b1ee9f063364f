"""Frames sent and captured on an interface inside a network namespace.

:class:`PacketAgent` runs :func:`packet_agent_main` inside the namespace (``ip netns
exec NS python -c ...``: Python 3.11 has no ``os.setns``): an AF_PACKET socket bound to
the interface (a TAP the daemon serves, say) that injects frames towards whoever reads
it and records every frame arriving from it.

Boundary: frames only as bytes; building and parsing them is :mod:`tests.support.net`'s.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parents[2]

ETH_P_ALL = 0x0003


def packet_agent_main(ifname: str) -> None:
    """Inside the namespace: bind an AF_PACKET socket to ``ifname``, record every frame
    that arrives on it (not the ones sent out of it), and serve one JSON command per
    stdin line: ``{"op": "send", "frame": HEX}`` sends a frame out of the interface
    (towards whoever reads the TAP), ``{"op": "take", "count": N, "timeout": T}``
    returns the frames recorded so far (waiting up to T for N) and forgets them."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, ETH_P_ALL))
    frames: list[bytes] = []
    cond = threading.Condition()

    def record() -> None:
        while True:
            data, addr = s.recvfrom(65536)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            with cond:
                frames.append(data)
                cond.notify_all()

    def take(count: int, timeout: float) -> list[str]:
        with cond:
            cond.wait_for(lambda: len(frames) >= count, timeout)
            taken = [f.hex() for f in frames]
            frames.clear()
        return taken

    threading.Thread(target=record, daemon=True).start()
    print(json.dumps({"ready": ifname}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "send":
            reply: dict[str, Any] = {"sent": s.send(bytes.fromhex(cmd["frame"]))}
        elif cmd["op"] == "take":
            reply = {"frames": take(int(cmd["count"]), float(cmd["timeout"]))}
        else:
            reply = {"error": f"unknown op {cmd['op']!r}"}
        print(json.dumps(reply), flush=True)


class PacketAgent:
    """Client of :func:`packet_agent_main` running under ``exec_prefix`` (``ip netns exec
    NS``) on interface ``ifname``."""

    def __init__(self, exec_prefix: Sequence[str], ifname: str, timeout: float = 10.0) -> None:
        code = (
            "import sys; from tests.support.packet_agent import packet_agent_main; "
            "packet_agent_main(sys.argv[1])"
        )
        self.proc = subprocess.Popen(
            [*exec_prefix, sys.executable, "-c", code, ifname],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.timeout = timeout
        try:
            self._reply()
        except BaseException:
            self.close()
            raise

    def _reply(self, timeout: float | None = None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout or self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"packet agent gave no answer: {err}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _call(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def send(self, frame: bytes) -> None:
        sent = self._call({"op": "send", "frame": frame.hex()})["sent"]
        assert sent == len(frame), f"AF_PACKET sent {sent} of {len(frame)} bytes"

    def take(self, count: int = 0, timeout: float = 0.0) -> list[bytes]:
        """Frames that arrived on the interface since the last take (waiting up to
        ``timeout`` for ``count`` of them)."""
        r = self._call({"op": "take", "count": count, "timeout": timeout}, timeout + self.timeout)
        return [bytes.fromhex(h) for h in r["frames"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
