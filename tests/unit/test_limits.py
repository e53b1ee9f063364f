"""Every bound in vhost/limits.py (the core) and in each device's limits module
(devices/blk/limits.py, devices/net/limits.py), tried at the bound (accepted, works) and
one past it (refused with the documented error, nothing allocated, the
reader/session/queue goes on).

One section per row of the tables in those modules' docstrings; ``ROWS`` below names the
tests of each row and :func:`test_every_row_of_the_table_has_tests` keeps the two in step.
The bounds come from the limits modules (never a literal); the C ones there are read from
the compiled modules, so their one definition stays in the headers. What needs the real
daemon (blk requests, a full ring, the net CLI at the bound, the socket's ancillary
buffer) is in tests/integration/test_limits_socket.py.

Everything here is in-process: the protocol reader fed bytes, a Session driven with typed
messages, the C ring walker and the net engine driven directly on GuestRam from
tests.support.frontend.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cffi
import pytest

import devices.blk
import devices.net
import vhost._native
from devices.blk import BlkDevice, BlkOptions
from devices.blk import limits as blk_limits
from devices.blk.limits import MAX_BLK_QUEUES
from devices.net import NetDevice, NetOptions, Switch
from devices.net import _net as net_c
from devices.net import limits as net_limits
from devices.net.limits import MAX_ENGINE_PAIRS, MAX_QUEUE_PAIRS
from tests.support.frontend import DESC_SIZE, GuestRam, MiB
from tests.support.net import ports_and_queues
from tests.support.rings import (
    ADJ_COUNT,
    ADJ_GPA,
    INDIRECT,
    NEXT,
    PIECE,
    WRITE,
    Ring,
    adjacent_regions,
)
from tests.support.wire import (
    MakeFd,
    decode_one,
    header,
    is_open,
    raw,
    region_bytes,
    reject,
)
from vhost import limits
from vhost import protocol as p
from vhost._native import ffi, lib
from vhost.cli import run
from vhost.limits import (
    MAX_BUFFERED_BYTES,
    MAX_CHAIN_IOV,
    MAX_CONFIG_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_SLOTS,
    MAX_PAYLOAD_SIZE,
    MAX_QUEUE_SIZE,
    MEM_TABLE_MAX_REGIONS,
)
from vhost.memory import GuestMemoryError
from vhost.ring_reference import ErrorCode as E
from vhost.session import Session

ROOT = Path(__file__).parents[2]
PAGE = os.sysconf("SC_PAGE_SIZE")
SOCKET_TESTS = "tests.integration.test_limits_socket"

# =========================================================================================
# The table itself
# =========================================================================================

#: row of the table (its first column) -> the tests that try it at and past the bound
#: ("module::name" for tests in the socket file)
ROWS: dict[str, list[str]] = {
    "MAX_PAYLOAD_SIZE (message body)": [
        "test_payload_of_max_payload_size_frames",
        "test_payload_one_byte_longer_is_refused_from_the_header",
        f"{SOCKET_TESTS}::test_payload_size_on_the_socket",
    ],
    "MAX_BUFFERED_BYTES": [
        "test_largest_valid_backlog_is_buffered",
        "test_bytes_without_a_message_are_refused_one_past_the_bound",
    ],
    "MAX_FDS_PER_MESSAGE": [
        "test_max_fds_with_one_message_are_accepted",
        "test_one_fd_more_is_refused_and_all_are_closed",
        f"{SOCKET_TESTS}::test_fds_per_message_on_the_socket",
    ],
    "MAX_CONFIG_SIZE": [
        "test_config_of_max_config_size",
        "test_config_of_max_config_size_in_the_session",
        "test_config_one_byte_larger_is_refused",
    ],
    "MEM_TABLE_MAX_REGIONS": [
        "test_mem_table_of_max_regions_is_mapped",
        "test_mem_table_with_one_region_more_is_refused",
    ],
    "MAX_MEM_SLOTS (regions mapped)": [
        "test_mem_slots_fill_up_and_one_more_fails",
        "tests.integration.test_mem_slots::test_slots_fill_up_and_empty_under_io",
    ],
    "MAX_QUEUE_SIZE (ring entries)": [
        "test_queue_size_in_the_session",
        "test_queue_size_in_the_ring_walker",
    ],
    "chain length": [
        "test_direct_chain_of_queue_size_descriptors",
        "test_indirect_chain_of_queue_size_descriptors",
        "test_direct_prefix_and_indirect_table_add_up_to_queue_size",
    ],
    "indirect table entries": ["test_indirect_table_of_queue_size_entries"],
    "requests in flight per queue": [
        "test_a_full_ring_is_taken_and_one_more_breaks_it",
        "test_inflight_region_for_the_largest_queue",
        f"{SOCKET_TESTS}::test_a_full_ring_of_requests_completes",
    ],
    "MAX_CHAIN_IOV": ["test_chain_iovecs"],
    "MAX_READ_BYTES (Chain.read)": ["tests.unit.test_chains::test_read_without_a_size_is_bounded"],
    "MAX_LOG_BYTES (dirty log mapped)": [
        "tests.unit.test_dirtylog::test_bad_logs_are_refused",
        "tests.unit.test_dirtylog::test_largest_log_is_accepted",
    ],
    "MAX_BLK_QUEUES": [
        "test_blk_queues_in_the_device_and_session",
        "test_blk_cli_refuses_one_queue_more",
        f"{SOCKET_TESTS}::test_blk_daemon_serves_max_blk_queues",
    ],
    "MAX_REQUEST_BYTES (blk data)": [f"{SOCKET_TESTS}::test_request_bytes"],
    "MAX_DISCARD_SEG / _WRITE_ZEROES": [f"{SOCKET_TESTS}::test_segments_per_request"],
    "MAX_DISCARD_SECTORS / _WZ": [f"{SOCKET_TESTS}::test_sectors_per_segment"],
    "MAX_QUEUE_PAIRS": ["test_net_queue_pairs_in_the_device"],
    "MAX_ENGINE_PAIRS (net)": [
        "test_net_cli_refuses_one_engine_pair_more",
        f"{SOCKET_TESTS}::test_switch_serves_max_engine_pairs",
    ],
    "MAC table NET_MAC_BUCKETS x NET_MAC_WAYS": [
        "test_mac_table_bucket_holds_its_ways_and_replaces_the_oldest"
    ],
    "NET_RX_BUDGET": ["test_rx_budget_frames_per_pass"],
    # not a row: the paragraph under the table
    "a stop waits for at most one request": [
        "test_a_stop_waits_for_one_request",
        "test_a_stop_waits_for_one_request_while_resubmitting",
    ],
}


#: the modules whose docstring tables name the bounds, core first
LIMIT_MODULES = (limits, blk_limits, net_limits)


def table_rows(module: Any = None) -> list[tuple[str, str, str]]:
    """(bound, value, where) for each row of the table in the docstring of ``module``
    (every limits module, in order, when None)."""
    if module is None:
        return [row for m in LIMIT_MODULES for row in table_rows(m)]
    doc = module.__doc__ or ""
    rules = [i for i, line in enumerate(doc.splitlines()) if re.fullmatch(r"[= ]+", line)]
    assert len(rules) == 3, f"the table in {module.__name__} lost its shape"
    rows = []
    for line in doc.splitlines()[rules[1] + 1 : rules[2]]:
        bound, value, where = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        rows.append((bound, value, where))
    return rows


def test_every_row_of_the_table_has_tests() -> None:
    rows = [bound for bound, _value, _where in table_rows()]
    assert rows == [r for r in ROWS if not r.startswith("a stop")]
    for names in ROWS.values():
        for name in names:
            module, _, func = name.rpartition("::")
            where = importlib.import_module(module) if module else globals()
            assert callable(getattr(where, func, None) if module else where.get(func)), name


def test_every_bound_in_a_table_is_a_constant_of_its_module() -> None:
    missing = []
    for module in LIMIT_MODULES:
        for bound, _value, _where in table_rows(module):
            names = re.findall(r"\b[A-Z][A-Z_]{3,}\b", bound)
            if names and not all(hasattr(module, name) for name in names):
                missing.append(bound)
            if not names and not _derived(bound):  # a row that names no constant at all
                missing.append(bound)
    assert missing == []


def test_the_core_table_names_no_device() -> None:
    """Device bounds live with their device (the core knows none)."""
    for bound, _value, where in table_rows(limits):
        assert not re.search(r"blk|net|disk|discard|switch|tap", f"{bound} {where}", re.I), bound


def _derived(bound: str) -> bool:
    """Rows under MAX_QUEUE_SIZE: their value is the queue size, no constant of their own."""
    return bound in ("chain length", "indirect table entries", "requests in flight per queue")


def test_table_values_are_the_constants() -> None:
    values = {bound.split()[0]: value for bound, value, _where in table_rows()}
    assert values["MAX_PAYLOAD_SIZE"] == f"{MAX_PAYLOAD_SIZE} B"
    assert values["MAX_BUFFERED_BYTES"] == f"{MAX_BUFFERED_BYTES} B"
    assert values["MAX_FDS_PER_MESSAGE"] == str(MAX_FDS_PER_MESSAGE)
    assert values["MAX_CONFIG_SIZE"] == f"{MAX_CONFIG_SIZE} B"
    assert values["MEM_TABLE_MAX_REGIONS"] == str(MEM_TABLE_MAX_REGIONS)
    assert values["MAX_MEM_SLOTS"] == str(MAX_MEM_SLOTS)
    assert values["MAX_QUEUE_SIZE"] == str(MAX_QUEUE_SIZE)
    assert values["MAX_CHAIN_IOV"] == str(MAX_CHAIN_IOV)
    assert values["MAX_READ_BYTES"] == f"{limits.MAX_READ_BYTES // MiB} MiB"
    assert values["MAX_LOG_BYTES"] == f"{limits.MAX_LOG_BYTES // (1024 * MiB)} GiB"
    assert values["MAX_BLK_QUEUES"] == str(MAX_BLK_QUEUES)
    assert values["MAX_REQUEST_BYTES"] == f"{blk_limits.MAX_REQUEST_BYTES // MiB} MiB"
    assert values["MAX_DISCARD_SEG"] == str(blk_limits.MAX_DISCARD_SEG)
    assert blk_limits.MAX_WRITE_ZEROES_SEG == blk_limits.MAX_DISCARD_SEG
    assert values["MAX_DISCARD_SECTORS"] == "2^22 - 1"
    assert blk_limits.MAX_DISCARD_SECTORS == 2**22 - 1
    assert blk_limits.MAX_WRITE_ZEROES_SECTORS == blk_limits.MAX_DISCARD_SECTORS
    assert values["MAX_QUEUE_PAIRS"] == str(MAX_QUEUE_PAIRS)
    assert values["MAX_ENGINE_PAIRS"] == str(MAX_ENGINE_PAIRS)
    assert values["MAC"] == f"{net_limits.NET_MAC_BUCKETS} x {net_limits.NET_MAC_WAYS}"
    assert values["NET_RX_BUDGET"] == str(net_limits.NET_RX_BUDGET)


# =========================================================================================
# Helpers
# =========================================================================================


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_maps(name: str) -> int:
    """Mappings of memfds called ``name`` in this process."""
    with open("/proc/self/maps") as f:
        return sum(
            f"/memfd:{name} " in line or line.rstrip().endswith(f"/memfd:{name}") for line in f
        )


def ack(reply: p.Reply | None) -> int:
    """The REPLY_ACK value of a need_reply message (0: success)."""
    assert isinstance(reply, p.U64Reply), reply
    return int(reply.value)


@pytest.fixture
def blk_session(tmp_path: Path) -> Iterator[Session]:
    """A Session on a BlkDevice (1 MiB sparse image), driven with typed messages."""
    dev = BlkDevice(BlkOptions(str(tmp_path / "disk.img"), size=MiB))
    s = Session(dev, "limits")
    yield s
    s.close()
    dev.close()


# =========================================================================================
# MAX_PAYLOAD_SIZE, MAX_BUFFERED_BYTES: message framing
# =========================================================================================

UNKNOWN = 999  # a request code nobody implements: any payload and fds frame as Unknown


def test_payload_of_max_payload_size_frames() -> None:
    body = bytes(range(256)) * (MAX_PAYLOAD_SIZE // 256) + bytes(MAX_PAYLOAD_SIZE % 256)
    msg = decode_one(raw(UNKNOWN, body))
    assert isinstance(msg, p.Unknown) and msg.payload == body
    assert len(msg.payload) == MAX_PAYLOAD_SIZE
    # and the front end's encoder produces it
    data, _ = p.encode_message(p.Unknown(UNKNOWN, p.VERSION, body, ()))
    assert data == raw(UNKNOWN, body)


def test_payload_one_byte_longer_is_refused_from_the_header(make_fd: MakeFd) -> None:
    """Refused as soon as the 12 header bytes are in: the payload is never waited for."""
    fd = make_fd()
    reader = p.MessageReader()
    reader.feed(header(UNKNOWN, p.VERSION, MAX_PAYLOAD_SIZE + 1), [fd])
    with pytest.raises(
        p.ProtocolError,
        match=f"payload size {MAX_PAYLOAD_SIZE + 1} exceeds the maximum {MAX_PAYLOAD_SIZE}",
    ):
        reader.next_message()
    assert not is_open(fd)


def test_largest_valid_backlog_is_buffered() -> None:
    """A message of the largest size and all but the last bytes of another: exactly
    MAX_BUFFERED_BYTES held, and both decode."""
    one = raw(UNKNOWN, bytes(MAX_PAYLOAD_SIZE))
    two = raw(UNKNOWN + 1, b"\x01" * MAX_PAYLOAD_SIZE)
    assert len(one) + len(two) - 12 == MAX_BUFFERED_BYTES
    reader = p.MessageReader()
    reader.feed(one + two[:-12])
    first = reader.next_message()
    assert isinstance(first, p.Unknown) and first.request == UNKNOWN
    assert reader.next_message() is None
    reader.feed(two[-12:])
    second = reader.next_message()
    assert isinstance(second, p.Unknown) and second.payload == b"\x01" * MAX_PAYLOAD_SIZE


def test_bytes_without_a_message_are_refused_one_past_the_bound(make_fd: MakeFd) -> None:
    """A header whose message can never complete: MAX_BUFFERED_BYTES of it are held (the
    reader only judges a header when asked), one byte more is refused in feed itself."""
    fd = make_fd()
    reader = p.MessageReader()
    start = header(UNKNOWN, p.VERSION, 0xFFFF_FFFF)
    reader.feed(start, [fd])
    reader.feed(bytes(MAX_BUFFERED_BYTES - len(start)))
    assert is_open(fd)
    with pytest.raises(p.ProtocolError):
        reader.feed(b"\0")
    assert not is_open(fd)
    with pytest.raises(p.ProtocolError, match="unusable"):
        reader.next_message()


# =========================================================================================
# MAX_FDS_PER_MESSAGE, MEM_TABLE_MAX_REGIONS, MAX_CONFIG_SIZE: message contents
# =========================================================================================


def mem_table(ram: GuestRam) -> bytes:
    regions = ram.regions()
    return raw(
        p.Request.SET_MEM_TABLE,
        struct.pack("<II", len(regions), 0) + b"".join(region_bytes(r) for r in regions),
        p.VERSION | p.FLAG_NEED_REPLY,
    )


def test_max_fds_with_one_message_are_accepted() -> None:
    assert MEM_TABLE_MAX_REGIONS <= MAX_FDS_PER_MESSAGE  # the largest message that takes fds
    with GuestRam(MAX_FDS_PER_MESSAGE * 16 * PAGE, MAX_FDS_PER_MESSAGE) as ram:
        fds = [os.dup(ram.fd) for _ in range(MAX_FDS_PER_MESSAGE)]
        msg = decode_one(mem_table(ram), fds)
        assert isinstance(msg, p.SetMemTable) and msg.fds == tuple(fds)
        assert all(is_open(fd) for fd in fds)  # handed out: the caller's now
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("how", ["at once", "in two chunks"])
def test_one_fd_more_is_refused_and_all_are_closed(make_fd: MakeFd, how: str) -> None:
    baseline = open_fds()
    fds = [make_fd() for _ in range(MAX_FDS_PER_MESSAGE + 1)]
    data = raw(UNKNOWN, bytes(64))  # Unknown takes any number of fds
    reader = p.MessageReader()
    with pytest.raises(p.ProtocolError, match=f"{MAX_FDS_PER_MESSAGE + 1} fds"):
        if how == "at once":
            reader.feed(data, fds)
        else:
            reader.feed(data[:20], fds[:-1])
            reader.feed(data[20:40], fds[-1:])
        reader.next_message()
    assert not any(is_open(fd) for fd in fds)
    assert open_fds() == baseline


def test_mem_table_of_max_regions_is_mapped(blk_session: Session) -> None:
    name = "limits-table"
    with GuestRam(MEM_TABLE_MAX_REGIONS * 16 * PAGE, MEM_TABLE_MAX_REGIONS, name=name) as ram:
        mapped = memfd_maps(name)
        fds = [os.dup(ram.fd) for _ in range(MEM_TABLE_MAX_REGIONS)]
        msg = decode_one(mem_table(ram), fds)
        assert ack(blk_session.handle(msg)) == 0
        assert len(blk_session.memory.regions) == MEM_TABLE_MAX_REGIONS
        assert memfd_maps(name) == mapped + MEM_TABLE_MAX_REGIONS
        assert not any(is_open(fd) for fd in fds)  # mapped, so closed
        last = ram.layout[-1]
        ram.write(last.end - 4, b"\xde\xad\xbe\xef")
        assert blk_session.memory.read(last.end - 4, 4) == b"\xde\xad\xbe\xef"


def test_mem_table_with_one_region_more_is_refused(make_fd: MakeFd) -> None:
    n = MEM_TABLE_MAX_REGIONS + 1
    region = p.MemoryRegion(0, PAGE, 0x7F00_0000_0000, 0)
    payload = struct.pack("<II", n, 0) + region_bytes(region) * n
    fds = [make_fd() for _ in range(min(n, MAX_FDS_PER_MESSAGE))]
    reject(
        raw(p.Request.SET_MEM_TABLE, payload),
        fds,
        match=rf"{n} regions, expected 1\.\.{MEM_TABLE_MAX_REGIONS}",
    )
    with pytest.raises(ValueError):  # and the front end's encoder will not make one
        p.encode_message(p.SetMemTable((region,) * n, (0,) * n))


@pytest.mark.parametrize("kind", [p.GetConfig, p.SetConfig])
def test_config_of_max_config_size(kind: type[p.GetConfig | p.SetConfig]) -> None:
    data = bytes(range(256)) * (MAX_CONFIG_SIZE // 256) + bytes(MAX_CONFIG_SIZE % 256)
    msg = kind(0, MAX_CONFIG_SIZE, 0, data)
    assert decode_one(p.encode_message(msg)[0]) == msg


def test_config_of_max_config_size_in_the_session(blk_session: Session) -> None:
    reply = blk_session.handle(p.GetConfig(0, MAX_CONFIG_SIZE, 0, bytes(MAX_CONFIG_SIZE)))
    assert isinstance(reply, p.ConfigReply) and reply.size == MAX_CONFIG_SIZE
    assert len(reply.data) == MAX_CONFIG_SIZE
    assert p.encode_reply(reply)  # and it can be sent


@pytest.mark.parametrize("code", [p.Request.GET_CONFIG, p.Request.SET_CONFIG])
def test_config_one_byte_larger_is_refused(code: p.Request) -> None:
    size = MAX_CONFIG_SIZE + 1
    reject(
        raw(code, struct.pack("<III", 0, size, 0) + bytes(size)),
        match=f"config size {size} exceeds the maximum {MAX_CONFIG_SIZE}",
    )
    with pytest.raises(ValueError):
        p.encode_message(p.GetConfig(0, size, 0, bytes(size)))


# =========================================================================================
# MAX_MEM_SLOTS: regions mapped by ADD_MEM_REG
# =========================================================================================


def test_mem_slots_fill_up_and_one_more_fails(blk_session: Session) -> None:
    assert MAX_MEM_SLOTS >= 256  # QEMU 7.2's x86 limit (one slot per hot-plugged DIMM)
    name = "limits-slots"
    assert blk_session.handle(p.GetMaxMemSlots()) == p.U64Reply(
        p.Request.GET_MAX_MEM_SLOTS, MAX_MEM_SLOTS
    )
    memfd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, (MAX_MEM_SLOTS + 1) * PAGE)
        # one page each, with a page of hole between them (no two are gpa-adjacent)
        regions = [
            p.MemoryRegion(
                guest_phys_addr=(1 << 32) + 2 * k * PAGE,
                memory_size=PAGE,
                userspace_addr=0x7E00_0000_0000 + k * PAGE,
                mmap_offset=k * PAGE,
            )
            for k in range(MAX_MEM_SLOTS + 1)
        ]

        def add(region: p.MemoryRegion) -> tuple[int, int]:
            fd = os.dup(memfd)
            result = ack(blk_session.handle(p.AddMemReg(region, fd, need_reply=True)))
            assert not is_open(fd)  # mapped or refused: closed either way
            return result, fd

        for r in regions[:-1]:
            assert add(r)[0] == 0
        assert memfd_maps(name) == MAX_MEM_SLOTS
        assert len(blk_session.memory.regions) == MAX_MEM_SLOTS
        fds = open_fds()

        assert add(regions[-1])[0] == 1  # one past: a failure ack
        assert memfd_maps(name) == MAX_MEM_SLOTS  # nothing more mapped
        assert len(blk_session.memory.regions) == MAX_MEM_SLOTS
        assert open_fds() == fds
        with pytest.raises(GuestMemoryError, match="not in guest memory"):
            blk_session.memory.translate_gpa(regions[-1].guest_phys_addr, 1)

        # the session goes on: free a slot and the same region fits
        assert ack(blk_session.handle(p.RemMemReg(regions[0], None, need_reply=True))) == 0
        assert add(regions[-1])[0] == 0
        assert memfd_maps(name) == MAX_MEM_SLOTS
        blk_session.memory.translate_gpa(regions[-1].guest_phys_addr, PAGE)
    finally:
        os.close(memfd)
    blk_session.close()
    assert memfd_maps(name) == 0


# =========================================================================================
# MAX_QUEUE_SIZE, and what is bounded by the queue size
# =========================================================================================


def test_queue_size_in_the_session(blk_session: Session) -> None:
    def set_num(num: int) -> int:
        return ack(blk_session.handle(p.SetVringNum(0, num, need_reply=True)))

    assert set_num(MAX_QUEUE_SIZE) == 0
    assert blk_session.queues[0].num == MAX_QUEUE_SIZE
    assert set_num(MAX_QUEUE_SIZE * 2) == 1  # the next power of 2
    assert set_num(MAX_QUEUE_SIZE + 1) == 1
    assert blk_session.queues[0].num == MAX_QUEUE_SIZE  # a refused size changes nothing
    assert set_num(MAX_QUEUE_SIZE // 2) == 0  # and the session goes on


def test_queue_size_in_the_ring_walker(make: Callable[..., Ring]) -> None:
    ring = make(num=MAX_QUEUE_SIZE)  # vu_vq_setup accepted it
    assert ring.vq.num == MAX_QUEUE_SIZE
    assert ring.setup(num=MAX_QUEUE_SIZE * 2) == -15  # VU_ERR_QUEUE_SIZE
    assert ring.setup(num=MAX_QUEUE_SIZE + 1) == -15
    assert ring.vq.num == MAX_QUEUE_SIZE  # a refused setup leaves the queue as it was
    assert lib.VU_MAX_QUEUE_SIZE == MAX_QUEUE_SIZE


def test_inflight_region_for_the_largest_queue(blk_session: Session) -> None:
    """The inflight region is sized by the queue size: GET_INFLIGHT_FD for the largest
    queue gets one; for a queue twice that size, none (mmap_size 0, no fd)."""
    s = blk_session
    assert s.handle(p.SetFeatures(s.offered_features)) is None
    assert s.handle(p.SetProtocolFeatures(s.offered_protocol_features)) is None
    fds = open_fds()
    reply = s.handle(p.GetInflightFd(1, MAX_QUEUE_SIZE))
    assert isinstance(reply, p.InflightReply) and reply.fd is not None
    assert reply.mmap_size == lib.vu_inflight_queue_size(MAX_QUEUE_SIZE)
    assert os.fstat(reply.fd).st_size == reply.mmap_size
    for bad in (MAX_QUEUE_SIZE * 2, MAX_QUEUE_SIZE + 1):
        refused = s.handle(p.GetInflightFd(1, bad))
        assert refused == p.InflightReply(p.Request.GET_INFLIGHT_FD, 0, 0, 0, 0)
        assert refused.fd is None
    assert open_fds() == fds + 1  # only the region offered for the good size


def test_a_full_ring_is_taken_and_one_more_breaks_it(make: Callable[..., Ring]) -> None:
    """A ring of MAX_QUEUE_SIZE holds that many requests in flight; a driver claiming one
    more than the ring holds breaks the queue (VU_ERR_AVAIL_IDX), nothing is taken."""
    ring = make(num=MAX_QUEUE_SIZE)
    b = ring.buf(16)
    heads = [ring.q.add_chain([(b, 16, True)]) for _ in range(MAX_QUEUE_SIZE)]
    ring.q.publish()
    assert lib.vu_vq_avail_count(ring.vq) == MAX_QUEUE_SIZE
    for head in heads:
        ring.pop_ok()
        assert ring.chain.head == head

    past = make(num=MAX_QUEUE_SIZE)
    past.q.set_avail_idx(MAX_QUEUE_SIZE + 1)
    assert lib.vu_vq_avail_count(past.vq) == E.AVAIL_IDX
    assert past.vq.broken == 1 and past.vq.err.code == E.AVAIL_IDX
    assert past.vq.last_avail_idx == 0


@pytest.mark.parametrize("num", [8, MAX_QUEUE_SIZE])
def test_direct_chain_of_queue_size_descriptors(make: Callable[..., Ring], num: int) -> None:
    """num descriptors chained: accepted. A direct chain cannot name num + 1 different
    descriptors, so one more is a revisit: the loop bound ends it (VU_ERR_LOOP)."""
    ring = make(num=num)
    a = ring.buf(16)
    ring.descs({i: (a, 16, NEXT, i + 1) for i in range(num - 1)} | {num - 1: (a, 16, 0, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 16)] * num, [])
    ring.descs({num - 1: (a, 16, NEXT, 0)})  # the last one goes on: a loop of num
    ring.offer(0)
    ring.refused(E.LOOP, head=0, detail=0)
    ring.descs({num - 1: (a, 16, 0, 0)})  # the queue goes on
    ring.offer(0)
    assert ring.pop_ok()[0] == [(a, 16)] * num


def chained_table(ring: Ring, n: int, a: int) -> int:
    """An indirect table of n entries, all one chain of 16-byte readable buffers at a."""
    return ring.table([(a, 16, NEXT, k + 1) for k in range(n - 1)] + [(a, 16, 0, 0)])


@pytest.mark.parametrize("num", [8, MAX_QUEUE_SIZE])
def test_indirect_chain_of_queue_size_descriptors(make: Callable[..., Ring], num: int) -> None:
    ring = make(num=num)
    a = ring.buf(16)
    ring.descs({0: (chained_table(ring, num, a), num * DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([(a, 16)] * num, [])
    longer = chained_table(ring, num + 1, a)
    ring.descs({1: (longer, (num + 1) * DESC_SIZE, INDIRECT, 0)})
    ring.offer(1)
    ring.refused(E.CHAIN_TOO_LONG, head=1, detail=(num + 1) * DESC_SIZE)
    ring.offer(0)  # the queue goes on
    assert ring.pop_ok()[0] == [(a, 16)] * num


@pytest.mark.parametrize("num", [8, MAX_QUEUE_SIZE])
@pytest.mark.parametrize("prefix", [1, 5])
def test_direct_prefix_and_indirect_table_add_up_to_queue_size(
    make: Callable[..., Ring], num: int, prefix: int
) -> None:
    """prefix direct buffers + a table of num - prefix: num buffers, accepted; a table one
    entry longer (still no longer than the queue) makes num + 1 buffers: CHAIN_TOO_LONG."""
    ring = make(num=num)
    a = ring.buf(16)
    for entries, ok in ((num - prefix, True), (num - prefix + 1, False)):
        table = chained_table(ring, entries, a)
        ring.descs(
            {i: (a, 16, NEXT, i + 1) for i in range(prefix)}
            | {prefix: (table, entries * DESC_SIZE, INDIRECT, 0)}
        )
        ring.offer(0)
        if ok:
            assert ring.pop_ok() == ([(a, 16)] * num, [])
        else:
            ring.refused(E.CHAIN_TOO_LONG, head=0, detail=num + 1)


@pytest.mark.parametrize("num", [8, MAX_QUEUE_SIZE])
def test_indirect_table_of_queue_size_entries(make: Callable[..., Ring], num: int) -> None:
    """The table's length is bounded on its own, before any entry is read: num entries
    of which only the first is used are fine, num + 1 are refused."""
    ring = make(num=num)
    a = ring.buf(16)
    for entries, head in ((num, 0), (num + 1, 1)):
        table = ring.table([(a, 16, WRITE, 0)] + [(0, 0, 0, 0)] * (entries - 1))
        ring.descs({head: (table, entries * DESC_SIZE, INDIRECT, 0)})
    ring.offer(0)
    assert ring.pop_ok() == ([], [(a, 16)])
    ring.offer(1)
    ring.refused(E.CHAIN_TOO_LONG, head=1, detail=(num + 1) * DESC_SIZE)


# =========================================================================================
# MAX_CHAIN_IOV: iovecs per chain (a descriptor over gpa-adjacent regions needs several)
# =========================================================================================


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_chain_iovecs(make: Callable[..., Ring], indirect: bool) -> None:
    """ADJ_COUNT tiny gpa-adjacent regions: a descriptor over all of them is ADJ_COUNT
    iovecs. Enough of those plus one shorter descriptor make exactly MAX_CHAIN_IOV; the
    last descriptor one region longer makes MAX_CHAIN_IOV + 1: TOO_MANY_IOV."""
    full, rest = divmod(MAX_CHAIN_IOV, ADJ_COUNT)
    assert rest + 1 <= ADJ_COUNT and full + 1 <= 128
    ring = make(num=128, regions=1, extra=adjacent_regions())
    span = ADJ_COUNT * PIECE

    def offer(last_pieces: int, head: int) -> None:
        entries = [(ADJ_GPA, span, WRITE | NEXT, k + 1) for k in range(full)] + [
            (ADJ_GPA, last_pieces * PIECE, WRITE, 0)
        ]
        if indirect:
            table = ring.table(entries)
            ring.descs({head: (table, len(entries) * DESC_SIZE, INDIRECT, 0)})
        else:
            ring.descs({i: e for i, e in enumerate(entries)})
            head = 0
        ring.offer(head)

    offer(rest, 100)
    _, writable = ring.pop_ok()
    assert len(writable) == ring.chain.n_in == MAX_CHAIN_IOV
    assert ring.chain.in_bytes == full * span + rest * PIECE

    offer(rest + 1, 101)
    ring.refused(E.TOO_MANY_IOV, head=101 if indirect else 0, detail=ADJ_GPA)

    offer(rest, 102)  # the queue goes on
    assert ring.pop_ok()[1] == writable


# =========================================================================================
# A stop waits for at most one request
# =========================================================================================

_ABI = cffi.FFI()
_ABI.cdef("""
typedef uint32_t (*vu_chain_handler)(void *ctx, void *vq, void *chain);
int vu_vq_process(void *vq, vu_chain_handler handler, void *ctx);
""")


@pytest.mark.parametrize("stop_at", [1, 3])
def test_a_stop_waits_for_one_request(make: Callable[..., Ring], stop_at: int) -> None:
    """A stop requested while the worker handles a chain (here: from inside the handler,
    deterministic) lets that chain finish and takes no further one; the rest stay in the
    avail ring for whoever serves the queue next."""
    ring = make(num=8)
    b = ring.buf(16)
    heads = [ring.q.add_chain([(b, 16, True)]) for _ in range(6)]
    ring.q.publish()
    abi = _ABI.dlopen(vhost._native.__file__)
    handled: list[int] = []

    def handle(_ctx: Any, _vq: Any, chain: Any) -> int:
        c = ffi.cast("struct vu_chain *", int(_ABI.cast("uintptr_t", chain)))
        handled.append(int(c.head))
        if len(handled) == stop_at:
            lib.vu_vq_request_stop(ring.vq)
        return 0

    handler = _ABI.callback("vu_chain_handler", handle)
    vq = _ABI.cast("void *", int(ffi.cast("uintptr_t", ring.vq)))
    assert abi.vu_vq_process(vq, handler, _ABI.NULL) == stop_at
    assert handled == heads[:stop_at]
    assert ring.vq.last_avail_idx == stop_at
    assert [h for h, _ in ring.q.get_used()] == heads[:stop_at]
    assert lib.vu_vq_avail_count(ring.vq) == len(heads) - stop_at


def test_a_stop_waits_for_one_request_while_resubmitting(make: Callable[..., Ring]) -> None:
    """The same bound when the queue starts by running again what the inflight region
    says was in flight: a stop requested during the first of them ends the pass there."""
    ring = make(num=8)
    b = ring.buf(16)
    old = [ring.q.add_chain([(b, 16, True)]) for _ in range(4)]  # in flight at the crash
    new = ring.q.add_chain([(b, 16, True)])
    ring.q.publish()
    size = int(lib.vu_inflight_queue_size(ring.num))
    raw_region = ffi.new("char[]", size)
    region = ffi.cast("struct vu_inflight_split *", raw_region)
    region.version = lib.VU_INFLIGHT_VERSION
    region.desc_num = ring.num
    for counter, head in enumerate(old, 1):
        region.desc[head].inflight = 1
        region.desc[head].counter = counter
    assert lib.vu_vq_set_inflight(ring.vq, raw_region, size) == len(old)
    abi = _ABI.dlopen(vhost._native.__file__)
    handled: list[int] = []

    def handle(_ctx: Any, _vq: Any, chain: Any) -> int:
        c = ffi.cast("struct vu_chain *", int(_ABI.cast("uintptr_t", chain)))
        handled.append(int(c.head))
        if len(handled) == 1:
            lib.vu_vq_request_stop(ring.vq)
        return 0

    handler = _ABI.callback("vu_chain_handler", handle)
    vq = _ABI.cast("void *", int(ffi.cast("uintptr_t", ring.vq)))
    abi.vu_vq_process(vq, handler, _ABI.NULL)
    assert new not in handled
    assert handled == old[:1]


# =========================================================================================
# MAX_BLK_QUEUES
# =========================================================================================


def test_blk_queues_in_the_device_and_session(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    dev = BlkDevice(BlkOptions(str(image), size=MiB, num_queues=MAX_BLK_QUEUES))
    s = Session(dev, "queues")
    try:
        assert s.handle(p.GetQueueNum()) == p.U64Reply(p.Request.GET_QUEUE_NUM, MAX_BLK_QUEUES)
        cfg = dev.get_config(0, 60)
        assert struct.unpack_from("<H", cfg, 34)[0] == MAX_BLK_QUEUES  # num_queues
        assert ack(s.handle(p.SetVringNum(MAX_BLK_QUEUES - 1, 128, need_reply=True))) == 0
        assert ack(s.handle(p.SetVringNum(MAX_BLK_QUEUES, 128, need_reply=True))) == 1
    finally:
        s.close()
        dev.close()
    image.unlink()
    with pytest.raises(
        ValueError, match=f"--num-queues {MAX_BLK_QUEUES + 1} is not in 1..{MAX_BLK_QUEUES}"
    ):
        BlkDevice(BlkOptions(str(image), size=MiB, num_queues=MAX_BLK_QUEUES + 1))
    assert not image.exists()  # refused before the image was made


def test_blk_cli_refuses_one_queue_more(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock, image = tmp_path / "blk.sock", tmp_path / "disk.img"
    with pytest.raises(SystemExit) as exc:
        run(
            devices.blk.DEVICE,
            [
                "--socket-path",
                str(sock),
                "--blk-file",
                str(image),
                "--size",
                "1M",
                "--num-queues",
                str(MAX_BLK_QUEUES + 1),
            ],
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-queues" in err[0] and str(MAX_BLK_QUEUES) in err[0], err
    assert list(tmp_path.iterdir()) == []  # no socket, no image


# =========================================================================================
# MAX_ENGINE_PAIRS
# =========================================================================================


def test_net_cli_refuses_one_engine_pair_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ports, queues = ports_and_queues(MAX_ENGINE_PAIRS + 1, MAX_QUEUE_PAIRS)
    assert ports * queues == MAX_ENGINE_PAIRS + 1
    socks = [a for i in range(ports) for a in ("--socket-path", str(tmp_path / f"p{i}.sock"))]
    with pytest.raises(SystemExit) as exc:
        run(devices.net.DEVICE, [*socks, "--switch", "sw0", "--num-queues", str(queues)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"({MAX_ENGINE_PAIRS} queue pairs)" in err[0], err
    assert list(tmp_path.iterdir()) == []
    assert net_c.lib.NET_MAX_PAIRS == MAX_ENGINE_PAIRS


def test_net_queue_pairs_in_the_device() -> None:
    """A port has at most MAX_QUEUE_PAIRS queue pairs: 2 x that many queues at the bound,
    one pair more refused when the port is made."""
    switch = Switch("limits")
    dev = NetDevice(
        NetOptions(mac=b"\x02" + bytes(5), num_queue_pairs=MAX_QUEUE_PAIRS), switch=switch
    )
    s = Session(dev, "pairs")
    try:
        assert s.handle(p.GetQueueNum()) == p.U64Reply(p.Request.GET_QUEUE_NUM, MAX_QUEUE_PAIRS)
        assert len(s.queues) == 2 * MAX_QUEUE_PAIRS
        assert ack(s.handle(p.SetVringNum(2 * MAX_QUEUE_PAIRS - 1, 256, need_reply=True))) == 0
        assert ack(s.handle(p.SetVringNum(2 * MAX_QUEUE_PAIRS, 256, need_reply=True))) == 1
    finally:
        s.close()
        dev.close()
    with pytest.raises(
        ValueError, match=f"--num-queues {MAX_QUEUE_PAIRS + 1} is not in 1..{MAX_QUEUE_PAIRS}"
    ):
        NetDevice(
            NetOptions(mac=b"\x02" + bytes(5), num_queue_pairs=MAX_QUEUE_PAIRS + 1), switch=switch
        )


# =========================================================================================
# The net engine, driven directly: MAC table, NET_RX_BUDGET
# =========================================================================================

VNET_HDR = 12
ETH_FRAME = 60
SO_SNDBUFFORCE = 32  # Linux; not in the socket module
COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)  # the clock net.c stamps MACs with


class EngineRun:
    """A struct net_engine over one queue pair of a test Ring, its loop in a thread."""

    def __init__(
        self, *, switch_mode: bool, rx: Ring | None = None, tx: Ring | None = None, tap_fd: int = -1
    ) -> None:
        self.port = net_c.ffi.new("struct net_port *")
        self.port.hdr_len = VNET_HDR
        self.port.max_frame = 1500 + 18
        self.e = net_c.ffi.new("struct net_engine *")
        self.e.npairs = 1
        self.e.switch_mode = int(switch_mode)
        self.e.mac_age = 300
        self.e.busy_poll_us = 0
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.e.stop_fd = self.stop_fd
        pair = self.e.pairs[0]
        pair.port = self.port
        pair.rx = rx.vq if rx else net_c.ffi.NULL
        pair.tx = tx.vq if tx else net_c.ffi.NULL
        pair.tap_fd = tap_fd
        self.thread: threading.Thread | None = None
        self.rc: int | None = None

    def start(self) -> None:
        self.e.stop = 0
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.stop_fd)

        def run() -> None:
            self.rc = int(net_c.lib.net_run(self.e))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        assert self.thread is not None
        net_c.lib.net_request_stop(self.e)
        self.thread.join(5)
        assert not self.thread.is_alive(), "net engine did not stop"
        assert self.rc == lib.VU_RUN_STOPPED, self.rc
        self.thread = None

    def close(self) -> None:
        if self.thread is not None:
            self.stop()
        os.close(self.stop_fd)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def mac_bucket(mac: bytes, buckets: int) -> int:
    """devices/net/net.c's mac_bucket (FNV-1a), to pick MACs that share a bucket."""
    h = 2166136261
    for b in mac:
        h = ((h ^ b) * 16777619) & 0xFFFF_FFFF
    return h % buckets


