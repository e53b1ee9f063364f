"""Unit tests for vhost.protocol: pure codec, no sockets (fds are real eventfds/pipes so
that ownership and closing can be checked with os.fstat)."""

import os
import struct
from collections.abc import Callable
from dataclasses import replace

import pytest

from tests.support.wire import MakeFd, decode_one, header, is_open, raw, region_bytes, reject
from vhost.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    VRING_NOFD_MASK,
    AddMemReg,
    ConfigReply,
    GetConfig,
    GetFeatures,
    GetMaxMemSlots,
    GetProtocolFeatures,
    GetQueueNum,
    GetVringBase,
    MemoryRegion,
    Message,
    MessageReader,
    ProtocolError,
    RemMemReg,
    Reply,
    ReplyReader,
    Request,
    ResetDevice,
    ResetOwner,
    SendRarp,
    SetConfig,
    SetFeatures,
    SetLogBase,
    SetLogFd,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringErr,
    SetVringKick,
    SetVringNum,
    U64Reply,
    Unknown,
    VringStateReply,
    encode_message,
    encode_reply,
)

REGION = MemoryRegion(0x0, 0x4000_0000, 0x7F00_0000_0000, 0)
REGION2 = MemoryRegion(0x1_0000_0000, 0x1000_0000, 0x7F10_0000_0000, 0x4000_0000)


# --- round trips -----------------------------------------------------------------------

MESSAGE_FACTORIES: list[Callable[[MakeFd], Message]] = [
    lambda fd: GetFeatures(),
    lambda fd: SetFeatures(0x1_4000_0000 | (1 << 63)),
    lambda fd: SetOwner(),
    lambda fd: ResetOwner(),
    lambda fd: SetMemTable((REGION,), (fd(),)),
    lambda fd: SetMemTable((REGION, REGION2), (fd(), fd()), need_reply=True),
    lambda fd: SetMemTable(
        tuple(MemoryRegion(i << 32, 0x1000, (i + 1) << 40, 0) for i in range(8)),
        tuple(fd() for _ in range(8)),
    ),
    lambda fd: SetVringNum(1, 256),
    lambda fd: SetVringBase(0, 0xFFFF),
    lambda fd: GetVringBase(3),
    lambda fd: SetVringEnable(2, True),
    lambda fd: SetVringEnable(2, False),
    lambda fd: SetVringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_2000, 0x7F00_0000_3000, 0x4000),
    lambda fd: SetVringKick(0, fd()),
    lambda fd: SetVringKick(255, None),
    lambda fd: SetVringCall(1, fd()),
    lambda fd: SetVringCall(1, None),
    lambda fd: SetVringErr(7, fd()),
    lambda fd: SetVringErr(7, None),
    lambda fd: GetProtocolFeatures(),
    lambda fd: SetProtocolFeatures(0x1_FFFF),
    lambda fd: GetQueueNum(),
    lambda fd: GetMaxMemSlots(),
    lambda fd: ResetDevice(need_reply=True),
    lambda fd: GetConfig(0, 60, 0, bytes(60)),
    lambda fd: GetConfig(0, MAX_CONFIG_SIZE, 0, bytes(MAX_CONFIG_SIZE)),
    lambda fd: SetConfig(20, 4, 1, b"\x01\x02\x03\x04"),
    lambda fd: SetConfig(0, 0, 0, b""),
    lambda fd: AddMemReg(REGION2, fd()),
    lambda fd: RemMemReg(REGION2, None),
    lambda fd: RemMemReg(REGION2, fd()),
    lambda fd: SetLogBase(0x1000, 0, fd()),
    lambda fd: SetLogBase(0x1000, 0x2000, None, need_reply=True),
    lambda fd: SetLogFd(fd()),
    lambda fd: SendRarp(b"\x52\x54\x00\x12\x34\x56"),
    lambda fd: Unknown(Request.POSTCOPY_ADVISE, VERSION, b"", (fd(),)),
    lambda fd: Unknown(Request.SET_STATUS, VERSION | FLAG_NEED_REPLY, bytes(8), (), True),
    lambda fd: Unknown(999, VERSION, b"whatever", ()),
]


