"""vhost-user protocol junk at the real vhost-user-blk: malformed messages (bad version,
sizes, fds) close the connection with one log line and leave nothing behind, unknown
requests are answered or ignored as their flags ask, messages split and coalesced
arbitrarily parse the same, and the socket serves the next front end.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time

import pytest

from tests.support.blk import (
    SECTOR_SIZE,
    BlkDriver,
    check_io_works,
    check_new_connection_works,
    connect_guest,
)
from tests.support.daemon import Daemon, StartDaemon
from tests.support.frontend import (
    BackEndClosed,
    FrontEnd,
    GuestRam,
    MiB,
)
from tests.support.wire import header
from vhost.protocol import (
    GetFeatures,
    GetQueueNum,
    Request,
    SetVringCall,
    U64Reply,
    Unknown,
    encode_message,
)

SECTOR = SECTOR_SIZE
shared = pytest.mark.shared_daemon  # see conftest: the module's daemon, not a fresh one


# =========================================================================================
# Protocol junk over the socket
# =========================================================================================


def _junk_cases() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, number of eventfds to attach, text the log line must have)"""
    sf, kick, gf = Request.SET_FEATURES, Request.SET_VRING_KICK, Request.GET_FEATURES
    return {
        "version-0": (header(gf, 0, 0), 0, "header version 0"),
        "version-2": (header(gf, 2, 0), 0, "header version 2"),
        "version-3": (header(gf, 3, 0), 0, "header version 3"),
        "reply-flag": (header(gf, 1 | 4, 0), 0, "request with the REPLY flag"),
        "size-over-4096": (header(gf, 1, 4097), 0, "exceeds the maximum 4096"),
        "size-huge": (header(sf, 1, 0xFFFFFFFF), 0, "exceeds the maximum 4096"),
        "short-payload": (header(sf, 1, 4) + bytes(4), 0, "payload size 4, expected 8"),
        "long-payload": (header(gf, 1, 8) + bytes(8), 0, "payload size 8, expected 0"),
        "kick-without-fd": (
            header(kick, 1, 8) + struct.pack("<Q", 0),
            0,
            "0 fds attached, expected 1",
        ),
        "extra-fds": (header(gf, 1, 0), 2, "2 fds attached, expected 0"),
        "kick-two-fds": (
            header(kick, 1, 8) + struct.pack("<Q", 0),
            2,
            "2 fds attached, expected 1",
        ),
        "too-many-fds": (header(gf, 1, 0), 9, "more than 8 fds"),
        "mem-table-zero-regions": (header(Request.SET_MEM_TABLE, 1, 8) + bytes(8), 0, "0 regions"),
    }


JUNK = _junk_cases()


def _raw_frontend(d: Daemon) -> FrontEnd:
    return FrontEnd(d.socket_path, GuestRam(1 * MiB)).connect()


def _close_raw(fe: FrontEnd) -> None:
    fe.close()
    fe.ram.close()


# On a connection with running queues too, for a few representative cases.
_RUNNING = {"version-2", "size-huge", "kick-without-fd", "extra-fds", "too-many-fds"}


@pytest.mark.parametrize(
    ("case", "after_setup"),
    [(c, False) for c in JUNK] + [(c, True) for c in sorted(_RUNNING)],
    ids=[f"{c}-fresh" for c in JUNK] + [f"{c}-running" for c in sorted(_RUNNING)],
)
def test_malformed_message_closes_connection(
    start_daemon: StartDaemon, case: str, after_setup: bool
) -> None:
    data, nfds, logged = JUNK[case]
    d = start_daemon()
    idle = d.resources()
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    # junk on a fresh connection, or on one with mapped memory and a running queue
    g = connect_guest(d) if after_setup else None
    fe = g.fe if g is not None else _raw_frontend(d)
    try:
        if g is not None:
            check_io_works(g, d)
        with contextlib.suppress(BackEndClosed):  # it may hang up before all is sent
            fe.raw_send(data, fds)
        assert fe.is_closed_by_peer(3.0)
    finally:
        if g is not None:
            g.close()
        else:
            _close_raw(fe)
        for fd in fds:
            os.close(fd)
    lines = d.wait_log("disconnected: malformed message")
    assert len(lines) == 1
    assert logged in lines[0], lines
    d.wait_disconnects(1)
    assert d.settled_resources(idle) == idle  # the attached fds were closed, memory unmapped
    check_new_connection_works(d)


