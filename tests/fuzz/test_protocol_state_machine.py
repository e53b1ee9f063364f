"""Protocol fuzzing without a socket: a hypothesis state machine feeds bytes and fds to
the sans-IO reader (vhost.protocol.MessageReader) and hands what it decodes to a
vhost.session.Session on a real BlkDevice, with real memfd guest RAM and real eventfds,
the way vhost/server.py does for one connection.

Rules: well-formed requests in any order (features, memory tables, rings with good and
bad sizes and addresses, kick/call/err fds, enable, GET_VRING_BASE, resets, config),
mutated frames (bit flips, truncation, bad sizes, 0..10 fds, unknown codes, replies sent
as requests, splices), bursts cut into random chunks, kicks, garbage written into the
rings of running queues, disconnects, and a full correct setup with verified I/O on a
fresh session (the device must not have been damaged by what came before).

Invariants, after every step:
* the only exception out of the reader is ProtocolError (the connection is then
  dropped: reader and session closed, a new pair made, as the server does); after one,
  the reader stays failed; Session.handle never raises;
* a reply comes exactly for GET_* requests and need_reply, for the request's code and
  of the right type, and it encodes and decodes back to itself;
* every fd is accounted for: the open fds are exactly those open at the start, the
  front end's own, those the session holds (kick/call/err/stop of its queues) and those
  the reader holds for an incomplete message: nothing leaked, nothing closed twice;
* threads beyond the start are the current session's queue workers.
At the end of each run, with everything closed, fds and threads are back to the start;
no log record carries a traceback.

CI budget: CI_EXAMPLES runs (about 10 s); ``--fuzz-minutes N`` runs for N minutes. The
summary line (runs, steps, frames, messages, replies, errors by kind) is printed.
"""

from __future__ import annotations

import bisect
import dataclasses
import faulthandler
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from devices.blk import BlkDevice, BlkOptions
from tests.fuzz.messages import (
    MEMFD_SIZE,
    DrawSource,
    FdFactory,
    Frame,
    Source,
    Target,
    any_frame,
    error_kind,
    mutate,
    request_code,
    setup_frames,
    valid_frame,
)
from tests.support.blk import BlkDriver
from tests.support.frontend import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    DriverQueue,
    GuestRam,
    MiB,
)
from vhost import protocol as p
from vhost.session import OFFERED_PROTOCOL_FEATURES, Session

NUM_QUEUES = 2
IMAGE_SIZE = 16 * MiB
RAM_SIZE = 8 * MiB
RAM_REGIONS = 2
CI_EXAMPLES = 50
STEPS = 40
SECTOR = 512
_THREAD_SETTLE = 2.0  # seconds a joined thread may linger in /proc/self/task


# --- process resources ---------------------------------------------------------------------