def test_mac_table_bucket_holds_its_ways_and_replaces_the_oldest(make: Callable[..., Ring]) -> None:
    """The switch learns a source MAC per frame into a fixed table of buckets x ways:
    a bucket holds NET_MAC_WAYS MACs; one more replaces the one learnt longest ago
    (and nothing in any other bucket)."""
    buckets, ways = net_limits.NET_MAC_BUCKETS, net_limits.NET_MAC_WAYS
    candidates = [bytes([0x02, 0, 0, 0, k >> 8, k & 0xFF]) for k in range(1, 1 << 16)]
    target = mac_bucket(candidates[0], buckets)
    same = [m for m in candidates if mac_bucket(m, buckets) == target][: ways + 1]
    other = next(m for m in candidates if mac_bucket(m, buckets) != target)
    assert len(same) == ways + 1

    ring = make(num=64)
    run = EngineRun(switch_mode=True, tx=ring)
    frames = iter(range(1000))

    def send(*macs: bytes) -> None:
        heads = []
        for mac in macs:
            buf = ring.buf(VNET_HDR + ETH_FRAME)
            frame = b"\xff" * 6 + mac + b"\x88\xb5" + next(frames).to_bytes(46, "big")
            ring.ram.write(buf, bytes(VNET_HDR) + frame)
            heads.append(ring.q.add_chain([(buf, VNET_HDR + ETH_FRAME, False)]))
        ring.q.publish()
        run.start()
        wait_until(lambda: ring.q.used_idx() == ring.q.avail_idx, "tx frames used")
        run.stop()
        assert [h for h, _ in ring.q.get_used()] == heads

    def learnt() -> list[bool]:
        return [net_c.lib.net_switch_lookup(run.e, m) == 0 for m in same]

    try:
        send(same[0])
        # the engine stamps entries in whole seconds of its clock: let that move on
        second = int(time.clock_gettime(COARSE))
        wait_until(lambda: int(time.clock_gettime(COARSE)) > second, "the next second", 2.0)
        send(*same[1:ways], other)
        assert learnt() == [True] * ways + [False]  # at the bound: all kept
        send(same[ways])
        assert learnt() == [False] + [True] * ways  # one past: the oldest went
        assert net_c.lib.net_switch_lookup(run.e, other) == 0  # other buckets untouched
        assert ring.vq.err.count == 0
    finally:
        run.close()


