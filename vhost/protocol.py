"""Sans-IO codec for the vhost-user control protocol.

Job: turn the bytes and file descriptors that arrive on a vhost-user socket into typed,
immutable messages, and turn messages back into bytes and descriptors. Both directions
live here so that the device back end (decodes requests, encodes replies) and the test
front end that plays QEMU (encodes requests, decodes replies) share one description of
the wire format.

Boundary: no sockets, no event loop, no guest memory. Callers do recvmsg/sendmsg with
SCM_RIGHTS themselves and feed whatever arrived; what a message *means* (feature
negotiation, mapping memory, starting rings) is the device layer's business. What this
module guarantees is that everything it hands out is well formed: payload sizes,
descriptor counts and field ranges have been checked, so no layer above parses raw bytes.

Descriptor ownership: a reader owns every fd fed to it until it hands the fd out inside a
message; from then on the caller must close it. The reader closes the fds of a message it
rejects, and every fd it still holds when it fails or is closed.

Wire format (little endian): u32 request, u32 flags, u32 size, then `size` payload bytes.
"""

import enum
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NoReturn, TypeAlias, assert_never

from vhost import limits
from vhost.fds import close_all


class Request(enum.IntEnum):
    """Front-end request codes (the `request` header field)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    """Bits of the GET/SET_PROTOCOL_FEATURES u64."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# A virtio feature bit (in GET/SET_FEATURES), not a protocol feature: it announces that
# GET/SET_PROTOCOL_FEATURES are understood.
VHOST_USER_F_PROTOCOL_FEATURES: Final = 1 << 30
# A vhost feature bit: the back end logs every write into guest memory while it is set
# (live migration), in the log SET_LOG_BASE gives.
VHOST_F_LOG_ALL: Final = 1 << 26

VERSION: Final = 1
FLAG_REPLY: Final = 0x4
FLAG_NEED_REPLY: Final = 0x8
VRING_INDEX_MASK: Final = 0xFF
VRING_NOFD_MASK: Final = 0x100
HEADER_SIZE: Final = 12

_VERSION_MASK: Final = 0x3
_U64_LIMIT: Final = 1 << 64
# The bounds are vhost/limits.py's; named here too for callers of the codec.
MAX_PAYLOAD_SIZE: Final = limits.MAX_PAYLOAD_SIZE
MAX_FDS_PER_MESSAGE: Final = limits.MAX_FDS_PER_MESSAGE
MAX_CONFIG_SIZE: Final = limits.MAX_CONFIG_SIZE
MEM_TABLE_MAX_REGIONS: Final = limits.MEM_TABLE_MAX_REGIONS
_MAX_BUFFERED_BYTES: Final = limits.MAX_BUFFERED_BYTES

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEM_TABLE_HEAD = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")
_SINGLE_REGION_PAD = struct.Struct("<Q")
_CONFIG_HEAD = struct.Struct("<III")
# VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size (+ 4 bytes of C padding)
_INFLIGHT = struct.Struct("<QQHH4x")
# VhostUserLog: mmap_size, mmap_offset
_LOG = struct.Struct("<QQ")


class ProtocolError(Exception):
    """The peer sent something malformed; the connection should be dropped."""


def request_name(code: int) -> str:
    """`SET_MEM_TABLE(5)` for known codes, `request 99` otherwise (for error texts, logs)."""
    try:
        return f"{Request(code).name}({code})"
    except ValueError:
        return f"request {code}"


# --- messages: front end -> back end ------------------------------------------------------