@pytest.mark.parametrize("factory", MESSAGE_FACTORIES)
def test_message_round_trip(factory: Callable[[MakeFd], Message], make_fd: MakeFd) -> None:
    msg = factory(make_fd)
    data, fds = encode_message(msg)
    assert decode_one(data, fds) == msg
    for fd in fds:  # handed out, so still open: closing is the caller's job
        assert is_open(fd)


@pytest.mark.parametrize("factory", MESSAGE_FACTORIES)
def test_need_reply_round_trip(factory: Callable[[MakeFd], Message], make_fd: MakeFd) -> None:
    msg = factory(make_fd)
    wanted = replace(msg, need_reply=True)
    if isinstance(wanted, Unknown):  # decodes with the raw header flags
        wanted = replace(wanted, flags=wanted.flags | FLAG_NEED_REPLY)
    data, fds = encode_message(wanted)
    (flags,) = struct.unpack_from("<I", data, 4)
    assert flags == VERSION | FLAG_NEED_REPLY
    assert decode_one(data, fds) == wanted


def test_encoded_header_layout() -> None:
    data, fds = encode_message(SetVringNum(1, 256))
    assert data == header(Request.SET_VRING_NUM, VERSION, 8) + struct.pack("<II", 1, 256)
    assert fds == []


def test_kick_wire_value(make_fd: MakeFd) -> None:
    fd = make_fd()
    data, fds = encode_message(SetVringKick(5, fd))
    assert data[HEADER_SIZE:] == struct.pack("<Q", 5) and fds == [fd]
    data, fds = encode_message(SetVringKick(5, None))
    assert data[HEADER_SIZE:] == struct.pack("<Q", 5 | VRING_NOFD_MASK) and fds == []


REPLIES: list[Reply] = [
    U64Reply(Request.GET_FEATURES, (1 << 30) | (1 << 32)),
    U64Reply(Request.GET_PROTOCOL_FEATURES, 0x1_0209),
    U64Reply(Request.GET_QUEUE_NUM, 4),
    U64Reply(Request.GET_MAX_MEM_SLOTS, 32),
    U64Reply(Request.SET_MEM_TABLE, 0),  # REPLY_ACK
    U64Reply(Request.SET_VRING_ADDR, 1),  # REPLY_ACK failure
    VringStateReply(Request.GET_VRING_BASE, 1, 0x1234),
    ConfigReply(Request.GET_CONFIG, 0, 8, 0, b"abcdefgh"),
    ConfigReply(Request.GET_CONFIG, 0, 0, 0, b""),
]


@pytest.mark.parametrize("reply", REPLIES)
def test_reply_round_trip(reply: Reply) -> None:
    data = encode_reply(reply)
    (flags,) = struct.unpack_from("<I", data, 4)
    assert flags == VERSION | FLAG_REPLY
    reader = ReplyReader()
    reader.feed(data)
    assert reader.next_reply() == reply
    assert reader.next_reply() is None


def test_replies_byte_at_a_time() -> None:
    stream = b"".join(encode_reply(r) for r in REPLIES)
    reader = ReplyReader()
    got: list[Reply] = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        while (reply := reader.next_reply()) is not None:
            got.append(reply)
    assert got == REPLIES


def test_empty_get_config_reply_means_failure() -> None:
    reader = ReplyReader()
    reader.feed(raw(Request.GET_CONFIG, flags=VERSION | FLAG_REPLY))
    assert reader.next_reply() == ConfigReply(Request.GET_CONFIG, 0, 0, 0, b"")


# --- streaming and fd attribution --------------------------------------------------------