@pytest.mark.parametrize(("extra", "passes"), [(0, 1), (1, 2)], ids=["at", "past"])
def test_rx_budget_frames_per_pass(make: Callable[..., Ring], extra: int, passes: int) -> None:
    """In TAP mode one pass reads at most NET_RX_BUDGET frames from a TAP queue before it
    serves the others (and signals the guest). Frames waiting before the engine starts:
    NET_RX_BUDGET of them arrive in one pass (one call), one more needs a second pass (two
    calls); none is lost. A SOCK_DGRAM socketpair stands in for the TAP (one frame per
    read, with its virtio-net header, like a TAP with IFF_VNET_HDR)."""
    frames = net_limits.NET_RX_BUDGET + extra
    ring = make(num=512)
    assert ring.num > frames
    buf = ring.buf(2048)
    for _ in range(frames + 8):  # descriptors may share a buffer
        ring.q.add_chain([(buf, 2048, True)])
    ring.q.publish()
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ring.vq.call_fd = call
    tap, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    run = EngineRun(switch_mode=False, rx=ring, tap_fd=tap.fileno())
    try:
        tap.setblocking(False)
        host.setblocking(False)
        try:  # room for every frame before the engine starts
            host.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 * MiB)
        except PermissionError:
            host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * MiB)
        last = b""
        for k in range(frames):
            last = b"\xff" * 6 + b"\x02" + bytes(5) + b"\x88\xb5" + k.to_bytes(46, "big")
            try:
                host.send(bytes(VNET_HDR) + last)
            except BlockingIOError:
                pytest.skip(
                    f"the socket buffer cannot hold {frames} frames (no "
                    "CAP_NET_ADMIN for SO_SNDBUFFORCE)"
                )
        run.start()
        wait_until(lambda: ring.q.used_idx() == frames, f"{frames} frames received")
        run.stop()
        assert os.eventfd_read(call) == passes
        assert ring.q.used_idx() == frames and ring.vq.err.count == 0
        assert run.port.stats.rx_packets == frames
        assert ring.ram.read(buf + VNET_HDR, ETH_FRAME) == last  # the last frame, whole
    finally:
        run.close()
        tap.close()
        host.close()
        ring.vq.call_fd = -1
        os.close(call)