@dataclass(frozen=True)
class MemoryRegion:
    """One guest memory region (32 bytes on the wire); part of a message, not a message."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class GetFeatures:
    request: ClassVar[Request] = Request.GET_FEATURES
    need_reply: bool = False


@dataclass(frozen=True)
class SetFeatures:
    request: ClassVar[Request] = Request.SET_FEATURES
    features: int
    need_reply: bool = False


@dataclass(frozen=True)
class SetOwner:
    request: ClassVar[Request] = Request.SET_OWNER
    need_reply: bool = False


@dataclass(frozen=True)
class ResetOwner:
    request: ClassVar[Request] = Request.RESET_OWNER
    need_reply: bool = False


@dataclass(frozen=True)
class SetMemTable:
    request: ClassVar[Request] = Request.SET_MEM_TABLE
    regions: tuple[MemoryRegion, ...]
    fds: tuple[int, ...]  # fds[i] backs regions[i]
    need_reply: bool = False


@dataclass(frozen=True)
class SetVringNum:
    request: ClassVar[Request] = Request.SET_VRING_NUM
    index: int
    num: int
    need_reply: bool = False


@dataclass(frozen=True)
class SetVringBase:
    request: ClassVar[Request] = Request.SET_VRING_BASE
    index: int
    num: int
    need_reply: bool = False


@dataclass(frozen=True)
class GetVringBase:
    request: ClassVar[Request] = Request.GET_VRING_BASE
    index: int
    need_reply: bool = False


@dataclass(frozen=True)
class SetVringEnable:
    request: ClassVar[Request] = Request.SET_VRING_ENABLE
    index: int
    enable: bool
    need_reply: bool = False


@dataclass(frozen=True)
class SetVringAddr:
    request: ClassVar[Request] = Request.SET_VRING_ADDR
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    need_reply: bool = False


@dataclass(frozen=True)
class SetVringKick:
    request: ClassVar[Request] = Request.SET_VRING_KICK
    index: int
    fd: int | None  # None: NOFD bit set, the back end should poll
    need_reply: bool = False


@dataclass(frozen=True)
class SetVringCall:
    request: ClassVar[Request] = Request.SET_VRING_CALL
    index: int
    fd: int | None
    need_reply: bool = False


@dataclass(frozen=True)
class SetVringErr:
    request: ClassVar[Request] = Request.SET_VRING_ERR
    index: int
    fd: int | None
    need_reply: bool = False


@dataclass(frozen=True)
class GetProtocolFeatures:
    request: ClassVar[Request] = Request.GET_PROTOCOL_FEATURES
    need_reply: bool = False


@dataclass(frozen=True)
class SetProtocolFeatures:
    request: ClassVar[Request] = Request.SET_PROTOCOL_FEATURES
    features: int
    need_reply: bool = False


@dataclass(frozen=True)
class GetQueueNum:
    request: ClassVar[Request] = Request.GET_QUEUE_NUM
    need_reply: bool = False


@dataclass(frozen=True)
class GetMaxMemSlots:
    request: ClassVar[Request] = Request.GET_MAX_MEM_SLOTS
    need_reply: bool = False


@dataclass(frozen=True)
class ResetDevice:
    request: ClassVar[Request] = Request.RESET_DEVICE
    need_reply: bool = False


@dataclass(frozen=True)
class GetConfig:
    request: ClassVar[Request] = Request.GET_CONFIG
    offset: int
    size: int
    flags: int
    data: bytes  # len == size; QEMU sends zeros
    need_reply: bool = False


@dataclass(frozen=True)
class SetConfig:
    request: ClassVar[Request] = Request.SET_CONFIG
    offset: int
    size: int
    flags: int
    data: bytes
    need_reply: bool = False


@dataclass(frozen=True)
class AddMemReg:
    request: ClassVar[Request] = Request.ADD_MEM_REG
    region: MemoryRegion
    fd: int
    need_reply: bool = False


@dataclass(frozen=True)
class RemMemReg:
    request: ClassVar[Request] = Request.REM_MEM_REG
    region: MemoryRegion
    fd: int | None  # the spec says none, but some front ends attach one; close it unused
    need_reply: bool = False


@dataclass(frozen=True)
class GetInflightFd:
    """The front end asks for a region to track inflight I/O (it sends zeros for the
    mmap fields; only the queue count and size matter)."""

    request: ClassVar[Request] = Request.GET_INFLIGHT_FD
    num_queues: int
    queue_size: int
    need_reply: bool = False


@dataclass(frozen=True)
class SetInflightFd:
    """The front end hands a region back (the one GET_INFLIGHT_FD gave it, kept across
    back-end restarts)."""

    request: ClassVar[Request] = Request.SET_INFLIGHT_FD
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: int
    need_reply: bool = False


@dataclass(frozen=True)
class SetLogBase:
    """The dirty-page log (LOG_SHMFD): ``size`` bytes at ``offset`` in ``fd``, one bit per
    4 KiB guest page. ``fd`` is None when the front end attached none (an error the
    session reports; the codec only checks the shape)."""

    request: ClassVar[Request] = Request.SET_LOG_BASE
    size: int
    offset: int
    fd: int | None
    need_reply: bool = False


@dataclass(frozen=True)
class SetLogFd:
    """An eventfd the back end signals after it updated the log (legacy; QEMU sends none)."""

    request: ClassVar[Request] = Request.SET_LOG_FD
    fd: int
    need_reply: bool = False


@dataclass(frozen=True)
class SendRarp:
    """After a migration: announce the guest's MAC on its new host (a net device)."""

    request: ClassVar[Request] = Request.SEND_RARP
    mac: bytes  # 6 bytes
    need_reply: bool = False


