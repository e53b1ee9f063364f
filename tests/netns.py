"""Throw-away Linux network namespaces for tests that move real packets.

Rules (see /work/shared/FACTS.md): test traffic stays on this machine.  A test
creates a uniquely named namespace, puts its TAP devices, bridges, TCP helpers and
QEMU inside it, uses only private/test addresses there (e.g. 10.99.0.0/24) and
deletes the namespace at the end.  A fresh namespace has no route out of it: its
only interfaces are ``lo`` and what the test adds (TAPs, bridges), there is no
default route, and :meth:`NetNs.check_isolated` asserts exactly that.

Typical use::

    with NetNs("virtio") as ns:
        ns.add_tap("tap0", "10.99.0.1/24")
        ns.check_isolated()
        proc = ns.popen(["qemu-system-x86_64", ...])   # runs inside the namespace
        ns.run(["busybox", "ping", "-c", "1", "10.99.0.2"])
    # every process started in it is killed, the namespace is deleted

Devices created in a namespace (tun/tap, bridge, veth) are destroyed by the
kernel with it.  Needs root, ``ip`` (iproute2) and /dev/net/tun.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

IP = "ip"
NS_PREFIX = "vhtest-"
CMD_TIMEOUT = 30.0
# link kinds a test namespace may hold: none of them reaches outside the namespace
# (a veth could, if its peer were moved out, so it is not allowed here)
ISOLATED_KINDS = frozenset({"loopback", "tun", "bridge", "dummy"})


class NetNsError(RuntimeError):
    """A namespace operation failed."""


def netns_supported() -> str | None:
    """None if namespaces, TAPs and bridges can be made here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (ip netns add, TAP devices)"
    if shutil.which(IP) is None:
        return "needs iproute2 (ip)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    return None


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (lines are ``NAME`` or ``NAME (id: N)``)."""
    r = subprocess.run(
        [IP, "netns", "list"], capture_output=True, text=True, check=False, timeout=CMD_TIMEOUT
    )
    if r.returncode != 0:
        raise NetNsError(f"ip netns list failed: {r.stderr.strip()}")
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]


def leaked_namespaces(prefix: str = NS_PREFIX, *, this_process: bool = False) -> list[str]:
    """Namespaces named like ours that still exist.  With ``this_process`` only those
    made by this process (the name holds the pid), so parallel workers do not see
    each other's live namespaces as leaks."""
    if this_process:
        prefix = f"{prefix}{os.getpid()}-"
    return [n for n in list_namespaces() if n.startswith(prefix)]


def assert_no_leaked_namespaces(prefix: str = NS_PREFIX, *, this_process: bool = True) -> None:
    leaked = leaked_namespaces(prefix, this_process=this_process)
    if leaked:
        raise AssertionError(f"network namespaces left behind: {leaked}")


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT, **kw: Any
) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    r: subprocess.CompletedProcess[str] = subprocess.run(
        list(argv), text=True, check=False, timeout=timeout, **kw
    )
    if check and r.returncode != 0:
        raise NetNsError(
            f"{' '.join(map(str, argv))} failed with {r.returncode}: "
            f"{(r.stderr or '').strip()} {(r.stdout or '').strip()}".rstrip()
        )
    return r