def test_byte_at_a_time(make_fd: MakeFd) -> None:
    messages: list[Message] = [
        GetFeatures(),
        SetMemTable((REGION, REGION2), (make_fd(), make_fd())),
        SetVringKick(0, make_fd()),
        SetVringCall(0, None),
        SetConfig(0, 3, 0, b"xyz"),
    ]
    reader = MessageReader()
    got: list[Message] = []
    for msg in messages:
        data, fds = encode_message(msg)
        for i in range(len(data)):
            # like recvmsg: the fds come with the first piece of their message read
            reader.feed(data[i : i + 1], fds if i == 0 else ())
            while (out := reader.next_message()) is not None:
                got.append(out)
    assert got == messages


def test_short_header_is_incomplete_not_error() -> None:
    reader = MessageReader()
    reader.feed(raw(Request.GET_FEATURES)[: HEADER_SIZE - 1])
    assert reader.next_message() is None
    reader.feed(raw(Request.GET_FEATURES)[HEADER_SIZE - 1 :])
    assert reader.next_message() == GetFeatures()


def test_incomplete_payload_is_not_error() -> None:
    data, _ = encode_message(SetFeatures(1))
    reader = MessageReader()
    reader.feed(data[:-1])
    assert reader.next_message() is None
    reader.feed(data[-1:])
    assert reader.next_message() == SetFeatures(1)


def test_two_messages_in_one_chunk(make_fd: MakeFd) -> None:
    # What Linux does: fd-less messages glued in front of the one that carries the fds.
    kick = SetVringKick(1, make_fd())
    first, _ = encode_message(SetFeatures(3))
    second, fds = encode_message(kick)
    reader = MessageReader()
    reader.feed(first + second, fds)
    assert reader.next_message() == SetFeatures(3)
    assert reader.next_message() == kick
    assert reader.next_message() is None


def test_fds_go_to_the_message_holding_the_last_byte_of_the_chunk(make_fd: MakeFd) -> None:
    fd = make_fd()
    call = SetVringCall(0, fd)
    a, _ = encode_message(SetFeatures(1))
    b, _ = encode_message(GetFeatures())
    c, fds = encode_message(call)
    reader = MessageReader()
    reader.feed(a + b + c[:7], fds)  # the kick message starts in this chunk, ends in the next
    reader.feed(c[7:])
    assert [reader.next_message() for _ in range(3)] == [SetFeatures(1), GetFeatures(), call]


def test_fds_with_the_tail_of_their_message(make_fd: MakeFd) -> None:
    fd = make_fd()
    kick = SetVringKick(2, fd)
    a, _ = encode_message(GetFeatures())
    b, fds = encode_message(kick)
    reader = MessageReader()
    reader.feed(a + b[:5])  # GetFeatures complete, kick begun, no fds yet
    assert reader.next_message() == GetFeatures()
    assert reader.next_message() is None
    reader.feed(b[5:], fds)  # first byte is inside the kick message
    assert reader.next_message() == kick
    assert is_open(fd)


def test_fds_on_chunk_ending_inside_fdless_message_are_rejected(make_fd: MakeFd) -> None:
    # The chunk ends inside GetFeatures, so its fd is GetFeatures' -- which takes none:
    # rejected, and the fd closed rather than leaked or given to another message.
    fd = make_fd()
    a, _ = encode_message(GetFeatures())
    b, _ = encode_message(SetVringKick(0, None))
    reader = MessageReader()
    reader.feed(b + a[:4], [fd])
    reader.feed(a[4:])
    assert reader.next_message() == SetVringKick(0, None)
    with pytest.raises(ProtocolError, match=r"GET_FEATURES\(1\): 1 fds attached, expected 0"):
        reader.next_message()
    assert not is_open(fd)