@dataclass(frozen=True)
class Unknown:
    """Any request this codec does not parse, passed through raw.

    `flags` is the header's flags as received. On encoding, the version and REPLY bits of
    `flags` are replaced (version 1, no REPLY) and NEED_REPLY follows `need_reply`;
    nothing else is checked, so a test front end can also use Unknown to send a malformed
    body under a known request code.
    """

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...]
    need_reply: bool = False


Message: TypeAlias = (
    GetFeatures
    | SetFeatures
    | SetOwner
    | ResetOwner
    | SetMemTable
    | SetVringNum
    | SetVringBase
    | GetVringBase
    | SetVringEnable
    | SetVringAddr
    | SetVringKick
    | SetVringCall
    | SetVringErr
    | GetProtocolFeatures
    | SetProtocolFeatures
    | GetQueueNum
    | GetMaxMemSlots
    | ResetDevice
    | GetConfig
    | SetConfig
    | AddMemReg
    | RemMemReg
    | GetInflightFd
    | SetInflightFd
    | SetLogBase
    | SetLogFd
    | SendRarp
    | Unknown
)


# --- replies: back end -> front end -------------------------------------------------------


@dataclass(frozen=True)
class U64Reply:
    """GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_LOG_BASE
    (QEMU waits for this reply whether or not it asked for REPLY_ACK), and REPLY_ACK
    acknowledgements of any other request (value 0 = success)."""

    request: int
    value: int


@dataclass(frozen=True)
class VringStateReply:
    """GET_VRING_BASE."""

    request: int
    index: int
    num: int


@dataclass(frozen=True)
class ConfigReply:
    """GET_CONFIG. size 0 means failure: QEMU treats any size other than the one it asked
    for as an error, and a back end may also signal failure with an empty payload, which
    decodes as ConfigReply(request, 0, 0, 0, b"")."""

    request: int
    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class InflightReply:
    """GET_INFLIGHT_FD: the region's size and offset in ``fd``, sent with the reply
    (SCM_RIGHTS). mmap_size 0 and no fd means "no region" (QEMU then goes on without
    inflight tracking). ``fd`` is not part of the bytes, so not of equality."""

    request: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: int | None = field(default=None, compare=False)


Reply: TypeAlias = U64Reply | VringStateReply | ConfigReply | InflightReply


def reply_fds(reply: Reply) -> list[int]:
    """The fds to send with a reply's bytes (still owned by whoever made the reply)."""
    if isinstance(reply, InflightReply) and reply.fd is not None:
        return [reply.fd]
    return []


# --- header ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    request: int
    flags: int
    size: int

    @property
    def frame_size(self) -> int:
        return HEADER_SIZE + self.size


def _check_header(header: _Header, *, is_reply: bool) -> None:
    name = request_name(header.request)
    version = header.flags & _VERSION_MASK
    if version != VERSION:
        raise ProtocolError(
            f"{name}: header version {version} (flags {header.flags:#x}), expected {VERSION}"
        )
    has_reply_flag = bool(header.flags & FLAG_REPLY)
    if is_reply and not has_reply_flag:
        raise ProtocolError(f"{name}: reply without the REPLY flag (flags {header.flags:#x})")
    if not is_reply and has_reply_flag:
        raise ProtocolError(f"{name}: request with the REPLY flag set (flags {header.flags:#x})")
    if header.size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(
            f"{name}: payload size {header.size} exceeds the maximum {MAX_PAYLOAD_SIZE}"
        )


# --- request decoding: one rule per implemented request ----------------------------------

_Fds: TypeAlias = tuple[int, ...]
_PayloadCheck: TypeAlias = Callable[[str, bytes], None]  # (request name, payload)
_FdRule: TypeAlias = Callable[[bytes], range]  # payload (already checked) -> allowed fd counts
# (message class, payload, fds, need_reply) -> the message
_Build: TypeAlias = Callable[[Callable[..., "Message"], bytes, _Fds, bool], "Message"]


@dataclass(frozen=True)
class _Rule:
    """Decoding runs check (sizes, field ranges), then the fd rule, then build; build may
    therefore assume a well-sized payload and the right number of fds. The message
    class's request code is the rule's key."""

    message: Any  # the message class built (its ClassVar request keys the table)
    check: _PayloadCheck
    fds: _FdRule
    build: _Build


def _expect_size(name: str, payload: bytes, expected: int) -> None:
    if len(payload) != expected:
        raise ProtocolError(f"{name}: payload size {len(payload)}, expected {expected}")


def _expect_at_least(name: str, payload: bytes, minimum: int) -> None:
    if len(payload) < minimum:
        raise ProtocolError(f"{name}: payload size {len(payload)}, expected at least {minimum}")


