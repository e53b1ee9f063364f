"""asyncio (uvloop) server: listen on a unix socket, accept one front end at a
time, move bytes and fds between the socket and a Session.

Nothing here interprets messages: vhost.protocol decodes them and
vhost.session applies them. A malformed message or a socket error closes that
connection (one log line) and the server accepts the next front end; other
front ends wait in the listen backlog while one is connected.
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
from typing import Any

from vhost import protocol as p
from vhost.device import Device
from vhost.session import Session

log = logging.getLogger("vhost.server")

RECV_SIZE = 65536
_ANC_SIZE = socket.CMSG_SPACE(p.MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


class SocketInUse(Exception):
    """The socket path is served by a live process, or is not a socket."""


def listen_unix(path: str) -> socket.socket:
    """Listen on ``path`` (mode 0600). A stale socket file is replaced; a live one is
    left alone and reported."""
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
    os.chmod(path, 0o600)
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


class Server:
    def __init__(self, listener: socket.socket, device: Device, name: str = "vhost-user") -> None:
        self.listener = listener
        self.device = device
        self.name = name
        self.connections = 0
        self.session: Session | None = None
        self._stop: asyncio.Event | None = None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.listener.setblocking(False)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                accept = asyncio.ensure_future(loop.sock_accept(self.listener))
                await asyncio.wait([accept, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                if not accept.done():
                    accept.cancel()
                    break
                conn, _ = accept.result()
                self.connections += 1
                await self._serve_connection(conn, stop_wait)
        finally:
            stop_wait.cancel()

    async def _serve_connection(self, conn: socket.socket, stop_wait: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        name = f"{self.name}#{self.connections}"
        log.info("%s: front end connected", name)
        conn.setblocking(False)
        reader = p.MessageReader()
        session = self.session = Session(self.device, name)
        done: asyncio.Future[str] = loop.create_future()

        def finish(why: str) -> None:
            if not done.done():
                done.set_result(why)

        def on_readable() -> None:
            # Read until the socket is empty: one recvmsg stops at each fd boundary, and
            # after an error event (a front end that died with replies unread resets the
            # connection) uvloop may not call us again for what is left, the reset included.
            # Bounded (a socket buffer's worth of small messages) so that a front end that
            # keeps writing cannot hold the loop; a live socket is polled again anyway.
            for _ in range(MAX_READS_PER_WAKEUP):
                if done.done() or not read_once():
                    return

        def read_once() -> bool:
            """Take one recvmsg's worth; False when there is nothing more to read now."""
            try:
                data, fds = _recv(conn)
            except (BlockingIOError, InterruptedError):
                return False
            except p.ProtocolError as e:
                finish(f"malformed message: {e}")
                return False
            except OSError as e:
                finish(f"socket error: {e.strerror}")
                return False
            if not data:
                for fd in fds:
                    os.close(fd)
                finish("front end closed the connection")
                return False
            log.debug("%s: recv %d bytes, %d fds", name, len(data), len(fds))
            try:
                reader.feed(data, fds)
                while (msg := reader.next_message()) is not None:
                    reply = session.handle(msg)
                    if reply is not None:
                        data, reply_fds = p.encode_reply(reply), p.reply_fds(reply)
                        if reply_fds:
                            socket.send_fds(conn, [data], reply_fds)
                        else:
                            conn.sendall(data)
            except p.ProtocolError as e:
                finish(f"malformed message: {e}")
            except OSError as e:
                finish(f"socket error: {e.strerror}")
            except Exception as e:  # a bug must cost this connection, not the daemon
                log.exception("%s: internal error", name)
                finish(f"internal error: {e!r}")
            return True

        async def watch() -> None:
            """Safety net: on an error event (a front end that died with replies unread
            resets the connection) uvloop stops polling the fd without calling the
            reader, and the dead connection would hold the socket forever. Look at the
            socket ourselves now and then; the reader drains whatever is there."""
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            while not done.done():
                await asyncio.sleep(WATCH_INTERVAL)
                if poller.poll(0):
                    on_readable()

        loop.add_reader(conn.fileno(), on_readable)
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait([done, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            why = done.result() if done.done() else "daemon stopping"
        finally:
            watcher.cancel()
            loop.remove_reader(conn.fileno())
            reader.close()
            session.close()
            conn.close()
            self.session = None
        log.info("%s: disconnected: %s", name, why)