def test_fds_with_empty_chunk_go_to_next_byte(make_fd: MakeFd) -> None:
    fd = make_fd()
    a, _ = encode_message(GetFeatures())
    b, _ = encode_message(SetVringCall(4, fd))
    reader = MessageReader()
    reader.feed(a)
    reader.feed(b"", [fd])
    reader.feed(b)
    assert reader.next_message() == GetFeatures()
    assert reader.next_message() == SetVringCall(4, fd)


def test_fd_groups_within_one_message_are_joined_in_order(make_fd: MakeFd) -> None:
    fd1, fd2 = make_fd(), make_fd()
    data, _ = encode_message(SetMemTable((REGION, REGION2), (fd1, fd2)))
    reader = MessageReader()
    reader.feed(data[:20], [fd1])
    reader.feed(data[20:], [fd2])
    assert reader.next_message() == SetMemTable((REGION, REGION2), (fd1, fd2))


def test_many_complete_messages_in_one_big_chunk_are_fine() -> None:
    one, _ = encode_message(SetConfig(0, MAX_CONFIG_SIZE, 0, bytes(MAX_CONFIG_SIZE)))
    count = 3 * MAX_PAYLOAD_SIZE // len(one) + 1
    reader = MessageReader()
    reader.feed(one * count)
    got = 0
    while reader.next_message() is not None:
        got += 1
    assert got == count


def test_pipe_fds_work_too() -> None:
    r, w = os.pipe()
    try:
        data, fds = encode_message(SetVringErr(0, w))
        reader = MessageReader()
        reader.feed(data, fds)
        assert reader.next_message() == SetVringErr(0, w)
    finally:
        os.close(r)
        os.close(w)


# --- ownership ---------------------------------------------------------------------------


def test_close_closes_buffered_fds_only(make_fd: MakeFd) -> None:
    given, held = make_fd(), make_fd()
    a, _ = encode_message(SetVringKick(0, given))
    b, _ = encode_message(SetVringKick(1, held))
    reader = MessageReader()
    reader.feed(a, [given])
    reader.feed(b[:10], [held])
    assert reader.next_message() == SetVringKick(0, given)
    assert reader.next_message() is None
    reader.close()
    assert is_open(given)
    assert not is_open(held)
    reader.close()  # idempotent
    with pytest.raises(ProtocolError):
        reader.next_message()


def test_error_closes_every_held_fd(make_fd: MakeFd) -> None:
    bad, later = make_fd(), make_fd()
    a = raw(Request.GET_FEATURES)  # takes no fd
    b, _ = encode_message(SetVringKick(0, later))
    reader = MessageReader()
    reader.feed(a, [bad])
    reader.feed(b, [later])
    with pytest.raises(ProtocolError):
        reader.next_message()
    assert not is_open(bad)
    assert not is_open(later)


def test_feed_after_error_closes_fds_and_raises(make_fd: MakeFd) -> None:
    reader = MessageReader()
    reader.feed(raw(Request.GET_FEATURES, flags=2))
    with pytest.raises(ProtocolError, match="version 2"):
        reader.next_message()
    fd = make_fd()
    with pytest.raises(ProtocolError, match=r"earlier error.*version 2"):
        reader.feed(b"x", [fd])
    assert not is_open(fd)


# --- junk --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0, 2, 3, 0x8 | 2])
def test_wrong_version(flags: int) -> None:
    reject(raw(Request.GET_FEATURES, flags=flags), match=f"version {flags & 3}")


def test_reply_flag_on_request(make_fd: MakeFd) -> None:
    fd = make_fd()
    reject(
        raw(Request.SET_VRING_KICK, struct.pack("<Q", 0), VERSION | FLAG_REPLY),
        [fd],
        match=r"SET_VRING_KICK\(12\): request with the REPLY flag",
    )