def test_short_header_then_close(daemon: Daemon) -> None:
    idle = daemon.resources()
    fe = _raw_frontend(daemon)
    fe.raw_send(header(Request.GET_FEATURES, 1, 0)[:6])
    _close_raw(fe)
    daemon.wait_disconnects(1)
    assert "front end closed the connection" in daemon.wait_log("disconnected:", 2)[-1]
    assert daemon.settled_resources(idle) == idle
    # half a payload, with an fd, then close
    fe = _raw_frontend(daemon)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    fe.raw_send(header(Request.SET_FEATURES, 1, 8) + bytes(3), [efd])
    os.close(efd)
    _close_raw(fe)
    daemon.wait_disconnects(2)
    assert daemon.settled_resources(idle) == idle
    check_new_connection_works(daemon)
    assert "malformed" not in daemon.log_text()


@shared
@pytest.mark.parametrize("code", [99, int(Request.POSTCOPY_ADVISE), int(Request.SET_STATUS)])
def test_unknown_request_with_need_reply(daemon: Daemon, code: int) -> None:
    with connect_guest(daemon, queues=0) as g:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        reply = g.fe.request(Unknown(code, 0, b"\0" * 8, (efd,), need_reply=True))
        os.close(efd)
        assert isinstance(reply, U64Reply)
        assert reply.request == code and reply.value != 0
        daemon.wait_log("unsupported request")
        # the connection stays up and works
        assert not g.fe.is_closed_by_peer(0.1)
        assert g.fe.get_features() == g.fe.offered_features
        g.drivers.append(BlkDriver(g.fe.setup_queue(0, 128)))
        check_io_works(g, daemon)
    daemon.wait_disconnects(1)
    assert daemon.log_count("malformed") == 0


def test_unknown_request_without_need_reply(daemon: Daemon) -> None:
    idle = daemon.resources()
    with connect_guest(daemon, queues=0) as g:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        assert g.fe.request(Unknown(99, 0, b"junk", (efd,))) is None
        os.close(efd)
        assert not g.fe.is_closed_by_peer(0.2)
        assert g.fe.request(GetFeatures()) is not None  # the next reply is GET_FEATURES'
        g.drivers.append(BlkDriver(g.fe.setup_queue(0, 128)))
        check_io_works(g, daemon)
    daemon.wait_disconnects(1)
    assert daemon.settled_resources(idle) == idle
    assert daemon.log_count("malformed") == 0


@shared
def test_messages_split_and_coalesced(daemon: Daemon) -> None:
    """The stream is cut anywhere: messages a byte at a time, several in one send, and an
    fd sent with the header while the payload follows in a later send."""
    with connect_guest(daemon) as g:
        fe = g.fe
        get_features = encode_message(GetFeatures())[0]
        get_queue_num = encode_message(GetQueueNum())[0]
        for b in get_features:
            fe.raw_send(bytes([b]))
            time.sleep(0.001)
        r = fe.read_reply()
        assert isinstance(r, U64Reply) and r.value == fe.offered_features
        fe.raw_send(get_queue_num + get_features + get_queue_num)
        replies = [fe.read_reply() for _ in range(3)]
        assert [(x.request, x.value) for x in replies if isinstance(x, U64Reply)] == [
            (Request.GET_QUEUE_NUM, fe.queue_num),
            (Request.GET_FEATURES, fe.offered_features),
            (Request.GET_QUEUE_NUM, fe.queue_num),
        ]
        # a new call fd, its header (with the fd) and payload in two sends
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        msg, fds = encode_message(SetVringCall(0, call, need_reply=True))
        fe.raw_send(msg[:12], fds)
        time.sleep(0.01)
        fe.raw_send(msg[12:])
        ack = fe.read_reply()
        assert isinstance(ack, U64Reply) and ack.value == 0
        os.close(g.queue.call_fd)
        g.queue.call_fd = call
        check_io_works(g, daemon)  # completions are signalled on the new fd


@shared
def test_set_owner_alone_then_hangup(daemon: Daemon) -> None:
    """A front end that negotiates and leaves without ever setting a queue up."""
    for _ in range(3):
        fe = _raw_frontend(daemon)
        fe.negotiate()
        _close_raw(fe)
    daemon.wait_disconnects(3)
    check_new_connection_works(daemon)