def _fixed(size: int) -> _PayloadCheck:
    def check(name: str, payload: bytes) -> None:
        _expect_size(name, payload, size)

    return check


def _check_mem_table(name: str, payload: bytes) -> None:
    _expect_at_least(name, payload, _MEM_TABLE_HEAD.size)
    count, _padding = _MEM_TABLE_HEAD.unpack_from(payload)
    if not 1 <= count <= MEM_TABLE_MAX_REGIONS:
        raise ProtocolError(f"{name}: {count} regions, expected 1..{MEM_TABLE_MAX_REGIONS}")
    _expect_size(name, payload, _MEM_TABLE_HEAD.size + count * _REGION.size)


def _check_config(name: str, payload: bytes) -> None:
    _expect_at_least(name, payload, _CONFIG_HEAD.size)
    _offset, size, _flags = _CONFIG_HEAD.unpack_from(payload)
    if size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"{name}: config size {size} exceeds the maximum {MAX_CONFIG_SIZE}")
    _expect_size(name, payload, _CONFIG_HEAD.size + size)


def _check_vring_fd(name: str, payload: bytes) -> None:
    _expect_size(name, payload, _U64.size)
    (value,) = _U64.unpack(payload)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
        raise ProtocolError(f"{name}: payload {value:#x} has bits set beyond index and NOFD")


def _check_vring_enable(name: str, payload: bytes) -> None:
    _expect_size(name, payload, _VRING_STATE.size)
    _index, num = _VRING_STATE.unpack(payload)
    if num not in (0, 1):
        raise ProtocolError(f"{name}: enable value {num}, expected 0 or 1")


def _check_region(name: str, region: MemoryRegion) -> None:
    # Later layers compute region ends in u64 arithmetic (also in C); reject anything
    # that would wrap rather than let it alias low addresses.
    if region.memory_size == 0:
        raise ProtocolError(
            f"{name}: region at guest address {region.guest_phys_addr:#x} has memory_size 0"
        )
    for attr in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
        start: int = getattr(region, attr)
        if start + region.memory_size >= _U64_LIMIT:
            raise ProtocolError(
                f"{name}: region {attr} {start:#x} + memory_size "
                f"{region.memory_size:#x} overflows 64 bits"
            )


def _no_fds(payload: bytes) -> range:
    return range(1)


def _one_fd(payload: bytes) -> range:
    return range(1, 2)


def _zero_or_one_fd(payload: bytes) -> range:
    return range(2)


def _fd_per_region(payload: bytes) -> range:
    count, _padding = _MEM_TABLE_HEAD.unpack_from(payload)
    return range(count, count + 1)


def _fd_unless_nofd(payload: bytes) -> range:
    (value,) = _U64.unpack(payload)
    return range(1) if value & VRING_NOFD_MASK else range(1, 2)


def _describe(allowed: range) -> str:
    counts = [str(n) for n in allowed]
    return " or ".join(counts)


def _empty(make: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool) -> Message:
    return make(need_reply)


def _u64(make: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool) -> Message:
    (value,) = _U64.unpack(payload)
    return make(value, need_reply)


