"""One front-end connection's state machine: features, memory, queues.

``Session.handle`` takes a typed message from vhost.protocol and returns the
reply to send (or None). It applies the message to the guest memory map and
the virtqueues and starts/stops queue workers as their state allows. No
sockets here: the server moves bytes and fds, and tests drive a session with
messages directly.

Fds that arrive in messages become the session's: it keeps them (kick, call,
err) or closes them (memory fds once mapped, unwanted extras) before
``handle`` returns. ``close()`` stops every queue, unmaps memory and closes
every fd it holds.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from vhost import limits
from vhost import protocol as p
from vhost._native import ffi, lib
from vhost.device import Device
from vhost.dirtylog import DirtyLog, DirtyLogError, log_bytes_for
from vhost.fds import close_all
from vhost.memory import GuestMemory, GuestMemoryError, Region
from vhost.virtqueue import MAX_QUEUE_SIZE, Virtqueue, VirtqueueError

if TYPE_CHECKING:
    from vhost._native import CData, vu_log

log = logging.getLogger("vhost.session")

OFFERED_PROTOCOL_FEATURES = (
    p.ProtocolFeature.MQ
    | p.ProtocolFeature.LOG_SHMFD
    | p.ProtocolFeature.REPLY_ACK
    | p.ProtocolFeature.CONFIG
    | p.ProtocolFeature.CONFIGURE_MEM_SLOTS
    | p.ProtocolFeature.RESET_DEVICE
)
MAX_MEM_SLOTS = limits.MAX_MEM_SLOTS


class SessionError(Exception):
    """A message the session cannot apply; answered with a failure, session goes on."""


class Session:
    def __init__(self, device: Device, name: str = "session") -> None:
        self.device = device
        self.name = name
        self.memory = GuestMemory()
        self.queues = [
            Virtqueue(i, f"{name}/vq{i}", device.errors) for i in range(device.num_queues)
        ]
        for q in self.queues:
            q.untaken_is_normal = device.buffers_wait_for_data(q.index)
        self.features = 0
        self.protocol_features = 0
        self.closed = False
        self._inflight: tuple[mmap.mmap, CData] | None = None
        self._offered_inflight_fd: int | None = None
        self.dirty_log: DirtyLog | None = None
        self._log_call_fd: int | None = None

    # --- entry point ---
    def handle(self, msg: p.Message) -> p.Reply | None:
        """Apply one message; return the reply to send, if any."""
        request = msg.request
        log.debug("%s: <- %r", self.name, msg)
        try:
            reply = self._dispatch(msg)
            ok = True
        except (SessionError, GuestMemoryError, VirtqueueError, DirtyLogError, ValueError) as e:
            log.error("%s: %s failed: %s", self.name, p.request_name(request), e)
            reply, ok = self._failure_reply(msg), False
        if reply is None and msg.need_reply:
            # REPLY_ACK: 0 for success, non-zero for failure.
            reply = p.U64Reply(request, 0 if ok else 1)
        return reply

    def _failure_reply(self, msg: p.Message) -> p.Reply | None:
        if isinstance(msg, p.GetConfig):
            return p.ConfigReply(p.Request.GET_CONFIG, 0, 0, 0, b"")
        if isinstance(msg, p.GetVringBase):
            return p.VringStateReply(p.Request.GET_VRING_BASE, msg.index, 0)
        if isinstance(msg, p.GetInflightFd):
            # mmap_size 0: QEMU goes on without inflight tracking
            return p.InflightReply(p.Request.GET_INFLIGHT_FD, 0, 0, 0, 0)
        if isinstance(msg, p.SetLogBase):
            return p.U64Reply(p.Request.SET_LOG_BASE, 1)  # QEMU waits for a reply
        return None

    def _dispatch(self, msg: p.Message) -> p.Reply | None:
        match msg:
            case p.GetFeatures():
                return p.U64Reply(p.Request.GET_FEATURES, self.offered_features)
            case p.SetFeatures(features=f):
                self._set_features(f)
            case p.SetOwner():
                pass
            case p.ResetOwner() | p.ResetDevice():
                self._reset()
            case p.GetProtocolFeatures():
                return p.U64Reply(p.Request.GET_PROTOCOL_FEATURES, self.offered_protocol_features)
            case p.SetProtocolFeatures(features=f):
                if f & ~self.offered_protocol_features:
                    raise SessionError(
                        f"protocol features {f:#x} include bits not offered "
                        f"({f & ~self.offered_protocol_features:#x})"
                    )
                self.protocol_features = f
            case p.GetQueueNum():
                return p.U64Reply(p.Request.GET_QUEUE_NUM, self.device.queue_num_reply)
            case p.GetMaxMemSlots():
                return p.U64Reply(p.Request.GET_MAX_MEM_SLOTS, MAX_MEM_SLOTS)
            case p.SetMemTable(regions=regions, fds=fds):
                self._set_mem_table(regions, fds)
            case p.AddMemReg(region=region, fd=fd):
                self._change_memory(lambda: self.memory.add(_region(region), fd), [fd])
            case p.RemMemReg(region=region, fd=fd):
                self._change_memory(lambda: self.memory.remove(_region(region)), [fd])
            case p.SetVringNum(index=i, num=n):
                self._reconfigure(self._queue(i), lambda q: q.set_num(n))
            case p.SetVringAddr(index=i, flags=flags):
                log_used = msg.log_guest_addr if flags & lib.VHOST_VRING_F_LOG else None
                self._reconfigure(
                    self._queue(i),
                    lambda q: q.set_rings(
                        msg.desc_user_addr, msg.avail_user_addr, msg.used_user_addr, log_used
                    ),
                )
            case p.SetVringBase(index=i, num=n):
                self._reconfigure(self._queue(i), lambda q: q.set_base(n))
            case p.GetVringBase(index=i):
                return self._get_vring_base(i)
            case p.SetVringKick(index=i, fd=fd):
                self._set_queue_fd(i, fd, Virtqueue.set_kick)
            case p.SetVringCall(index=i, fd=fd):
                self._set_queue_fd(i, fd, Virtqueue.set_call)
                if fd is not None:
                    _signal_new_call_fd(self.name, i, fd)
            case p.SetVringErr(index=i, fd=fd):
                self._set_queue_fd(i, fd, Virtqueue.set_err)
            case p.SetVringEnable(index=i, enable=enable):
                self._set_enable(i, enable)
            case p.GetConfig(offset=off, size=size):
                return p.ConfigReply(
                    p.Request.GET_CONFIG, off, size, msg.flags, self.device.get_config(off, size)
                )
            case p.SetConfig(offset=off, data=data):
                self.device.set_config(off, data)
            case p.GetInflightFd(num_queues=nq, queue_size=qs):
                return self._get_inflight_fd(nq, qs)
            case p.SetInflightFd():
                self._set_inflight_fd(msg)
            case p.SetLogBase(size=size, offset=offset, fd=fd):
                self._set_log_base(size, offset, fd)
                return p.U64Reply(p.Request.SET_LOG_BASE, 0)
            case p.SetLogFd(fd=fd):
                self._set_log_fd(fd)
            case p.SendRarp(mac=mac):
                if not self.protocol_features & p.ProtocolFeature.RARP:
                    raise SessionError("RARP was not negotiated")
                self.device.announce(mac)
            case p.Unknown(request=req, fds=fds):
                close_all(fds)
                raise SessionError(f"unsupported request {p.request_name(req)}")
            case _:
                raise SessionError(f"unexpected message {msg!r}")
        return None

    # --- features ---
    @property
    def offered_features(self) -> int:
        return self.device.features | p.VHOST_USER_F_PROTOCOL_FEATURES | p.VHOST_F_LOG_ALL

    @property
    def offered_protocol_features(self) -> int:
        f = int(OFFERED_PROTOCOL_FEATURES)
        if self.device.supports_inflight:
            f |= p.ProtocolFeature.INFLIGHT_SHMFD
        if self.device.supports_rarp:
            f |= p.ProtocolFeature.RARP
        return f

    def _set_features(self, features: int) -> None:
        extra = features & ~self.offered_features
        if extra:
            raise SessionError(f"features {features:#x} include bits not offered ({extra:#x})")
        logging_was_on = self._logging
        self.features = features
        if self._logging != logging_was_on:
            log.info("%s: dirty-page logging %s", self.name, "on" if self._logging else "off")
            if self._logging and self.dirty_log is None:
                # QEMU does this when it reconnects during a migration (vhost_dev_start
                # sends SET_FEATURES first and SET_LOG_BASE last): serve nothing until
                # the log is there, since a write not logged is a page the destination
                # never gets.
                log.info("%s: LOG_ALL before SET_LOG_BASE: queues wait for the log", self.name)
            self._apply_log()
            for q in self.queues:
                self._maybe_start(q)
        if not self._protocol_features_on:
            # Spec: without PROTOCOL_FEATURES a ring starts enabled (with it, disabled
            # until SET_VRING_ENABLE). Decided here, once the features are known.
            for q in self.queues:
                q.enabled = True
                self._maybe_start(q)

    @property
    def _protocol_features_on(self) -> bool:
        return bool(self.features & p.VHOST_USER_F_PROTOCOL_FEATURES)

    # --- memory ---
    def _set_mem_table(self, regions: tuple[p.MemoryRegion, ...], fds: tuple[int, ...]) -> None:
        def replace() -> None:
            self.memory.clear()
            for region, fd in zip(regions, fds, strict=True):
                self.memory.add(_region(region), fd)

        self._change_memory(replace, fds)

    def _change_memory(self, change: object, fds: Iterable[int | None]) -> None:
        with self._queues_stopped():
            try:
                change()  # type: ignore[operator]
            finally:
                close_all(fds)  # the mapping keeps the memory; the fd is not needed

    @contextlib.contextmanager
    def _queues_stopped(self) -> Iterator[None]:
        """Queue workers read what the session shares with them (the memory map, the
        dirty log, the inflight region) without locks: stop every queue around a change
        to it, and start the ones that ran again afterwards, also when the change fails."""
        running = [q for q in self.queues if q.running]
        for q in self.queues:
            if q.running or q.active:  # a worker that gave up still points into memory
                self.device.stop_queue(q)
        try:
            yield
        finally:
            for q in running:
                self._maybe_start(q)

    # --- dirty-page logging (vhost-user.rst, "Migration") ---
    @property
    def _logging(self) -> bool:
        return bool(self.features & p.VHOST_F_LOG_ALL)

    def _apply_log(self) -> None:
        """Give every queue the log it must write (none unless LOG_ALL is on and a log
        is mapped); a running queue is stopped around the change (the worker reads it
        without locks) and its pass in progress completes with the old setting. With
        LOG_ALL on and no log yet, queues stop until one comes."""
        want = self.dirty_log.handle if self._logging and self.dirty_log else None
        waiting = self._logging and self.dirty_log is None
        for q in self.queues:
            if waiting and (q.running or q.active):
                self.device.stop_queue(q)  # until the log comes (see _maybe_start)
            elif q.log is not want:

                def change(q: Virtqueue, want: vu_log | None = want) -> None:
                    q.log = want

                self._reconfigure(q, change)

    def _set_log_base(self, size: int, offset: int, fd: int | None) -> None:
        try:
            if not self.protocol_features & p.ProtocolFeature.LOG_SHMFD:
                raise SessionError("LOG_SHMFD was not negotiated (no shared log)")
            if fd is None:
                raise SessionError("no fd attached for the log")
            new = DirtyLog(fd, size, offset)
        finally:
            close_all([fd])  # the mapping keeps the memory
        end = max((r.guest_phys_addr + r.memory_size for r in self.memory.regions), default=0)
        if new.covers < end:
            new.close()
            raise SessionError(
                f"log of {size} bytes covers guest memory up to {new.covers:#x}, "
                f"but it reaches {end:#x} ({log_bytes_for(end)} bytes of log needed)"
            )
        new.set_call_fd(self._log_call_fd)
        old = self.dirty_log
        with self._queues_stopped():  # nothing writes the old log after this
            self.dirty_log = new
            for q in self.queues:
                q.log = None
            self._apply_log()
            if old is not None:
                old.close()
        for q in self.queues:  # queues that waited for a log (LOG_ALL came first)
            self._maybe_start(q)
        log.info(
            "%s: dirty log of %d bytes at offset %#x (covers %#x)",
            self.name,
            size,
            offset,
            new.covers,
        )

    def _set_log_fd(self, fd: int) -> None:
        try:
            _check_notifier(fd)
        except SessionError:
            close_all([fd])
            raise
        with self._queues_stopped():
            close_all([self._log_call_fd])
            self._log_call_fd = _nonblocking_fd(fd)
            if self.dirty_log is not None:
                self.dirty_log.set_call_fd(fd)

    def _release_log(self) -> None:
        """Queues must be stopped."""
        for q in self.queues:
            q.log = None
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        close_all([self._log_call_fd])
        self._log_call_fd = None

    # --- inflight tracking (vhost-user.rst, "Inflight I/O tracking") ---
    def _check_inflight_shape(self, num_queues: int, queue_size: int) -> int:
        """Validate a region's queue count and size; return one queue's share in bytes."""
        if not self.protocol_features & p.ProtocolFeature.INFLIGHT_SHMFD:
            raise SessionError("INFLIGHT_SHMFD was not negotiated")
        if not 1 <= num_queues <= len(self.queues):
            raise SessionError(
                f"inflight region for {num_queues} queues, the device has {len(self.queues)}"
            )
        if not 0 < queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise SessionError(
                f"inflight queue size {queue_size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}"
            )
        return int(lib.vu_inflight_queue_size(queue_size))

    def _get_inflight_fd(self, num_queues: int, queue_size: int) -> p.Reply:
        per_queue = self._check_inflight_shape(num_queues, queue_size)
        size = per_queue * num_queues
        fd = os.memfd_create(f"vhost-inflight-{self.name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)  # zeros: version 0, set up when each queue starts
        except OSError:
            os.close(fd)
            raise
        close_all([self._offered_inflight_fd])
        self._offered_inflight_fd = fd  # ours until the next GET or close; QEMU gets a dup
        log.debug(
            "%s: inflight region of %d bytes for %d x %d", self.name, size, num_queues, queue_size
        )
        return p.InflightReply(p.Request.GET_INFLIGHT_FD, size, 0, num_queues, queue_size, fd)

    def _set_inflight_fd(self, msg: p.SetInflightFd) -> None:
        try:
            per_queue = self._check_inflight_shape(msg.num_queues, msg.queue_size)
            need = per_queue * msg.num_queues
            if msg.mmap_size < need:
                raise SessionError(
                    f"inflight mmap_size {msg.mmap_size} is less than the "
                    f"{need} bytes {msg.num_queues} queues of "
                    f"{msg.queue_size} need"
                )
            if msg.mmap_offset % mmap.PAGESIZE:
                raise SessionError(f"inflight mmap_offset {msg.mmap_offset:#x} is not page aligned")
            st = os.fstat(msg.fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < msg.mmap_offset + msg.mmap_size:
                raise SessionError(
                    f"inflight fd is not a file of at least {msg.mmap_offset + msg.mmap_size} bytes"
                )
            region = mmap.mmap(
                msg.fd,
                msg.mmap_size,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=msg.mmap_offset,
            )
        except OSError as e:
            raise SessionError(f"cannot map the inflight region: {e.strerror}") from None
        finally:
            close_all([msg.fd])  # the mapping keeps the memory
        with self._queues_stopped():
            self._release_inflight()
            self._inflight = (region, ffi.from_buffer(region))
            base = ffi.cast("char *", self._inflight[1])
            for i, q in enumerate(self.queues):
                q.inflight = (base + i * per_queue, per_queue) if i < msg.num_queues else None
            log.info(
                "%s: inflight region of %d bytes for %d x %d attached",
                self.name,
                msg.mmap_size,
                msg.num_queues,
                msg.queue_size,
            )

    def _release_inflight(self) -> None:
        """Queues must be stopped: nothing may write the region after this."""
        for q in self.queues:
            q.inflight = None
        if self._inflight is not None:
            region, view = self._inflight
            self._inflight = None
            ffi.release(view)
            region.close()

    # --- queues ---
    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < len(self.queues):
            raise SessionError(f"queue index {index} out of range (device has {len(self.queues)})")
        return self.queues[index]

    def _reconfigure(self, q: Virtqueue, change: Callable[[Virtqueue], None]) -> None:
        """The worker reads the queue's state and fds without locks: change them only
        while it is stopped (joined, so nothing it does later can undo the change)."""
        was_running = q.running
        self.device.stop_queue(q)
        try:
            change(q)
        finally:
            if was_running:  # a refused change leaves the queue as it was
                self._maybe_start(q)

    def _set_queue_fd(
        self, index: int, fd: int | None, setter: Callable[[Virtqueue, int | None], None]
    ) -> None:
        try:
            if fd is not None:
                _check_notifier(fd)
            q = self._queue(index)
            if fd is None and setter is Virtqueue.set_kick:
                # Without INBAND_NOTIFICATIONS/polling support a ring without a kick fd
                # could never run: refuse rather than ack a queue that stays silent.
                raise SessionError(f"queue {index}: no kick fd (polling mode) is not supported")
        except SessionError:
            close_all([fd])
            raise
        self._reconfigure(q, lambda q: setter(q, fd))
        self._maybe_start(q)

    def _set_enable(self, index: int, enable: bool) -> None:
        q = self._queue(index)
        q.enabled = enable
        if enable:
            self._maybe_start(q)
        else:
            self.device.stop_queue(q)

    def _get_vring_base(self, index: int) -> p.Reply:
        """Stop the queue: every request taken from it has completed, been logged and been
        published when this returns (its worker finishes the pass it is in), and completed
        writes are on disk (device.flush), since a migration's destination opens the same
        image. The index returned is where the next owner of the ring resumes."""
        q = self._queue(index)
        base = self.device.stop_queue(q)
        try:
            _off_loop(self.device.flush)
        except SessionError as e:
            # The ring did stop at base: answering anything else would corrupt the ring
            # state the front end carries over. The disk error is the guest's to see.
            log.error(
                "%s: queue %d stopped at %d, but %s: completed writes may not be on disk",
                self.name,
                index,
                base,
                e,
            )
        # The ring is stopped until the front end sends a kick fd again.
        q.set_kick(None)
        log.debug("%s: queue %d stopped at %d", self.name, index, base)
        return p.VringStateReply(p.Request.GET_VRING_BASE, index, base)

    def _maybe_start(self, q: Virtqueue) -> None:
        if q.running or not q.startable(self.memory):
            return
        if self._logging and self.dirty_log is None:
            return  # started by SET_LOG_BASE (or by LOG_ALL going off)
        self.device.start_queue(q, self.memory, self.features)

    def _reset(self) -> None:
        for q in self.queues:
            self.device.stop_queue(q)
            q.reset()
        # QEMU drops its region on a device reset and asks for a new one.
        self._release_inflight()
        self._release_log()
        self.device.reset()
        self.features = 0

    # --- teardown ---
    def close(self) -> None:
        """Stop every queue (in-flight batches finish), close fds, unmap memory."""
        if self.closed:
            return
        self.closed = True
        for q in self.queues:
            self.device.stop_queue(q)
            self.device.queue_counters.retire(q)
            q.reset()
        line = self.device.stats_line()  # after the stop: the last pass is counted
        if line:
            log.info("%s: counters since start: %s", self.name, line)
        self._release_inflight()
        self._release_log()
        close_all([self._offered_inflight_fd])
        self._offered_inflight_fd = None
        self.memory.close()

    def stats(self) -> list[dict[str, int]]:
        return [{**q.stats(), **self.device.queue_stats(q.index)} for q in self.queues]


def _check_notifier(fd: int) -> None:
    """Kick, call and err fds must be eventfds (or pipes, as on hosts without eventfd):
    a regular file or /dev/null is readable forever (a worker would spin on it), and
    writing signals into a file would grow it without bound."""
    try:
        st = os.fstat(fd)
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise SessionError(f"notifier fd: {e.strerror}") from None
    if not (stat.S_ISFIFO(st.st_mode) or kind == "anon_inode:[eventfd]"):
        raise SessionError(f"notifier fd is not an eventfd or a pipe ({kind})")


def _signal_new_call_fd(name: str, index: int, fd: int) -> None:
    """Signal a queue's new call fd once, as libvhost-user does: a back end that died
    between publishing a used entry and signalling it left the driver waiting for an
    interrupt nobody will send; after the restart this one wakes it. A driver with
    nothing new in its used ring takes it as a spurious interrupt."""
    try:
        os.write(fd, (1).to_bytes(8, "little"))
    except BlockingIOError:
        pass  # the counter is saturated: it is signalled already
    except OSError as e:
        log.warning("%s: queue %d: cannot signal the new call fd: %s", name, index, e.strerror)


def _nonblocking_fd(fd: int) -> int:
    with contextlib.suppress(OSError):
        os.set_blocking(fd, False)
    return fd


def _off_loop(work: Callable[[], None]) -> None:
    """Run blocking I/O (an fdatasync) in a thread of its own and wait for it. The
    caller's reply must wait for it anyway; the event loop thread itself never does
    disk I/O."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except OSError as e:
            failure.append(e)

    t = threading.Thread(target=run, name="flush", daemon=True)
    t.start()
    t.join()
    if failure:
        raise SessionError(f"flush failed: {failure[0]}")


def _region(r: p.MemoryRegion) -> Region:
    return Region(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