def test_oversized_size_detected_from_header_alone() -> None:
    reader = MessageReader()
    reader.feed(header(Request.SET_CONFIG, VERSION, MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(ProtocolError, match=f"payload size {MAX_PAYLOAD_SIZE + 1}"):
        reader.next_message()


def test_buffer_bound_enforced_in_feed(make_fd: MakeFd) -> None:
    fd = make_fd()
    reader = MessageReader()
    reader.feed(header(999, VERSION, 0xFFFF_FFFF), [fd])  # never validated: nobody asked
    with pytest.raises(ProtocolError, match=str(0xFFFF_FFFF)):
        reader.feed(bytes(3 * MAX_PAYLOAD_SIZE))
    assert not is_open(fd)


@pytest.mark.parametrize(
    ("request_code", "payload"),
    [
        (Request.GET_FEATURES, bytes(8)),
        (Request.SET_OWNER, bytes(1)),
        (Request.GET_MAX_MEM_SLOTS, bytes(8)),
        (Request.SET_FEATURES, bytes(4)),
        (Request.SET_PROTOCOL_FEATURES, bytes(16)),
        (Request.SET_VRING_NUM, bytes(4)),
        (Request.GET_VRING_BASE, b""),
        (Request.SET_VRING_ENABLE, bytes(12)),
        (Request.SET_VRING_ADDR, bytes(32)),
        (Request.SET_VRING_CALL, bytes(4)),
        (Request.ADD_MEM_REG, bytes(32)),
        (Request.REM_MEM_REG, bytes(48)),
        (Request.GET_CONFIG, bytes(8)),
        (Request.SET_LOG_BASE, bytes(8)),  # the legacy address form (no LOG_SHMFD)
        (Request.SET_LOG_BASE, bytes(24)),
        (Request.SET_LOG_FD, bytes(4)),
        (Request.SEND_RARP, bytes(6)),
    ],
)
def test_wrong_payload_size(request_code: Request, payload: bytes) -> None:
    reject(raw(request_code, payload), match=rf"{request_code.name}.*payload size {len(payload)}")


def test_wrong_payload_size_closes_fd(make_fd: MakeFd) -> None:
    fd = make_fd()
    reject(raw(Request.ADD_MEM_REG, bytes(8) + region_bytes(REGION) + b"x"), [fd], "size 41")


def test_missing_fd() -> None:
    reject(raw(Request.SET_VRING_KICK, struct.pack("<Q", 1)), match="0 fds attached, expected 1")


def test_missing_fd_for_region(make_fd: MakeFd) -> None:
    payload = struct.pack("<II", 2, 0) + region_bytes(REGION) + region_bytes(REGION2)
    reject(raw(Request.SET_MEM_TABLE, payload), [make_fd()], match="1 fds attached, expected 2")


def test_add_mem_reg_without_fd() -> None:
    reject(raw(Request.ADD_MEM_REG, bytes(8) + region_bytes(REGION)), match="expected 1")


@pytest.mark.parametrize(
    ("request_code", "payload", "nfds", "expected"),
    [
        (Request.SET_FEATURES, bytes(8), 1, "0"),
        (Request.SET_VRING_KICK, struct.pack("<Q", VRING_NOFD_MASK), 1, "0"),
        (Request.SET_VRING_CALL, struct.pack("<Q", 0), 2, "1"),
        (Request.ADD_MEM_REG, bytes(8) + region_bytes(REGION), 2, "1"),
        (Request.REM_MEM_REG, bytes(8) + region_bytes(REGION), 2, "0 or 1"),
        (Request.SET_LOG_BASE, bytes(16), 2, "0 or 1"),
        (Request.SET_LOG_FD, b"", 0, "1"),
        (Request.SEND_RARP, bytes(8), 1, "0"),
    ],
)
def test_extra_fd(
    request_code: Request, payload: bytes, nfds: int, expected: str, make_fd: MakeFd
) -> None:
    fds = [make_fd() for _ in range(nfds)]
    reject(raw(request_code, payload), fds, match=f"{nfds} fds attached, expected {expected}$")


def test_too_many_fds_at_once(make_fd: MakeFd) -> None:
    fds = [make_fd() for _ in range(MAX_FDS_PER_MESSAGE + 1)]
    reject(raw(999), fds, match=f"{MAX_FDS_PER_MESSAGE + 1} fds")


def test_too_many_fds_for_one_message_across_chunks(make_fd: MakeFd) -> None:
    data = raw(999, bytes(100))
    reader = MessageReader()
    first = [make_fd() for _ in range(MAX_FDS_PER_MESSAGE)]
    reader.feed(data[:20], first)
    extra = make_fd()
    with pytest.raises(ProtocolError, match=f"{MAX_FDS_PER_MESSAGE + 1} fds"):
        reader.feed(data[20:40], [extra])
    assert not any(is_open(fd) for fd in [*first, extra])


@pytest.mark.parametrize("count", [0, 9, 0xFFFF_FFFF])
def test_bad_region_count(count: int, make_fd: MakeFd) -> None:
    n = min(count, 9)
    payload = struct.pack("<II", count, 0) + region_bytes(REGION) * n
    fds = [make_fd() for _ in range(min(n, MAX_FDS_PER_MESSAGE))]
    reject(raw(Request.SET_MEM_TABLE, payload), fds, match=rf"{count} regions, expected 1\.\.8")


def test_region_count_disagrees_with_size(make_fd: MakeFd) -> None:
    payload = struct.pack("<II", 2, 0) + region_bytes(REGION)
    reject(raw(Request.SET_MEM_TABLE, payload), [make_fd()], match="size 40, expected 72")


@pytest.mark.parametrize(
    ("region", "match"),
    [
        (MemoryRegion(0x1000, 0, 0x7F00_0000_0000, 0), "memory_size 0"),
        (MemoryRegion(0xFFFF_FFFF_FFFF_F000, 0x1000, 0, 0), "guest_phys_addr 0xfffffffffffff000"),
        (MemoryRegion(0, 0x2000, 0xFFFF_FFFF_FFFF_F000, 0), "userspace_addr 0xfffffffffffff000"),
        (MemoryRegion(0, 0x2000, 0, 0xFFFF_FFFF_FFFF_FFFF), "mmap_offset 0xffffffffffffffff"),
    ],
)
def test_bad_region(region: MemoryRegion, match: str, make_fd: MakeFd) -> None:
    table = struct.pack("<II", 2, 0) + region_bytes(REGION) + region_bytes(region)
    reject(raw(Request.SET_MEM_TABLE, table), [make_fd(), make_fd()], match=match)
    single = bytes(8) + region_bytes(region)
    reject(raw(Request.ADD_MEM_REG, single), [make_fd()], match=match)
    reject(raw(Request.REM_MEM_REG, single), match=match)


def test_region_ending_exactly_at_top_of_u64_space_is_rejected(make_fd: MakeFd) -> None:
    # [2**64 - 0x1000, 2**64) has no representable end address in u64 arithmetic.
    region = MemoryRegion(0xFFFF_FFFF_FFFF_F000, 0x1000, 0, 0)
    reject(raw(Request.ADD_MEM_REG, bytes(8) + region_bytes(region)), [make_fd()], "overflows")


@pytest.mark.parametrize("request_code", [Request.GET_CONFIG, Request.SET_CONFIG])
def test_config_size_too_big(request_code: Request) -> None:
    size = MAX_CONFIG_SIZE + 1
    payload = struct.pack("<III", 0, size, 0) + bytes(size)
    reject(raw(request_code, payload), match=f"config size {size} exceeds")


def test_config_size_disagrees_with_payload() -> None:
    payload = struct.pack("<III", 0, 8, 0) + bytes(4)
    reject(raw(Request.SET_CONFIG, payload), match="payload size 16, expected 20")


def test_vring_fd_payload_with_stray_bits(make_fd: MakeFd) -> None:
    value = 0x200 | 1
    reject(raw(Request.SET_VRING_KICK, struct.pack("<Q", value)), [make_fd()], match="0x201")


def test_vring_enable_must_be_0_or_1() -> None:
    reject(raw(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 2)), match="enable value 2")


def test_nofd_flag() -> None:
    payload = struct.pack("<Q", 3 | VRING_NOFD_MASK)
    assert decode_one(raw(Request.SET_VRING_CALL, payload)) == SetVringCall(3, None)


def test_get_vring_base_ignores_num() -> None:
    assert decode_one(raw(Request.GET_VRING_BASE, struct.pack("<II", 1, 77))) == GetVringBase(1)


def test_unknown_request_is_not_an_error(make_fd: MakeFd) -> None:
    fd = make_fd()
    flags = VERSION | FLAG_NEED_REPLY | 0x100
    msg = decode_one(raw(12345, b"abc", flags), [fd])
    assert msg == Unknown(12345, flags, b"abc", (fd,), need_reply=True)
    assert is_open(fd)


@pytest.mark.parametrize(
    "request_code", [Request.NET_SET_MTU, Request.SET_STATUS, Request.GET_STATUS]
)
def test_known_but_unsupported_request_is_unknown(request_code: Request) -> None:
    msg = decode_one(raw(request_code, bytes(8)))
    assert msg == Unknown(request_code, VERSION, bytes(8), ())


# --- reply reader junk -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (raw(Request.GET_FEATURES, bytes(8)), r"GET_FEATURES\(1\): reply without the REPLY"),
        (raw(Request.GET_FEATURES, bytes(8), FLAG_REPLY | 2), "version 2"),
        (raw(Request.GET_FEATURES, bytes(4), VERSION | FLAG_REPLY), "payload size 4"),
        (raw(Request.GET_VRING_BASE, bytes(16), VERSION | FLAG_REPLY), "payload size 16"),
        (raw(Request.GET_CONFIG, bytes(12 + 4), VERSION | FLAG_REPLY), "payload size 16"),
        (header(Request.GET_FEATURES, VERSION | FLAG_REPLY, 5000), "payload size 5000"),
    ],
)
def test_reply_junk(data: bytes, match: str) -> None:
    reader = ReplyReader()
    reader.feed(data)
    with pytest.raises(ProtocolError, match=match):
        reader.next_reply()
    with pytest.raises(ProtocolError):
        reader.next_reply()