def _vring_state(
    make: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    index, num = _VRING_STATE.unpack(payload)
    return make(index, num, need_reply)


def _vring_fd(make: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool) -> Message:
    (value,) = _U64.unpack(payload)
    return make(
        value & VRING_INDEX_MASK,
        fds[0] if fds else None,
        need_reply,
    )


def _config(make: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool) -> Message:
    offset, size, flags = _CONFIG_HEAD.unpack_from(payload)
    return make(
        offset,
        size,
        flags,
        payload[_CONFIG_HEAD.size :],
        need_reply,
    )


def _read_region(name: str, payload: bytes, offset: int) -> MemoryRegion:
    region = MemoryRegion(*_REGION.unpack_from(payload, offset))
    _check_region(name, region)
    return region


def _build_get_vring_base(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    # num is meaningless in the request (QEMU sends 0); only the index matters.
    index, _num = _VRING_STATE.unpack(payload)
    return GetVringBase(index, need_reply)


def _build_vring_enable(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    index, num = _VRING_STATE.unpack(payload)
    return SetVringEnable(index, bool(num), need_reply)


def _build_vring_addr(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    index, flags, desc, used, avail, log = _VRING_ADDR.unpack(payload)
    return SetVringAddr(index, flags, desc, used, avail, log, need_reply)


def _build_mem_table(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    name = request_name(Request.SET_MEM_TABLE)
    regions = tuple(
        _read_region(name, payload, _MEM_TABLE_HEAD.size + i * _REGION.size)
        for i in range(len(fds))
    )
    return SetMemTable(regions, fds, need_reply)


def _build_add_mem_reg(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    region = _read_region(request_name(Request.ADD_MEM_REG), payload, _SINGLE_REGION_PAD.size)
    return AddMemReg(region, fds[0], need_reply)


def _build_get_inflight(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    _size, _offset, num_queues, queue_size = _INFLIGHT.unpack(payload)
    return GetInflightFd(num_queues, queue_size, need_reply)


def _build_set_inflight(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    size, offset, num_queues, queue_size = _INFLIGHT.unpack(payload)
    return SetInflightFd(size, offset, num_queues, queue_size, fds[0], need_reply)


def _build_rem_mem_reg(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    region = _read_region(request_name(Request.REM_MEM_REG), payload, _SINGLE_REGION_PAD.size)
    return RemMemReg(region, fds[0] if fds else None, need_reply)


def _build_log_base(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    size, offset = _LOG.unpack(payload)
    return SetLogBase(size, offset, fds[0] if fds else None, need_reply)


def _build_log_fd(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    return SetLogFd(fds[0], need_reply)


def _check_log_fd(name: str, payload: bytes) -> None:
    # The spec gives no payload; QEMU's ioctl-shaped message may carry a u64.
    if len(payload) not in (0, _U64.size):
        raise ProtocolError(f"{name}: payload size {len(payload)}, expected 0 or {_U64.size}")


def _build_rarp(
    _cls: Callable[..., Message], payload: bytes, fds: _Fds, need_reply: bool
) -> Message:
    return SendRarp(payload[:6], need_reply)


_SINGLE_REGION_SIZE: Final = _SINGLE_REGION_PAD.size + _REGION.size

# Requests not listed here decode to Unknown.
_RULES: Final[dict[int, _Rule]] = {
    rule.message.request: rule
    for rule in (
        _Rule(GetFeatures, _fixed(0), _no_fds, _empty),
        _Rule(SetFeatures, _fixed(_U64.size), _no_fds, _u64),
        _Rule(SetOwner, _fixed(0), _no_fds, _empty),
        _Rule(ResetOwner, _fixed(0), _no_fds, _empty),
        _Rule(SetMemTable, _check_mem_table, _fd_per_region, _build_mem_table),
        _Rule(SetVringNum, _fixed(_VRING_STATE.size), _no_fds, _vring_state),
        _Rule(SetVringAddr, _fixed(_VRING_ADDR.size), _no_fds, _build_vring_addr),
        _Rule(SetVringBase, _fixed(_VRING_STATE.size), _no_fds, _vring_state),
        _Rule(GetVringBase, _fixed(_VRING_STATE.size), _no_fds, _build_get_vring_base),
        _Rule(SetVringKick, _check_vring_fd, _fd_unless_nofd, _vring_fd),
        _Rule(SetVringCall, _check_vring_fd, _fd_unless_nofd, _vring_fd),
        _Rule(SetVringErr, _check_vring_fd, _fd_unless_nofd, _vring_fd),
        _Rule(GetProtocolFeatures, _fixed(0), _no_fds, _empty),
        _Rule(SetProtocolFeatures, _fixed(_U64.size), _no_fds, _u64),
        _Rule(GetQueueNum, _fixed(0), _no_fds, _empty),
        _Rule(SetVringEnable, _check_vring_enable, _no_fds, _build_vring_enable),
        _Rule(GetConfig, _check_config, _no_fds, _config),
        _Rule(SetConfig, _check_config, _no_fds, _config),
        _Rule(ResetDevice, _fixed(0), _no_fds, _empty),
        _Rule(GetMaxMemSlots, _fixed(0), _no_fds, _empty),
        _Rule(AddMemReg, _fixed(_SINGLE_REGION_SIZE), _one_fd, _build_add_mem_reg),
        _Rule(RemMemReg, _fixed(_SINGLE_REGION_SIZE), _zero_or_one_fd, _build_rem_mem_reg),
        _Rule(GetInflightFd, _fixed(_INFLIGHT.size), _no_fds, _build_get_inflight),
        _Rule(SetInflightFd, _fixed(_INFLIGHT.size), _one_fd, _build_set_inflight),
        _Rule(SetLogBase, _fixed(_LOG.size), _zero_or_one_fd, _build_log_base),
        _Rule(SetLogFd, _check_log_fd, _one_fd, _build_log_fd),
        _Rule(SendRarp, _fixed(_U64.size), _no_fds, _build_rarp),
    )
}


def _decode_message(header: _Header, payload: bytes, fds: _Fds) -> Message:
    """Pure: raises ProtocolError, never closes anything (that is the reader's job)."""
    name = request_name(header.request)
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise ProtocolError(f"{name}: {len(fds)} fds attached, more than {MAX_FDS_PER_MESSAGE}")
    need_reply = bool(header.flags & FLAG_NEED_REPLY)
    rule = _RULES.get(header.request)
    if rule is None:
        return Unknown(header.request, header.flags, payload, fds, need_reply)
    rule.check(name, payload)
    allowed = rule.fds(payload)
    if len(fds) not in allowed:
        raise ProtocolError(f"{name}: {len(fds)} fds attached, expected {_describe(allowed)}")
    return rule.build(rule.message, payload, fds, need_reply)


# --- reply decoding ----------------------------------------------------------------------


def _decode_reply(header: _Header, payload: bytes) -> Reply:
    name = request_name(header.request)
    if header.request == Request.GET_VRING_BASE:
        _expect_size(name, payload, _VRING_STATE.size)
        index, num = _VRING_STATE.unpack(payload)
        return VringStateReply(header.request, index, num)
    if header.request == Request.GET_CONFIG:
        if not payload:  # the spec's way for a back end to report failure
            return ConfigReply(header.request, 0, 0, 0, b"")
        _check_config(name, payload)
        offset, size, flags = _CONFIG_HEAD.unpack_from(payload)
        return ConfigReply(header.request, offset, size, flags, payload[_CONFIG_HEAD.size :])
    if header.request == Request.GET_INFLIGHT_FD:
        _expect_size(name, payload, _INFLIGHT.size)
        return InflightReply(header.request, *_INFLIGHT.unpack(payload))
    _expect_size(name, payload, _U64.size)
    (value,) = _U64.unpack(payload)
    return U64Reply(header.request, value)


# --- encoding ----------------------------------------------------------------------------


def _pack(fmt: struct.Struct, *values: int) -> bytes:
    try:
        return fmt.pack(*values)
    except struct.error as exc:
        raise ValueError(f"cannot encode {values}: {exc}") from None


def _pack_region(region: MemoryRegion) -> bytes:
    return _pack(
        _REGION,
        region.guest_phys_addr,
        region.memory_size,
        region.userspace_addr,
        region.mmap_offset,
    )


def _vring_fd_payload(index: int, fd: int | None) -> tuple[bytes, _Fds]:
    if fd is None:
        return _pack(_U64, index | VRING_NOFD_MASK), ()
    return _pack(_U64, index), (fd,)


def _encode_body(msg: Message) -> tuple[int, bytes, _Fds]:
    """(request code, payload, fds) for msg; no validation beyond field widths."""
    match msg:
        case GetFeatures():
            return msg.request, b"", ()
        case SetFeatures(features=features):
            return msg.request, _pack(_U64, features), ()
        case SetOwner():
            return msg.request, b"", ()
        case ResetOwner():
            return msg.request, b"", ()
        case SetMemTable(regions=regions, fds=fds):
            head = _pack(_MEM_TABLE_HEAD, len(regions), 0)
            return msg.request, head + b"".join(map(_pack_region, regions)), fds
        case SetVringNum(index=index, num=num):
            return msg.request, _pack(_VRING_STATE, index, num), ()
        case SetVringBase(index=index, num=num):
            return msg.request, _pack(_VRING_STATE, index, num), ()
        case GetVringBase(index=index):
            return msg.request, _pack(_VRING_STATE, index, 0), ()
        case SetVringEnable(index=index, enable=enable):
            return msg.request, _pack(_VRING_STATE, index, int(enable)), ()
        case SetVringAddr():
            payload = _pack(
                _VRING_ADDR,
                msg.index,
                msg.flags,
                msg.desc_user_addr,
                msg.used_user_addr,
                msg.avail_user_addr,
                msg.log_guest_addr,
            )
            return msg.request, payload, ()
        case SetVringKick(index=index, fd=fd):
            return (msg.request, *_vring_fd_payload(index, fd))
        case SetVringCall(index=index, fd=fd):
            return (msg.request, *_vring_fd_payload(index, fd))
        case SetVringErr(index=index, fd=fd):
            return (msg.request, *_vring_fd_payload(index, fd))
        case GetProtocolFeatures():
            return msg.request, b"", ()
        case SetProtocolFeatures(features=features):
            return msg.request, _pack(_U64, features), ()
        case GetQueueNum():
            return msg.request, b"", ()
        case GetMaxMemSlots():
            return msg.request, b"", ()
        case ResetDevice():
            return msg.request, b"", ()
        case GetConfig() | SetConfig():
            head = _pack(_CONFIG_HEAD, msg.offset, msg.size, msg.flags)
            return msg.request, head + bytes(msg.data), ()
        case AddMemReg(region=region, fd=fd):
            pad = _pack(_SINGLE_REGION_PAD, 0)
            return msg.request, pad + _pack_region(region), (fd,)
        case RemMemReg(region=region, fd=fd):
            pad = _pack(_SINGLE_REGION_PAD, 0)
            return msg.request, pad + _pack_region(region), (() if fd is None else (fd,))
        case GetInflightFd(num_queues=nq, queue_size=qs):
            return msg.request, _pack(_INFLIGHT, 0, 0, nq, qs), ()
        case SetInflightFd(mmap_size=size, mmap_offset=offset, num_queues=nq, queue_size=qs, fd=fd):
            return msg.request, _pack(_INFLIGHT, size, offset, nq, qs), (fd,)
        case SetLogBase(size=size, offset=offset, fd=fd):
            return msg.request, _pack(_LOG, size, offset), (() if fd is None else (fd,))
        case SetLogFd(fd=fd):
            return msg.request, b"", (fd,)
        case SendRarp(mac=mac):
            if len(mac) != 6:
                raise ValueError(f"cannot encode {msg!r}: a MAC is 6 bytes")
            return msg.request, bytes(mac) + b"\0\0", ()
        case Unknown(request=request, payload=payload, fds=fds):
            return request, bytes(payload), tuple(fds)
        case _:
            assert_never(msg)


def _message_flags(msg: Message) -> int:
    # Keep only an Unknown's reserved bits; version, REPLY and NEED_REPLY are ours to set.
    reserved = msg.flags if isinstance(msg, Unknown) else 0
    reserved &= ~(_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY)
    return VERSION | reserved | (FLAG_NEED_REPLY if msg.need_reply else 0)


def encode_message(msg: Message) -> tuple[bytes, list[int]]:
    """Front-end side: header + payload, and the fds to send with them (SCM_RIGHTS).

    Raises ValueError for a typed message that the decoder would not turn back into an
    equal message (field out of range, fd count not matching, config data length not
    equal to size, ...), so a test front end cannot send garbage by accident. Unknown is
    the deliberate escape hatch and is only checked for field widths.
    """
    code, payload, fds = _encode_body(msg)
    header = _Header(code, _message_flags(msg), len(payload))
    if not isinstance(msg, Unknown):
        try:
            decoded = _decode_message(header, payload, fds)
        except ProtocolError as exc:
            raise ValueError(f"cannot encode {msg!r}: {exc}") from None
        if decoded != msg:
            raise ValueError(f"cannot encode {msg!r}: it would decode as {decoded!r}")
    return _pack(_HEADER, header.request, header.flags, header.size) + payload, list(fds)


def _encode_reply_body(reply: Reply) -> bytes:
    match reply:
        case U64Reply(value=value):
            return _pack(_U64, value)
        case VringStateReply(index=index, num=num):
            return _pack(_VRING_STATE, index, num)
        case ConfigReply(offset=offset, size=size, flags=flags, data=data):
            return _pack(_CONFIG_HEAD, offset, size, flags) + bytes(data)
        case InflightReply():
            return _pack(
                _INFLIGHT, reply.mmap_size, reply.mmap_offset, reply.num_queues, reply.queue_size
            )
        case _:
            assert_never(reply)


def encode_reply(reply: Reply) -> bytes:
    """Back-end side. Raises ValueError for a reply the front end could not parse back
    (e.g. a U64Reply to GET_VRING_BASE, config data length not equal to size)."""
    payload = _encode_reply_body(reply)
    header = _Header(reply.request, VERSION | FLAG_REPLY, len(payload))
    try:
        _check_header(header, is_reply=True)
        decoded = _decode_reply(header, payload)
    except ProtocolError as exc:
        raise ValueError(f"cannot encode {reply!r}: {exc}") from None
    if decoded != reply:
        raise ValueError(f"cannot encode {reply!r}: it would decode as {decoded!r}")
    return _pack(_HEADER, header.request, header.flags, header.size) + payload


# --- stream readers ----------------------------------------------------------------------


class _Framer:
    """Byte buffer that cuts a stream into (header, payload) frames. Once it has raised a
    ProtocolError it stays failed: the stream position is lost, nothing after can be
    trusted."""

    def __init__(self, *, replies: bool) -> None:
        self._replies = replies
        self._buf = bytearray()
        self._start = 0  # stream offset of self._buf[0]
        self._error: str | None = None

    def _release(self) -> None:
        """Drop everything held; subclasses close their fds here."""
        self._buf.clear()

    def _fail(self, text: str) -> NoReturn:
        self._error = text
        self._release()
        raise ProtocolError(text)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"reader unusable after an earlier error: {self._error}")

    def _front_header(self) -> _Header | None:
        if len(self._buf) < HEADER_SIZE:
            return None
        header = _Header(*_HEADER.unpack_from(self._buf))
        try:
            _check_header(header, is_reply=self._replies)
        except ProtocolError as exc:
            self._fail(str(exc))
        return header

    def _append(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) <= _MAX_BUFFERED_BYTES:
            return
        header = self._front_header()
        if header is None or header.frame_size > len(self._buf):
            self._fail(f"{len(self._buf)} bytes buffered without a complete message")

    def _take_frame(self) -> tuple[_Header, bytes] | None:
        header = self._front_header()
        if header is None or len(self._buf) < header.frame_size:
            return None
        payload = bytes(self._buf[HEADER_SIZE : header.frame_size])
        del self._buf[: header.frame_size]
        self._start += header.frame_size
        return header, payload


class MessageReader(_Framer):
    """Back-end side decoder for the front end's requests.

    Feed it what each recvmsg returned, then call next_message until it returns None.
    """

    def __init__(self) -> None:
        super().__init__(replies=False)
        # (stream offset of the last byte received with them, fds), in stream order
        self._fd_groups: deque[tuple[int, _Fds]] = deque()

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Buffer `data`; `fds` arrived with it and belong to the message that covers the
        LAST byte of `data` (the next byte of the stream if `data` is empty). That is how
        Linux delivers a unix stream: one recvmsg may glue fd-less messages in front of a
        message that carries fds, but it always stops right after (or inside) the first
        piece that carries fds. The reader owns the fds from here on, even if this call
        raises."""
        if self._error is not None:
            close_all(fds)
            self._check_alive()
        if fds:
            group = tuple(fds)
            last = self._start + len(self._buf) + max(len(data), 1) - 1
            self._fd_groups.append((last, group))
            if len(group) > MAX_FDS_PER_MESSAGE:
                self._fail(f"{len(group)} fds received at once, more than {MAX_FDS_PER_MESSAGE}")
        self._append(data)
        # Catch fd flooding before the message completes, as _append does for bytes.
        pending = self._front_fd_count()
        if pending > MAX_FDS_PER_MESSAGE:
            self._fail(f"{pending} fds attached to one message, more than {MAX_FDS_PER_MESSAGE}")

    def next_message(self) -> Message | None:
        """The next complete message, or None if more bytes are needed."""
        self._check_alive()
        frame = self._take_frame()
        if frame is None:
            return None
        header, payload = frame
        fds = self._pop_fds(before=self._start)
        try:
            return _decode_message(header, payload, fds)
        except ProtocolError as exc:
            close_all(fds)
            self._fail(str(exc))

    def close(self) -> None:
        """Close every fd still held; the reader is unusable afterwards."""
        self._release()
        if self._error is None:
            self._error = "reader was closed"

    def _release(self) -> None:
        super()._release()
        while self._fd_groups:
            close_all(self._fd_groups.popleft()[1])

    def _pop_fds(self, *, before: int) -> _Fds:
        fds: list[int] = []
        while self._fd_groups and self._fd_groups[0][0] < before:
            fds.extend(self._fd_groups.popleft()[1])
        return tuple(fds)

    def _front_fd_count(self) -> int:
        # Raw size on purpose: header validation is next_message's job, and an absurd
        # size only makes the front message look bigger.
        if len(self._buf) >= HEADER_SIZE:
            (size,) = struct.unpack_from("<I", self._buf, 8)
            end = self._start + HEADER_SIZE + size
        else:
            end = self._start + HEADER_SIZE  # fds so far all fall inside the first header
        return sum(len(group) for offset, group in self._fd_groups if offset < end)


class ReplyReader(_Framer):
    """Front-end side decoder for the back end's replies. The one reply that carries an fd
    (GET_INFLIGHT_FD) decodes with fd=None: the caller attaches what recvmsg gave it."""

    def __init__(self) -> None:
        super().__init__(replies=True)

    def feed(self, data: bytes) -> None:
        self._check_alive()
        self._append(data)

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None if more bytes are needed."""
        self._check_alive()
        frame = self._take_frame()
        if frame is None:
            return None
        header, payload = frame
        try:
            return _decode_reply(header, payload)
        except ProtocolError as exc:
            self._fail(str(exc))
