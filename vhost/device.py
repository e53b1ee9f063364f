"""The interface a virtio device implements to be served by a session.

A device says which virtio features and vhost-user protocol features it
offers, how many queues it has, what its config space holds, and gives, per
queue, the C run function a worker thread calls with the queue handle. It
never sees protocol messages.
"""

from __future__ import annotations

import abc
from typing import Any

from vhost.memory import GuestMemory
from vhost.virtqueue import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Runner,
    Virtqueue,
)

# Transport features every device here offers (the ring walker implements them).
RING_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX


class Device(abc.ABC):
    #: short name for log lines and --print-capabilities ("block", "net")
    kind: str = ""
    #: offer INFLIGHT_SHMFD: every request can be run again after a crash (a block
    #: device's reads and writes can; a NIC's frames are simply lost)
    supports_inflight: bool = False

    @property
    @abc.abstractmethod
    def features(self) -> int:
        """virtio feature bits offered (transport and device bits)."""

    @property
    @abc.abstractmethod
    def num_queues(self) -> int:
        """Queues the front end may set up (GET_QUEUE_NUM)."""

    @property
    def queue_num_reply(self) -> int:
        """What GET_QUEUE_NUM answers (net counts queue pairs)."""
        return self.num_queues

    @abc.abstractmethod
    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space from ``offset`` (zero past its end)."""

    def set_config(self, offset: int, data: bytes) -> None:
        raise ValueError("config space is read-only")

    def runner(self, queue_index: int) -> Runner:
        """The blocking C loop serving queue ``queue_index``; called in a worker thread
        with the queue's C handle, returns a VU_RUN_* code. Devices that serve their
        queues another way override start_queue/stop_queue instead."""
        raise NotImplementedError

    def buffers_wait_for_data(self, queue_index: int) -> bool:
        """True for queues whose buffers normally sit untaken until the device has data
        (a NIC's rx ring): a stop with buffers not taken is then no news."""
        return False

    def start_queue(self, q: Virtqueue, memory: GuestMemory, features: int) -> None:
        """Serve a queue that is ready (default: a worker thread of its own)."""
        q.start(memory, features, self.runner(q.index))

    def stop_queue(self, q: Virtqueue) -> int:
        """Stop serving it (the batch in progress completes); return last_avail_idx."""
        return q.stop()

    def queue_stats(self, queue_index: int) -> dict[str, Any]:
        return {}

    def stats_line(self) -> str:
        """Counters worth a log line when a front end disconnects ("" for none)."""
        return ""

    def flush(self) -> None:
        """Make completed writes durable (called off the event loop)."""

    def reset(self) -> None:
        """Forget per-connection device state (queues are already stopped)."""

    def close(self) -> None:
        """Release host resources."""