def open_fds() -> set[int]:
    """The fds open in this process (the one os.listdir used is closed again by then)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


def describe_fds(fds: set[int]) -> str:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd}->(closed)")
    return ", ".join(out)


def task_count() -> int:
    return len(os.listdir("/proc/self/task"))


def settle_tasks(expect: int) -> int:
    deadline = time.monotonic() + _THREAD_SETTLE
    while (n := task_count()) != expect and time.monotonic() < deadline:
        time.sleep(0.005)
    return n


def big_ram() -> GuestRam:
    """Guest RAM whose memfd reaches as far as any mapping can (see messages.MEMFD_SIZE)."""
    ram = GuestRam(RAM_SIZE, RAM_REGIONS, name="fuzz-ram")
    os.ftruncate(ram.fd, MEMFD_SIZE)
    return ram


# --- counts and the log -----------------------------------------------------------------------


@dataclass
class Stats:
    runs: int = 0
    steps: int = 0
    running_steps: int = 0  # steps that ended with a queue worker running
    frames: int = 0
    bytes: int = 0
    fds: int = 0
    messages: int = 0
    replies: int = 0
    reconnects: int = 0
    io_checks: int = 0
    failed_acks: Counter[str] = field(default_factory=Counter)
    protocol_errors: Counter[str] = field(default_factory=Counter)
    frame_kinds: Counter[str] = field(default_factory=Counter)
    log_levels: Counter[str] = field(default_factory=Counter)

    def line(self, elapsed: float) -> str:
        top = "; ".join(f"{n}x {k}" for k, n in self.protocol_errors.most_common(6))
        acks = ", ".join(f"{k} {n}" for k, n in self.failed_acks.most_common(6))
        return (
            f"protocol state machine: {elapsed:.1f}s, {self.runs} runs, {self.steps} steps "
            f"({self.running_steps} with a queue running), "
            f"{self.frames} frames ({self.bytes} bytes, {self.fds} fds), {self.messages} "
            f"messages handled, {self.replies} replies, {self.reconnects} reconnects, "
            f"{self.io_checks} verified fresh-session I/O checks; "
            f"{sum(self.protocol_errors.values())} ProtocolError "
            f"({len(self.protocol_errors)} kinds; top: {top}); session refusals "
            f"{sum(self.failed_acks.values())} ({acks}); log {dict(self.log_levels)}"
        )


class LogTap(logging.Handler):
    """Formats every record the back end logs (a bad format string shows up here, not
    on a console) and counts them; keeps any that carries a traceback."""

    def __init__(self, stats: Stats) -> None:
        super().__init__(logging.DEBUG)
        self.stats = stats
        self.tracebacks: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.stats.log_levels[record.levelname] += 1
        if record.exc_info or "Traceback" in text:
            self.tracebacks.append(text)

    def handleError(self, record: logging.LogRecord) -> None:
        self.tracebacks.append(
            f"log record could not be formatted: {record.msg!r} % {record.args!r}"
        )


@contextmanager
def tap_log(stats: Stats) -> Iterator[LogTap]:
    logger = logging.getLogger("vhost")
    tap = LogTap(stats)
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # thousands of expected ERROR lines: counted, not captured
    logger.addHandler(tap)
    try:
        yield tap
    finally:
        logger.removeHandler(tap)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# --- the oracle for replies --------------------------------------------------------------


def expects_reply(msg: p.Message, code: int) -> bool:
    """GET_* requests the codec decodes always get their reply; anything else (requests
    passed through as Unknown included: their reply format is unknown) gets one only
    when need_reply asks for an ack."""
    if msg.need_reply:
        return True
    return not isinstance(msg, p.Unknown) and p.request_name(code).startswith("GET_")


def check_reply(msg: p.Message, reply: p.Reply | None) -> bool:
    """Assert the reply is the one the spec calls for; True if it is a refusal."""
    code = request_code(msg)
    if not expects_reply(msg, code):
        assert reply is None, f"reply {reply!r} to {msg!r}, which asks for none"
        return False
    assert reply is not None, f"no reply to {msg!r}"
    assert int(reply.request) == code, f"reply {reply!r} to request {code} ({msg!r})"
    wire = p.encode_reply(reply)  # ValueError here is a finding: QEMU could not parse it
    back = p.ReplyReader()
    back.feed(wire)
    assert back.next_reply() == reply, (reply, wire)
    assert back.next_reply() is None
    if isinstance(msg, p.GetVringBase):
        assert isinstance(reply, p.VringStateReply) and reply.index == msg.index, reply
    elif isinstance(msg, p.GetConfig):
        assert isinstance(reply, p.ConfigReply), reply
        assert reply.size in (0, msg.size) and len(reply.data) == reply.size, reply
        return reply.size == 0
    elif isinstance(msg, p.GetInflightFd):
        assert isinstance(reply, p.InflightReply), reply
        if reply.mmap_size == 0:
            assert reply.fd is None, reply
            return True
        assert reply.fd is not None and os.fstat(reply.fd).st_size >= reply.mmap_size, reply
        assert (reply.num_queues, reply.queue_size) == (msg.num_queues, msg.queue_size), reply
    elif expects_reply(dataclasses.replace(msg, need_reply=False), code):
        assert isinstance(reply, p.U64Reply), reply
    else:
        assert isinstance(reply, p.U64Reply) and reply.value in (0, 1), reply
        return reply.value != 0
    return False


# --- the machine -----------------------------------------------------------------------------


def _chunks(
    frames: Sequence[Frame], src: Source, chunked: bool, misplace: bool
) -> list[tuple[bytes, list[str]]]:
    """Cut the frames' bytes into pieces, each with the kinds of fds that arrive with it:
    a frame's fds come with the piece that ends with its last byte (a recvmsg on a unix
    stream stops there), or with any piece when `misplace`."""
    stream = b"".join(f.data for f in frames)
    cuts: set[int] = set()
    if chunked and len(stream) > 1:
        for _ in range(src.between(1, 6)):
            cuts.add(src.between(1, len(stream) - 1))
    if not misplace:  # a recvmsg ends where the bytes that came with fds end
        end = 0
        for f in frames:
            end += len(f.data)
            if f.fds and 0 < end < len(stream):
                cuts.add(end)
    starts = [0, *sorted(cuts)]
    pieces: list[tuple[bytes, list[str]]] = [
        (stream[a:b], []) for a, b in zip(starts, [*starts[1:], len(stream)], strict=False)
    ]
    end = 0
    for f in frames:
        end += len(f.data)
        if not f.fds:
            continue
        if misplace:
            k = src.between(0, len(pieces) - 1)
        elif f.data:
            k = bisect.bisect_right(starts, end - 1) - 1
        else:  # no bytes: the fds come alone, or with the next byte
            k = bisect.bisect_right(starts, end) - 1
            if end == len(stream):
                pieces.append((b"", []))
                k = len(pieces) - 1
        pieces[k][1].extend(f.fds)
    return pieces


class ProtocolMachine(RuleBasedStateMachine):
    device: ClassVar[BlkDevice]
    stats: ClassVar[Stats]

    def __init__(self) -> None:
        super().__init__()
        self.stats.runs += 1
        self.base_fds = open_fds()
        self.base_threads = set(threading.enumerate())
        self.base_tasks = task_count()
        self.ram = big_ram()
        self.ram_fds = open_fds() - self.base_fds  # its memfd and the mmap's own copy
        self.target = Target.build(
            self.ram, NUM_QUEUES, self.device.features, int(OFFERED_PROTOCOL_FEATURES)
        )
        self.fds = FdFactory(self.ram.fd)
        self.drivers: list[BlkDriver] = []
        self.connections = 0
        self.session, self.reader = self._connect()

    # --- connection ---
    def _connect(self) -> tuple[Session, p.MessageReader]:
        self.connections += 1
        return (
            Session(self.device, f"fuzz{self.stats.runs}.{self.connections}"),
            p.MessageReader(),
        )

    def _reconnect(self) -> None:
        """What the server does when a connection ends."""
        self.reader.close()
        self.session.close()
        self.stats.reconnects += 1
        self.check_fds(session_open=False)
        leftover = [t for t in threading.enumerate() if t not in self.base_threads]
        assert not leftover, f"threads left after the session closed: {leftover}"
        self.session, self.reader = self._connect()

    # --- feeding ---
    def deliver(
        self, frames: Sequence[Frame], src: Source, *, chunked: bool = False, misplace: bool = False
    ) -> None:
        for f in frames:
            self.stats.frame_kinds[f.label] += 1
        self.stats.frames += len(frames)
        for data, kinds in _chunks(frames, src, chunked, misplace):
            fds = [self.fds.make(k) for k in kinds]
            self.stats.bytes += len(data)
            self.stats.fds += len(fds)
            try:
                self.reader.feed(data, fds)
            except p.ProtocolError as e:
                self._protocol_error(e)
                return
            if not self._drain():
                return

    def _drain(self) -> bool:
        while True:
            try:
                msg = self.reader.next_message()
            except p.ProtocolError as e:
                self._protocol_error(e)
                return False
            if msg is None:
                return True
            self.stats.messages += 1
            reply = self.session.handle(msg)  # must not raise
            if reply is not None:
                self.stats.replies += 1
            if check_reply(msg, reply):
                self.stats.failed_acks[p.request_name(request_code(msg)).split("(")[0]] += 1

    def _protocol_error(self, e: p.ProtocolError) -> None:
        self.stats.protocol_errors[error_kind(e)] += 1
        with pytest.raises(p.ProtocolError):  # a failed reader stays failed
            self.reader.next_message()
        self._reconnect()

    def exchange(self, msg: p.Message, fds: Sequence[int] = ()) -> p.Reply | None:
        """One well-formed request, with copies of `fds` (as SCM_RIGHTS would make)."""
        data, placeholders = p.encode_message(msg)
        assert len(placeholders) == len(fds)
        self.reader.feed(data, [os.dup(fd) for fd in fds])
        got = self.reader.next_message()
        assert got is not None and self.reader.next_message() is None
        reply = self.session.handle(got)
        check_reply(got, reply)
        return reply

    # --- rules ---
    @rule(data=st.data())
    def send_valid(self, data: st.DataObject) -> None:
        src = DrawSource(data)
        self.deliver([valid_frame(src, self.target)], src)

    @rule(data=st.data())
    def send_mutated(self, data: st.DataObject) -> None:
        src = DrawSource(data)
        self.deliver([mutate(src, valid_frame(src, self.target), self.target)], src)

    @rule(data=st.data())
    def send_burst(self, data: st.DataObject) -> None:
        """Several frames in one stream, cut anywhere; fds sometimes on the wrong piece."""
        src = DrawSource(data)
        frames = [any_frame(src, self.target) for _ in range(src.between(2, 6))]
        self.deliver(frames, src, chunked=True, misplace=src.chance(10))

    @rule(data=st.data())
    def setup_then_garbage(self, data: st.DataObject) -> None:
        """A correct setup of some queues (so workers run), then anything."""
        src = DrawSource(data)
        queues = [i for i in range(NUM_QUEUES) if src.chance(70)] or [0]
        frames = setup_frames(self.target, queues, need_reply=src.chance(50))
        frames = frames[: src.between(1, len(frames))] if src.chance(30) else frames
        frames += [any_frame(src, self.target, 60) for _ in range(src.between(0, 4))]
        self.deliver(frames, src, chunked=src.chance(30))

    @rule(data=st.data())
    def kick(self, data: st.DataObject) -> None:
        src = DrawSource(data)
        for _ in range(src.between(1, 3)):
            self.fds.poke(src)
        for d in self.drivers:
            if d.queue.kick_fd >= 0:
                d.queue.kick()

    @rule(data=st.data())
    def scribble_on_rings(self, data: st.DataObject) -> None:
        """Garbage in a ring a worker may be serving, then kick every queue."""
        src = DrawSource(data)
        areas: list[tuple[int, int]] = []  # (front-end virtual address, bytes)
        for a in self.target.rings:
            areas += [(a.desc, 16 * 16), (a.avail, 6 + 2 * 16), (a.used, 6 + 8 * 16)]
        for d in self.drivers:
            q = d.queue
            areas += [
                (self.ram.uva_of(q.desc_gpa), 16 * q.num),
                (self.ram.uva_of(q.avail_gpa), 4 + 2 * q.num),
            ]
        uva, size = src.pick(areas)
        offset = src.between(0, size - 1)
        garbage = src.bytes(src.between(1, min(16, size - offset)))
        self.ram.write(self._gpa_of(uva) + offset, garbage)
        if src.chance(50):  # the driver claims to have made buffers available
            for a in self.target.rings:
                self.ram.write_u16(
                    self._gpa_of(a.avail) + 2,
                    src.pick((1, 2, 16, 17, 0xFFFF, src.between(0, 0xFFFF))),
                )
        for _ in range(4):
            self.fds.poke(src)
        for d in self.drivers:
            if d.queue.kick_fd >= 0:
                d.queue.kick()

    def _gpa_of(self, uva: int) -> int:
        region = next(r for r in self.ram.layout if r.uva <= uva < r.uva + r.size)
        return region.gpa + (uva - region.uva)

    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        if DrawSource(data).chance(30):  # rarer than the other rules: states get deeper
            self._reconnect()

    @rule(data=st.data())
    def fresh_session_io(self, data: st.DataObject) -> None:
        """A new connection, set up correctly: verified I/O must work."""
        src = DrawSource(data)
        if not src.chance(40):
            return
        self._reconnect()
        verified_io(self, random.Random(src.between(0, 2**32)), keep_running=src.chance(70))
        self.stats.io_checks += 1

    # --- invariants ---
    def session_fds(self) -> set[int]:
        held: set[int] = set()
        if self.session._offered_inflight_fd is not None:  # white box, as below
            held.add(self.session._offered_inflight_fd)
        for q in self.session.queues:
            held |= {fd for fd in (q.kick_fd, q.call_fd, q.err_fd) if fd is not None}
            if q.handle.stop_fd >= 0:
                held.add(q.handle.stop_fd)
        return held

    def reader_fds(self) -> set[int]:
        # White box: the reader's fds for a message not complete yet.
        return {fd for _, group in self.reader._fd_groups for fd in group}

    def frontend_fds(self) -> set[int]:
        own = self.ram_fds | set(self.fds.kept)
        for d in self.drivers:
            own |= {fd for fd in (d.queue.kick_fd, d.queue.call_fd) if fd >= 0}
        return own

    def check_fds(self, session_open: bool = True) -> None:
        expect = self.base_fds | self.frontend_fds()
        if session_open:
            expect |= self.session_fds() | self.reader_fds()
        actual = open_fds()
        if session_open and self.session._inflight is not None:
            # The attached inflight region is a Python mmap, which keeps a copy of the fd
            # it mapped: one more fd, which only the file it points to can name.
            unnamed = actual - expect
            assert len(unnamed) == 1, describe_fds(unnamed)
            assert "memfd:" in describe_fds(unnamed), describe_fds(unnamed)
            expect |= unnamed
        assert actual == expect, (
            f"fds leaked: {describe_fds(actual - expect)}; "
            f"fds closed under their owner: {describe_fds(expect - actual)}"
        )

    @invariant()
    def fds_accounted_for(self) -> None:
        self.stats.steps += 1
        self.stats.running_steps += any(q.running for q in self.session.queues)
        self.check_fds()

    @invariant()
    def threads_are_this_sessions_workers(self) -> None:
        extra = [t for t in threading.enumerate() if t not in self.base_threads]
        assert all(t.name.startswith(f"{self.session.name}/vq") for t in extra), extra
        assert len(extra) <= NUM_QUEUES, extra

    def teardown(self) -> None:
        self.reader.close()
        self.session.close()
        for d in self.drivers:
            d.queue.close()
        self.fds.close()
        self.ram.close()
        assert open_fds() == self.base_fds, describe_fds(open_fds() ^ self.base_fds)
        assert settle_tasks(self.base_tasks) == self.base_tasks


def verified_io(m: ProtocolMachine, rng: random.Random, keep_running: bool = False) -> None:
    """On m's (fresh) session: QEMU's setup of queue 0, then a write and a read of random
    data, checked in guest memory and in the image; GET_VRING_BASE says 2 requests."""
    ex = m.exchange
    offered = ex(p.GetFeatures())
    assert isinstance(offered, p.U64Reply)
    pf = ex(p.GetProtocolFeatures())
    assert isinstance(pf, p.U64Reply)
    ex(
        p.SetProtocolFeatures(
            pf.value
            & int(p.ProtocolFeature.REPLY_ACK | p.ProtocolFeature.MQ | p.ProtocolFeature.CONFIG)
        )
    )
    # LOG_ALL only while migrating, as QEMU does: with it and no log, queues wait
    features = offered.value & ~p.VHOST_F_LOG_ALL
    if rng.random() < 0.5:
        features &= ~(1 << VIRTIO_RING_F_EVENT_IDX)
    if rng.random() < 0.3:
        features &= ~(1 << VIRTIO_RING_F_INDIRECT_DESC)
    acks = [ex(p.SetOwner(True)), ex(p.SetFeatures(features, True))]
    if pf.value & p.ProtocolFeature.INFLIGHT_SHMFD and rng.random() < 0.5:
        # QEMU's order: protocol features with INFLIGHT_SHMFD, then GET_INFLIGHT_FD and
        # SET_INFLIGHT_FD (with the fd it got) before the rings start.
        ex(
            p.SetProtocolFeatures(
                pf.value
                & int(
                    p.ProtocolFeature.REPLY_ACK
                    | p.ProtocolFeature.MQ
                    | p.ProtocolFeature.CONFIG
                    | p.ProtocolFeature.INFLIGHT_SHMFD
                )
            )
        )
        got = ex(p.GetInflightFd(NUM_QUEUES, 16))
        assert isinstance(got, p.InflightReply) and got.fd is not None, got
        acks.append(
            ex(
                p.SetInflightFd(
                    got.mmap_size, got.mmap_offset, got.num_queues, got.queue_size, 0, True
                ),
                [got.fd],
            )
        )
    regions = tuple(m.ram.regions())
    acks.append(
        ex(p.SetMemTable(regions, tuple(range(len(regions))), True), [m.ram.fd] * len(regions))
    )
    q = DriverQueue(m.ram, 16, bool(features & (1 << VIRTIO_RING_F_EVENT_IDX)))
    drv = BlkDriver(q)
    m.drivers.append(drv)
    uva = m.ram.uva_of
    acks += [
        ex(p.SetVringNum(0, q.num, True)),
        ex(p.SetVringBase(0, 0, True)),
        ex(p.SetVringAddr(0, 0, uva(q.desc_gpa), uva(q.used_gpa), uva(q.avail_gpa), 0, True)),
        ex(p.SetVringKick(0, 0, True), [q.kick_fd]),
        ex(p.SetVringCall(0, 0, True), [q.call_fd]),
        ex(p.SetVringEnable(0, True, True)),
    ]
    assert all(a == p.U64Reply(a.request, 0) for a in acks if a is not None), acks
    nbytes = SECTOR * rng.randint(1, 16)
    sector = rng.randrange(IMAGE_SIZE // SECTOR - 16)
    payload = rng.randbytes(nbytes)
    indirect = bool(features & (1 << VIRTIO_RING_F_INDIRECT_DESC)) and rng.random() < 0.5
    assert drv.write(sector, payload, segs=rng.randint(1, 3), indirect=indirect) == 0
    assert drv.read(sector, nbytes, segs=rng.randint(1, 3)) == payload
    assert os.pread(m.device.fd, nbytes, sector * SECTOR) == payload
    if not keep_running:
        base = ex(p.GetVringBase(0))
        assert base == p.VringStateReply(p.Request.GET_VRING_BASE, 0, 2), base


# --- the tests --------------------------------------------------------------------------


@pytest.fixture
def blk_device(tmp_path: Path) -> Iterator[BlkDevice]:
    device = BlkDevice(
        BlkOptions(str(tmp_path / "fuzz.img"), size=IMAGE_SIZE, num_queues=NUM_QUEUES)
    )
    yield device
    device.close()


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=STEPS,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def test_protocol_state_machine(
    blk_device: BlkDevice, fuzz_minutes: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_fds, start_tasks = open_fds(), task_count()
    stats = ProtocolMachine.stats = Stats()
    ProtocolMachine.device = blk_device
    budget = fuzz_minutes * 60
    # A hang (a worker that never stops, a join that never returns) must fail, not stall
    # CI: after budget + 10 minutes the process exits with the stacks in this file.
    hang_report = open(tmp_path / "hang-tracebacks.txt", "w")  # noqa: SIM115
    faulthandler.dump_traceback_later(budget + 600, exit=True, file=hang_report)
    t0 = time.monotonic()
    try:
        with tap_log(stats) as tap:
            if budget:
                while time.monotonic() - t0 < budget:
                    run_state_machine_as_test(  # type: ignore[no-untyped-call]
                        ProtocolMachine, settings=fuzz_settings(100)
                    )
            else:
                run_state_machine_as_test(  # type: ignore[no-untyped-call]
                    ProtocolMachine, settings=fuzz_settings(CI_EXAMPLES)
                )
    finally:
        faulthandler.cancel_dump_traceback_later()
        hang_report.close()
        with capsys.disabled():
            print(f"\n{stats.line(time.monotonic() - t0)}")
    assert not tap.tracebacks, "\n".join(tap.tracebacks[:5])
    assert stats.io_checks > 0 and stats.messages > 0
    # The device is still good for a well-behaved front end, and nothing was left behind.
    ProtocolMachine.stats = Stats()
    m = ProtocolMachine()
    try:
        verified_io(m, random.Random(1))
    finally:
        m.teardown()
    assert open_fds() == start_fds
    assert settle_tasks(start_tasks) == start_tasks


# --- findings -----------------------------------------------------------------------------


def test_kick_fd_that_is_always_readable_does_not_spin(
    blk_device: BlkDevice, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"not an eventfd")
    ram = GuestRam(RAM_SIZE, 1)
    session = Session(blk_device, "spin")
    q = DriverQueue(ram, 16)
    try:
        uva = ram.uva_of
        for msg in (
            p.SetFeatures(blk_device.features),  # rings start enabled
            p.SetMemTable(tuple(ram.regions()), (os.dup(ram.fd),)),
            p.SetVringNum(0, 16),
            p.SetVringAddr(0, 0, uva(q.desc_gpa), uva(q.used_gpa), uva(q.avail_gpa), 0),
            p.SetVringKick(0, os.open(plain, os.O_RDONLY | os.O_CLOEXEC)),
        ):
            assert session.handle(msg) is None
        # Either refuse such a kick fd, or do not count a wake-up that read nothing.
        time.sleep(0.2)
        assert session.stats()[0]["kicks"] < 100, session.stats()[0]
    finally:
        session.close()
        q.close()
        ram.close()
