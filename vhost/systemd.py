"""systemd's side of a service, by hand: socket activation and readiness.

* :func:`activated_sockets` takes the listening sockets a service manager passed
  (``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, as sd_listen_fds(3) describes:
  fds from 3 on). Only fds meant for this process are taken, each is checked to be a
  listening unix stream socket, and the variables are removed from the environment
  either way, so nothing this process starts mistakes them for its own.
* :func:`notify` sends a state (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to
  ``$NOTIFY_SOCKET`` (sd_notify(3)): a path, or an abstract address given as ``@name``.

Both are a few lines of the documented protocol; a library (python-systemd) would bring
libsystemd's bindings for no gain. systemd-socket-activate(1) is a launcher that speaks
the same protocol without systemd, and is what the tests use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

#: the first fd a service manager passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
#: more than this many passed fds is taken for a confused launcher
MAX_LISTEN_FDS = 1024
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """The passed fds cannot be served (one line, for a usage error)."""


@dataclass
class ActivatedSocket:
    sock: socket.socket
    #: its name in LISTEN_FDNAMES (FileDescriptorName= in the .socket unit); systemd
    #: says "unknown" for an fd without one
    name: str
    #: the path it is bound to ("" for an unnamed or abstract socket)
    path: str


def _describe_family(sock: socket.socket) -> str:
    names = {socket.AF_INET: "a TCP/IPv4", socket.AF_INET6: "a TCP/IPv6"}
    if sock.type == socket.SOCK_STREAM and sock.family in names:
        return f"{names[sock.family]} socket"
    if sock.family == socket.AF_UNIX:
        kind = {socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}
        return f"a unix {kind.get(sock.type, str(sock.type))} socket"
    return f"a socket of family {int(sock.family)}"


def _check(fd: int) -> socket.socket:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ActivationError(f"LISTEN_FDS: fd {fd} is not open ({e.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ActivationError(
            f"LISTEN_FDS: fd {fd} is not a socket; vhost-user needs a listening unix stream socket"
        )
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ActivationError(
                f"LISTEN_FDS: fd {fd} is {_describe_family(sock)}; vhost-user needs a "
                "unix stream socket (ListenStream=/path in the .socket unit)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"LISTEN_FDS: fd {fd} is a unix socket that does not listen")
    except BaseException:
        sock.detach()
        raise
    return sock


def activated_sockets(environ: MutableMapping[str, str] | None = None) -> list[ActivatedSocket]:
    """The sockets passed to this process, checked (empty when none are, or when they
    are meant for another pid). Unsets the variables in every case. Raises
    :class:`ActivationError` for fds that are not listening unix stream sockets, or
    variables that make no sense; the fds are then left as they were."""
    env = os.environ if environ is None else environ
    values = {k: env.pop(k, None) for k in _VARIABLES}
    pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if count is None:
        return []
    if pid is not None:
        try:
            meant_for = int(pid)
        except ValueError:
            raise ActivationError(f"LISTEN_PID={pid!r} is not a process id") from None
        if meant_for != os.getpid():
            return []  # for a parent that exec'd us without clearing them: not ours
    try:
        n = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number") from None
    if not 0 <= n <= MAX_LISTEN_FDS:
        raise ActivationError(f"LISTEN_FDS={n} is not in 0..{MAX_LISTEN_FDS}")
    labels = names.split(":") if names else ["unknown"] * n
    if len(labels) != n:
        raise ActivationError(
            f"LISTEN_FDNAMES names {len(labels)} sockets but LISTEN_FDS={n}: {names!r}"
        )
    taken: list[ActivatedSocket] = []
    try:
        for i in range(n):
            fd = LISTEN_FDS_START + i
            sock = _check(fd)
            os.set_inheritable(fd, False)
            path = sock.getsockname()
            text = path if isinstance(path, str) and not path.startswith("\0") else ""
            taken.append(ActivatedSocket(sock, labels[i], text))
    except BaseException:
        for a in taken:
            a.sock.detach()
        raise
    return taken


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``state`` (lines like ``READY=1``) to the service manager; False when
    there is none ($NOTIFY_SOCKET unset) or it cannot be reached (never raises: a
    supervisor that went away must not stop the daemon)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
    ):
        s.connect(target)
        s.sendall(state.encode())
        return True
    return False
