"""The front end's side of dirty-page logging (what QEMU does for a live migration), for
tests of any device: a memfd log with guard bytes after it, read and cleared as QEMU's
sync does, and the messages that turn logging on and off (SET_LOG_BASE, SET_FEATURES
with VHOST_F_LOG_ALL, SET_VRING_ADDR with the log flag)."""

from __future__ import annotations

import os

from tests.support.frontend import F_LOG_ALL, DriverQueue, FrontEnd, GuestRam
from vhost.protocol import SetLogBase, SetVringAddr, U64Reply

PAGE = 4096
TAIL = 4096  # guard bytes after the log in its file


class FrontEndLog:
    """The front end's side of the log: a memfd bitmap, read and cleared as QEMU does."""

    def __init__(self, ram_end: int, offset: int = 0) -> None:
        self.size = -(-ram_end // (8 * PAGE))
        self.offset = offset
        self.fd = os.memfd_create("fe-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, offset + self.size + TAIL)

    @classmethod
    def for_ram(cls, ram: GuestRam, offset: int = 0) -> FrontEndLog:
        return cls(max(r.guest_phys_addr + r.memory_size for r in ram.regions()), offset)

    def take(self) -> set[int]:
        """The pages marked since the last take (and clear them), checking the guards."""
        raw = os.pread(self.fd, self.offset + self.size + TAIL, 0)
        assert raw[: self.offset] == bytes(self.offset), "written before the log"
        assert raw[self.offset + self.size :] == bytes(TAIL), "written after the log"
        os.pwrite(self.fd, bytes(self.size), self.offset)
        bits = raw[self.offset : self.offset + self.size]
        return {i * 8 + b for i, v in enumerate(bits) if v for b in range(8) if v >> b & 1}

    def close(self) -> None:
        os.close(self.fd)


def pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1)) if n else set()


def used_ring_pages(q: DriverQueue) -> set[int]:
    return pages(q.used_gpa, 4 + 8 * q.num + 2)


def set_log_base(fe: FrontEnd, log: FrontEndLog) -> U64Reply:
    """SET_LOG_BASE, and the reply QEMU waits for (whatever REPLY_ACK says)."""
    assert fe.request(SetLogBase(log.size, log.offset, log.fd)) is None
    reply = fe.read_reply(what="SET_LOG_BASE reply")
    assert isinstance(reply, U64Reply) and reply.request == SetLogBase.request
    return reply


def set_vring_log(fe: FrontEnd, index: int, q: DriverQueue, on: bool) -> None:
    fe.request_ack(
        SetVringAddr(
            index=index,
            flags=1 if on else 0,
            desc_user_addr=fe.ram.uva_of(q.desc_gpa),
            used_user_addr=fe.ram.uva_of(q.used_gpa),
            avail_user_addr=fe.ram.uva_of(q.avail_gpa),
            log_guest_addr=q.used_gpa if on else 0,
        )
    )


def start_logging(fe: FrontEnd, log: FrontEndLog, *, acked: bool = True) -> None:
    """QEMU's order (vhost_migration_log): the log, then LOG_ALL, then each ring's flag.
    ``acked``: check that the reply says 0 (ours does; libvhost-user, as in
    qemu-storage-daemon, echoes the log's size: QEMU reads only that a reply came)."""
    reply = set_log_base(fe, log)
    assert reply.value == 0 or not acked, f"SET_LOG_BASE failed ({reply.value})"
    fe.set_features(fe.features | F_LOG_ALL)
    for index, q in fe.queues.items():
        set_vring_log(fe, index, q, True)


def stop_logging(fe: FrontEnd) -> None:
    fe.set_features(fe.features & ~F_LOG_ALL)
    for index, q in fe.queues.items():
        set_vring_log(fe, index, q, False)
