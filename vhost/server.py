"""asyncio (uvloop) server: get front-end connections one at a time, move bytes and fds
between each connection and a Session.

Where connections come from is a *source*; :class:`Server` takes one at a time from it
and serves it with a :class:`Connection`, the same for both:

* :class:`Listener` -- the back end listens (``--socket-path`` or an inherited socket,
  ``--fd``) and accepts; other front ends wait in the listen backlog meanwhile;
* :class:`Connector` -- client mode (``--client``): the back end connects to a front end
  that listens (QEMU ``-chardev socket,server=on``), retrying with exponential backoff
  until the socket appears and accepts, and again after each disconnect. Failed
  attempts are logged at a limited rate.

Nothing here interprets messages: vhost.protocol decodes them and vhost.session
applies them. A malformed message or a socket error closes that connection (one log
line) and the server takes the next one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
import struct
import time
from typing import Any, Protocol

from vhost import protocol as p
from vhost.device import Device
from vhost.session import Session

log = logging.getLogger("vhost.server")

RECV_SIZE = 65536
_ANC_SIZE = socket.CMSG_SPACE(p.MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
#: sun_path is 108 bytes on Linux, the terminating NUL included
MAX_UNIX_PATH = 107


class SocketInUse(Exception):
    """The socket path is served by a live process, or is not a socket."""


class BadSocketPath(ValueError):
    """A socket path no connect() can ever use (the program's usage error)."""


#: the socket file's mode unless told otherwise (--socket-mode, --socket-group)
DEFAULT_SOCKET_MODE = 0o600


def check_listen_path(path: str) -> None:
    """Refuse, before anything is started, a path no bind() could use: empty, too long
    for sun_path, or in a directory that does not exist."""
    check_connect_path(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BadSocketPath(f"cannot listen on {path}: directory {parent} does not exist")


def listen_unix(
    path: str, mode: int = DEFAULT_SOCKET_MODE, gid: int | None = None
) -> socket.socket:
    """Listen on ``path``, the file with ``mode`` and, if ``gid`` is given, that group
    (so that a QEMU run as another user in the group can connect: libvirt's
    libvirt-qemu). A stale socket file is replaced; a live one is left alone and
    reported. The file never has more access than asked for, not even for a moment: it
    is bound with mode 0600 and opened up after its group is set."""
    check_listen_path(path)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketInUse(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            raise SocketInUse(f"{path} is in use: another process is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise SocketInUse(f"cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as e:
        sock.close()
        os.unlink(path)
        raise SocketInUse(f"cannot set the owner or mode of {path}: {e.strerror}") from None
    sock.listen(8)
    return sock


def socket_from_fd(fd: int) -> socket.socket:
    """An inherited listening unix stream socket (--fd N)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise SocketInUse(f"--fd {fd}: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SocketInUse(f"--fd {fd} is not a unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise SocketInUse(f"--fd {fd} is not a listening socket")
    os.set_inheritable(fd, False)
    return sock


def check_connect_path(path: str) -> None:
    """Refuse, at start-up, a path that no connect() could use (the retries are for a
    front end that is not there yet, not for a path that can never work)."""
    if not path:
        raise BadSocketPath("the socket path is empty")
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise BadSocketPath(
            f"{path} is too long for a unix socket ({len(os.fsencode(path))} bytes, "
            f"at most {MAX_UNIX_PATH})"
        )


# =========================================================================================
# Where connections come from
# =========================================================================================


class ConnectionSource(Protocol):
    """What a :class:`Server` takes its connections from."""

    async def next_connection(self) -> socket.socket:
        """The next connected socket (cancelled when the daemon stops)."""
        ...

    def connection_ended(self, messages: int) -> None:
        """The last connection ended after ``messages`` messages."""
        ...

    def close(self) -> None: ...


class Listener:
    """Server mode: accept on a listening unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)

    async def next_connection(self) -> socket.socket:
        conn, _ = await asyncio.get_running_loop().sock_accept(self.sock)
        return conn

    def connection_ended(self, messages: int) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


#: client mode: the first retry comes after this many seconds, each next one after
#: twice as long, up to RETRY_MAX_DELAY
RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 1.0
#: client mode: while connecting fails, at most one log line per this many seconds
#: (the first failure is always logged)
RETRY_LOG_INTERVAL = 10.0


class Connector:
    """Client mode: connect to a front end listening on ``path`` (QEMU with
    ``-chardev socket,server=on``).

    Each connection starts with an attempt at once (a restarted front end is often
    already listening); after a failed attempt the next one waits ``first_delay``,
    doubling up to ``max_delay``. A connection that ended before its first message
    (a peer that accepts and hangs up) does not reset the delay, so such a peer is not
    hammered. Every attempt fails the same way while QEMU is down: the first failure of
    an outage is logged, then at most one line per ``log_interval`` seconds with the
    count, and one line when connected."""

    def __init__(
        self,
        path: str,
        name: str,
        *,
        first_delay: float = RETRY_FIRST_DELAY,
        max_delay: float = RETRY_MAX_DELAY,
        log_interval: float = RETRY_LOG_INTERVAL,
    ) -> None:
        check_connect_path(path)
        self.path = path
        self.name = name
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.log_interval = log_interval
        #: connect() calls that failed, over the daemon's life
        self.failed_attempts = 0
        self._delay = 0.0  # before the next connection's first attempt

    def try_connect(self) -> socket.socket:
        """One non-blocking connect(); raises OSError when nothing accepts (no socket
        file, a stale one, a full backlog: EAGAIN)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        try:
            s.connect(self.path)
        except BaseException:
            s.close()
            raise
        return s

    async def next_connection(self) -> socket.socket:
        if self._delay:
            await asyncio.sleep(self._delay)
        started = time.monotonic()
        failed = 0
        logged_at, logged_failed = started, 0
        delay = self.first_delay
        while True:
            try:
                conn = self.try_connect()
            except OSError as e:
                failed += 1
                self.failed_attempts += 1
                now = time.monotonic()
                why = e.strerror or str(e)
                if failed == 1:
                    log.info(
                        "%s: client: cannot connect to %s: %s; retrying every %g s to %g s, "
                        "at most one line per %g s",
                        self.name,
                        self.path,
                        why,
                        self.first_delay,
                        self.max_delay,
                        self.log_interval,
                    )
                    logged_at, logged_failed = now, failed
                elif now - logged_at >= self.log_interval:
                    log.info(
                        "%s: client: still cannot connect to %s: %d attempts failed in "
                        "%.0f s (%d in all, for %.0f s): %s",
                        self.name,
                        self.path,
                        failed - logged_failed,
                        now - logged_at,
                        failed,
                        now - started,
                        why,
                    )
                    logged_at, logged_failed = now, failed
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            if failed:
                log.info(
                    "%s: client: connected to %s after %d failed attempts in %.1f s",
                    self.name,
                    self.path,
                    failed,
                    time.monotonic() - started,
                )
            else:
                log.info("%s: client: connected to %s", self.name, self.path)
            return conn

    def connection_ended(self, messages: int) -> None:
        # A peer that hung up before saying anything gets the next attempt later and
        # later; one that spoke is a front end that went away: try again at once.
        if messages:
            self._delay = 0.0
        else:
            self._delay = min(max(self._delay * 2, self.first_delay), self.max_delay)

    def close(self) -> None:
        pass


# =========================================================================================
# One connection
# =========================================================================================

#: recvmsg calls per readable callback (each stops at an fd boundary)
MAX_READS_PER_WAKEUP = 4096
#: seconds between the connection watcher's own looks at the socket
WATCH_INTERVAL = 0.5


def _recv(conn: socket.socket) -> tuple[bytes, list[int]]:
    data, anc, flags, _ = conn.recvmsg(RECV_SIZE, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise p.ProtocolError(f"more than {p.MAX_FDS_PER_MESSAGE} fds in one message")
    return data, fds


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED: as it was when it
    connected, or listened in client mode), or None where the kernel cannot say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return (pid, uid, gid) if pid > 0 else None


def peer_description(sock: socket.socket) -> str:
    """The front end for the log: ``pid 1234 (qemu-system-x86), uid 64055, gid 994``."""
    creds = peer_credentials(sock)
    if creds is None:
        return "peer unknown"
    pid, uid, gid = creds
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f" ({f.read().strip()})"
    except OSError:
        comm = ""
    return f"pid {pid}{comm}, uid {uid}, gid {gid}"


class Connection:
    """One front end's connection, however it was made: bytes and fds in, messages to a
    Session of its own, replies out. :meth:`run` serves it until the front end goes
    (or errs) or the daemon stops, then closes the session and the socket."""

    def __init__(self, sock: socket.socket, device: Device, name: str) -> None:
        self.sock = sock
        self.name = name
        self.session = Session(device, name)
        #: messages handled so far
        self.messages = 0
        self._reader = p.MessageReader()
        self._done: asyncio.Future[str] | None = None

    async def run(self, stop: asyncio.Future[Any]) -> str:
        """Serve until the connection ends or ``stop`` is done; returns why it ended."""
        loop = asyncio.get_running_loop()
        log.info("%s: front end connected: %s", self.name, peer_description(self.sock))
        self.sock.setblocking(False)
        self._done = loop.create_future()
        loop.add_reader(self.sock.fileno(), self._on_readable)
        watcher = asyncio.ensure_future(self._watch())
        try:
            await asyncio.wait([self._done, stop], return_when=asyncio.FIRST_COMPLETED)
            why = self._done.result() if self._done.done() else "daemon stopping"
        finally:
            watcher.cancel()
            loop.remove_reader(self.sock.fileno())
            self._reader.close()
            self.session.close()
            self.sock.close()
        log.info("%s: disconnected: %s", self.name, why)
        return why

    def _finish(self, why: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(why)

    def _ended(self) -> bool:
        return self._done is None or self._done.done()

    def _on_readable(self) -> None:
        # Read until the socket is empty: one recvmsg stops at each fd boundary, and
        # after an error event (a front end that died with replies unread resets the
        # connection) uvloop may not call us again for what is left, the reset included.
        # Bounded (a socket buffer's worth of small messages) so that a front end that
        # keeps writing cannot hold the loop; a live socket is polled again anyway.
        for _ in range(MAX_READS_PER_WAKEUP):
            if self._ended() or not self._read_once():
                return

    def _read_once(self) -> bool:
        """Take one recvmsg's worth; False when there is nothing more to read now."""
        try:
            data, fds = _recv(self.sock)
        except (BlockingIOError, InterruptedError):
            return False
        except p.ProtocolError as e:
            self._finish(f"malformed message: {e}")
            return False
        except OSError as e:
            self._finish(f"socket error: {e.strerror}")
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            self._finish("front end closed the connection")
            return False
        log.debug("%s: recv %d bytes, %d fds", self.name, len(data), len(fds))
        try:
            self._reader.feed(data, fds)
            while (msg := self._reader.next_message()) is not None:
                self.messages += 1
                reply = self.session.handle(msg)
                if reply is not None:
                    self._send(reply)
        except p.ProtocolError as e:
            self._finish(f"malformed message: {e}")
        except OSError as e:
            self._finish(f"socket error: {e.strerror}")
        except Exception as e:  # a bug must cost this connection, not the daemon
            log.exception("%s: internal error", self.name)
            self._finish(f"internal error: {e!r}")
        return True

    def _send(self, reply: p.Reply) -> None:
        data, reply_fds = p.encode_reply(reply), p.reply_fds(reply)
        if reply_fds:
            socket.send_fds(self.sock, [data], reply_fds)
        else:
            self.sock.sendall(data)

    async def _watch(self) -> None:
        """Safety net: on an error event (a front end that died with replies unread
        resets the connection) uvloop stops polling the fd without calling the
        reader, and the dead connection would hold the socket forever. Look at the
        socket ourselves now and then; the reader drains whatever is there."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        while not self._ended():
            await asyncio.sleep(WATCH_INTERVAL)
            if poller.poll(0):
                self._on_readable()


# =========================================================================================
# The server: one connection at a time from its source
# =========================================================================================


class Server:
    """Serves ``device`` to one front end at a time, taking connections from
    ``source`` (a :class:`Listener` or a :class:`Connector`; a listening socket is
    wrapped in a Listener) until :meth:`stop`."""

    def __init__(
        self, source: ConnectionSource | socket.socket, device: Device, name: str = "vhost-user"
    ) -> None:
        self.source: ConnectionSource = (
            Listener(source) if isinstance(source, socket.socket) else source
        )
        self.device = device
        self.name = name
        self.connections = 0
        self.session: Session | None = None
        self._stop: asyncio.Event | None = None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def close(self) -> None:
        """Release the source (a listening socket is closed; its file stays)."""
        self.source.close()

    async def serve_forever(self) -> None:
        self._stop = asyncio.Event()
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                get = asyncio.ensure_future(self.source.next_connection())
                await asyncio.wait([get, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    break
                self.connections += 1
                conn = Connection(get.result(), self.device, f"{self.name}#{self.connections}")
                self.session = conn.session
                try:
                    await conn.run(stop_wait)
                finally:
                    self.session = None
                self.source.connection_ended(conn.messages)
        finally:
            stop_wait.cancel()