# --- encoder refuses what it could not round-trip ------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        SetMemTable((REGION, REGION2), (10,)),
        SetMemTable((), ()),
        SetMemTable((MemoryRegion(0, 0, 0, 0),), (10,)),
        SetVringKick(256, 10),
        SetVringNum(-1, 0),
        SetFeatures(1 << 64),
        GetConfig(0, 4, 0, bytes(8)),
        SetConfig(0, MAX_CONFIG_SIZE + 1, 0, bytes(MAX_CONFIG_SIZE + 1)),
    ],
)
def test_encode_message_rejects(msg: Message) -> None:
    with pytest.raises(ValueError):
        encode_message(msg)


@pytest.mark.parametrize(
    "reply",
    [
        U64Reply(Request.GET_VRING_BASE, 0),  # would read back as a VringStateReply
        ConfigReply(Request.SET_CONFIG, 0, 0, 0, b""),
        ConfigReply(Request.GET_CONFIG, 0, 2, 0, b"x"),
        VringStateReply(Request.GET_VRING_BASE, 0, 1 << 32),
    ],
)
def test_encode_reply_rejects(reply: Reply) -> None:
    with pytest.raises(ValueError):
        encode_reply(reply)


def test_unknown_encodes_raw_for_junk_tests() -> None:
    data, fds = encode_message(Unknown(Request.SET_FEATURES, 0, b"\x01", (), need_reply=True))
    assert data == header(Request.SET_FEATURES, VERSION | FLAG_NEED_REPLY, 1) + b"\x01"
    assert fds == []