class NetNs:
    """A uniquely named network namespace, deleted on :meth:`close` / ``__exit__``.

    The name is ``<prefix><pid>-<tag>-<random>``.  ``ipv6=False`` (the default)
    disables IPv6 on every interface of the namespace, so the guests see no stray
    router solicitations / MLD reports on their links.
    """

    _live: ClassVar[set[str]] = (
        set()
    )  # created by this process, not yet deleted (atexit safety net)

    def __init__(self, tag: str = "t", *, prefix: str = NS_PREFIX, ipv6: bool = False) -> None:
        self.name = f"{prefix}{os.getpid()}-{tag}-{secrets.token_hex(3)}"
        self.ipv6 = ipv6
        self.procs: list[subprocess.Popen[Any]] = []
        self.created = False
        self.closed = False

    def __repr__(self) -> str:
        return f"NetNs({self.name!r})"

    # -- lifecycle ---------------------------------------------------------
    def create(self) -> Self:
        if self.created:
            raise NetNsError(f"{self.name} already created")
        _run([IP, "netns", "add", self.name])
        self.created = True
        NetNs._live.add(self.name)
        try:
            self.ip("link", "set", "lo", "up")
            if not self.ipv6:
                for key in ("all", "default"):
                    self.run(
                        ["sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"], check=False
                    )
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Self:
        if not self.created:
            self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problems = self.close(raise_errors=False)
        if problems:
            msg = f"cleaning up {self.name}: " + "; ".join(problems)
            if exc is None:
                raise NetNsError(msg)
            print(f"WARNING: {msg}", file=sys.stderr)

    def close(self, raise_errors: bool = True) -> list[str]:
        """Kill the processes started with :meth:`popen` (SIGTERM to their process
        group, SIGKILL after 3 s), then SIGKILL whatever else still runs in the
        namespace (it was made by this test, so anything in it is ours, e.g. a QEMU
        started through :meth:`exec_args`), then ``ip netns del``.  Idempotent.
        Returns the problems met (and raises NetNsError for them by default)."""
        if self.closed or not self.created:
            self.closed = True
            return []
        problems: list[str] = []
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                try:
                    p.wait(5.0)
                except subprocess.TimeoutExpired:
                    problems.append(f"process {p.pid} did not die")
        for attempt in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05 if attempt < 20 else 0.2)
        else:
            problems.append(f"processes still in the namespace: {self.pids()}")
        for attempt in range(20):
            r = _run([IP, "netns", "del", self.name], check=False)
            if r.returncode == 0 or self.name not in list_namespaces():
                break
            time.sleep(0.1 * (attempt + 1))
        else:
            problems.append(f"ip netns del failed: {r.stderr.strip()}")
        if self.name in list_namespaces():
            problems.append("namespace still listed after ip netns del")
        else:
            NetNs._live.discard(self.name)
        self.closed = True
        if problems and raise_errors:
            raise NetNsError(f"cleaning up {self.name}: " + "; ".join(problems))
        return problems

    def pids(self) -> list[int]:
        """Pids of the processes running in the namespace (``ip netns pids``)."""
        r = _run([IP, "netns", "pids", self.name], check=False)
        return [int(t) for t in r.stdout.split() if t.isdigit()]

    # -- running things inside ---------------------------------------------
    def exec_args(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace (``ip netns exec NAME``;
        ip execs the command, so the pid is the command's own)."""
        self._check_open()
        return [IP, "netns", "exec", self.name, *map(str, argv)]

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace and wait; text output captured unless
        overridden.  Raises NetNsError on a non-zero exit when ``check``."""
        return _run(self.exec_args(cmd), check=check, timeout=timeout, **kw)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside the namespace in its own session; it is killed on
        :meth:`close`.  Keyword arguments go to :class:`subprocess.Popen`."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p: subprocess.Popen[Any] = subprocess.Popen(self.exec_args(cmd), **kw)
        self.procs.append(p)
        return p

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME ARGS`` (iproute2 switches namespace itself; faster than exec)."""
        self._check_open()
        return _run([IP, "-n", self.name, *args], check=check)

    def _check_open(self) -> None:
        if not self.created or self.closed:
            raise NetNsError(f"{self.name} is not open")

    # -- devices -----------------------------------------------------------
    def add_tap(
        self,
        name: str,
        addr_cidr: str | None = None,
        *,
        mtu: int | None = None,
        multi_queue: bool = False,
        vnet_hdr: bool = False,
        up: bool = True,
    ) -> str:
        """A persistent TAP device ``name`` inside the namespace (``ip tuntap add
        dev NAME mode tap``), with an optional address, MTU, and up.  Its carrier
        comes on when a program (QEMU, a back end) attaches to it with TUNSETIFF
        and the same ``multi_queue`` flag.  Returns the name."""
        if len(name) > 15:
            raise ValueError(f"interface name {name!r} longer than 15 characters")
        args = ["tuntap", "add", "dev", name, "mode", "tap"]
        if multi_queue:
            args.append("multi_queue")
        if vnet_hdr:
            args.append("vnet_hdr")
        self.ip(*args)
        self._configure(name, addr_cidr, mtu, up)
        return name

    def add_bridge(
        self,
        name: str,
        addr_cidr: str | None = None,
        *,
        ports: Sequence[str] = (),
        mtu: int | None = None,
        up: bool = True,
    ) -> str:
        """A Linux bridge (STP off, forward delay 0) with ``ports`` enslaved and
        brought up, an optional address, and up.  Returns the name."""
        self.ip("link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        for port in ports:
            self.set_master(port, name)
        self._configure(name, addr_cidr, mtu, up)
        return name

    def set_master(self, dev: str, bridge: str) -> None:
        self.ip("link", "set", dev, "master", bridge)
        self.ip("link", "set", dev, "up")

    def add_addr(self, dev: str, addr_cidr: str) -> None:
        self.ip("addr", "add", addr_cidr, "dev", dev)

    def set_up(self, dev: str) -> None:
        self.ip("link", "set", dev, "up")

    def _configure(self, dev: str, addr_cidr: str | None, mtu: int | None, up: bool) -> None:
        if mtu is not None:
            self.ip("link", "set", dev, "mtu", str(mtu))
        if addr_cidr:
            self.add_addr(dev, addr_cidr)
        if up:
            self.set_up(dev)

    # -- inspection --------------------------------------------------------
    def links(self) -> list[dict[str, Any]]:
        """``ip -j -d -s link show`` inside the namespace (one dict per device)."""
        out = json.loads(self.ip("-j", "-d", "-s", "link", "show").stdout or "[]")
        assert isinstance(out, list)
        return out

    def link(self, dev: str) -> dict[str, Any]:
        for d in self.links():
            if d.get("ifname") == dev:
                return d
        raise NetNsError(f"no device {dev} in {self.name}")

    def link_names(self) -> list[str]:
        return [str(d["ifname"]) for d in self.links()]

    def stats(self, dev: str) -> dict[str, int]:
        """rx/tx packet and byte counters of ``dev`` (keys rx_packets, tx_bytes, ...)."""
        s = self.link(dev).get("stats64", {})
        return {
            f"{d}_{k}": int(s.get(d, {}).get(k, 0))
            for d in ("rx", "tx")
            for k in ("packets", "bytes", "dropped", "errors")
        }

    def fdb(self, bridge: str) -> list[dict[str, Any]]:
        """The forwarding database of ``bridge`` (``bridge -j fdb show br BRIDGE``)."""
        self._check_open()
        r = _run(["bridge", "-n", self.name, "-j", "fdb", "show", "br", bridge])
        out = json.loads(r.stdout or "[]")
        assert isinstance(out, list)
        return out

    def carrier(self, dev: str) -> bool:
        return "LOWER_UP" in self.link(dev).get("flags", [])

    def wait_carrier(self, dev: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.carrier(dev):
            if time.monotonic() > deadline:
                raise NetNsError(f"{dev} in {self.name}: no carrier after {timeout}s")
            time.sleep(0.05)

    def check_isolated(self) -> None:
        """Raise NetNsError unless the namespace cannot route anywhere: only
        loopback/tun/bridge/dummy devices, no default route, forwarding off."""
        bad = []
        for d in self.links():
            kind = (
                "loopback"
                if d.get("link_type") == "loopback"
                else (d.get("linkinfo", {}).get("info_kind", "?"))
            )
            if kind not in ISOLATED_KINDS:
                bad.append(f"{d.get('ifname')} is a {kind} device")
        for fam in ("-4", "-6"):
            r = self.ip(fam, "route", "show", "default", check=False)
            if r.stdout.strip():
                bad.append(f"default route ({fam}): {r.stdout.strip()}")
        fwd = self.run(["sysctl", "-n", "net.ipv4.ip_forward"], check=False).stdout.strip()
        if fwd not in ("0", ""):
            bad.append(f"net.ipv4.ip_forward={fwd}")
        if bad:
            raise NetNsError(f"{self.name} is not isolated: " + "; ".join(bad))


@atexit.register
def _delete_leftovers() -> None:
    """Safety net: namespaces this process made and did not get to delete."""
    for name in list(NetNs._live):
        r = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True, check=False)
        for t in r.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(t), signal.SIGKILL)
        subprocess.run([IP, "netns", "del", name], capture_output=True, check=False)
