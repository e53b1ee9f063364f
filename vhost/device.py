"""The interface a virtio device implements to be served by a session, and the one a
device *type* implements to be found by the program (vhost.registry, vhost.cli).

A :class:`Device` says which virtio features and vhost-user protocol features it offers,
how many queues it has and what its config space holds, and how each queue is served:

* in C: :meth:`Device.runner` gives the blocking C loop a worker thread runs for the
  queue (devices/blk);
* in Python: :meth:`Device.process_queue` takes validated chains from a
  :class:`~vhost.chains.ChainQueue` on each kick and pushes them back (devices/rng), on
  the event loop or in a worker thread (:attr:`Device.chain_worker`);
* any other way: override :meth:`Device.start_queue` and :meth:`Device.stop_queue`
  (devices/net runs one engine thread over many queues).

It never sees protocol messages. A :class:`DeviceType` is what a plug-in registers under
the ``vhost.devices`` entry point group: a name, command-line options, and a factory
that makes one Device per socket.
"""

from __future__ import annotations

import abc
import argparse
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vhost.chains import ChainQueue
from vhost.errors import CORE_ERRORS, ErrorTable
from vhost.memory import GuestMemory
from vhost.virtqueue import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    ChainWorker,
    QueueCounterBook,
    Runner,
    Virtqueue,
)

if TYPE_CHECKING:
    from vhost.metrics import MetricFamily

# Transport features every device here offers (the ring walker implements them).
RING_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX


class UsageError(ValueError):
    """Options that do not make a device; the program prints the text and exits 2."""


class Device(abc.ABC):
    #: offer INFLIGHT_SHMFD: every request can be run again after a crash (a block
    #: device's reads and writes can; a NIC's frames are simply lost). Only for queues
    #: served in C (the chain API does not resubmit).
    supports_inflight: bool = False
    #: where queues served by process_queue run: the event loop, or a thread each
    chain_worker: ChainWorker = "loop"
    #: the texts of the error codes the device's C records (the core's by default)
    errors: ErrorTable = CORE_ERRORS
    #: offer protocol feature RARP: the device can announce a migrated guest's MAC
    #: (:meth:`announce`, on VHOST_USER_SEND_RARP)
    supports_rarp: bool = False

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

    def config_space(self) -> bytes:
        """The device's config space (struct virtio_*_config); none by default."""
        return b""

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space from ``offset`` (zero past its end)."""
        return self.config_space()[offset : offset + size].ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        raise ValueError("config space is read-only")

    # --- serving queues ---
    def runner(self, queue_index: int) -> Runner | None:
        """The blocking C loop serving queue ``queue_index`` in a worker thread (called
        with the queue's C handle, returns a VU_RUN_* code), or None for a device that
        serves its queues in Python (process_queue)."""
        return None

    def process_queue(self, queue: ChainQueue) -> float | None:
        """A Python device's work on a kick: pop chains, fill them, push them. Return
        None to wait for the next kick, or a delay in seconds to be called again then
        (chains it could not serve yet go back with ``queue.discard``)."""
        raise NotImplementedError(f"{type(self).__name__} gives neither a runner nor process_queue")

    def buffers_wait_for_data(self, queue_index: int) -> bool:
        """True for queues whose buffers normally sit untaken until the device has data
        (a NIC's rx ring): a stop with buffers not taken is then no news."""
        return False

    def start_queue(self, q: Virtqueue, memory: GuestMemory, features: int) -> None:
        """Serve a queue that is ready: its runner in a worker thread of its own, or
        process_queue on the chain API. A device that overrides this calls
        ``self.queue_counters.attach(q)`` first, so its queues' counters are reported."""
        self.queue_counters.attach(q)
        runner = self.runner(q.index)
        if runner is not None:
            q.start(memory, features, runner)
        else:
            q.serve_chains(memory, features, self.process_queue, self.chain_worker)

    def stop_queue(self, q: Virtqueue) -> int:
        """Stop serving it (the batch in progress completes); return last_avail_idx."""
        return q.stop()

    def announce(self, mac: bytes) -> None:
        """The guest with MAC ``mac`` (6 bytes) now runs behind this device (after a live
        migration, when the guest itself cannot announce: VHOST_USER_SEND_RARP). Only
        called when :attr:`supports_rarp` is true."""
        raise NotImplementedError(f"{type(self).__name__} cannot announce a MAC")

    # --- state and lifetime ---
    def queue_stats(self, queue_index: int) -> dict[str, Any]:
        return {}

    @functools.cached_property
    def queue_counters(self) -> QueueCounterBook:
        """The core's counters of this device's queues (kicks, interrupts, chains per
        batch, ...), added up over every connection: what the metrics report per queue."""
        return QueueCounterBook()

    def metrics(self) -> list[MetricFamily]:
        """The device's own counters for a metrics scrape (vhost.metrics), read without
        locks from where the data path keeps them: families named ``vhost_DEVICE_...``,
        their samples labelled by ``queue`` or whatever the device counts by (the scrape
        adds ``device``). Called on the event loop: it must be quick. None by default."""
        return []

    def stats_line(self) -> str:
        """Counters worth a log line when a front end disconnects ("" for none)."""
        return ""

    # Optional hooks: a device without the state or resource has nothing to do.
    def flush(self) -> None:  # noqa: B027
        """Make completed writes durable (called off the event loop)."""

    def reset(self) -> None:  # noqa: B027
        """Forget per-connection device state (queues are already stopped)."""

    def close(self) -> None:  # noqa: B027
        """Release host resources."""

    def abort(self) -> None:
        """The program did not start after all (a socket was in use): release what
        close() releases and remove anything this run created."""
        self.close()


class DeviceType(abc.ABC):
    """A kind of device the program can serve, as a plug-in registers it (an object
    under the ``vhost.devices`` entry point group)."""

    #: the name on the command line: ``python -m vhost NAME``
    name: str
    #: the program name in usage and error lines, e.g. ``vhost-user-blk``
    program: str
    #: one line for the list ``python -m vhost`` prints
    summary: str
    #: VHostUserBackendType of QEMU's vhost-user.json, for --print-capabilities
    backend_type: str
    #: longer text for --help
    description: str = ""
    #: chardev ids in the "attach with" line are this plus a number (default: the name)
    chardev_prefix: str = ""

    def capabilities(self) -> dict[str, Any]:
        """What --print-capabilities prints (vhost-user.json's VHostUserBackendCapabilities)."""
        return {"type": self.backend_type}

    @abc.abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The device's own options (the program adds --socket-path, --fd,
        --print-capabilities and -v)."""

    @abc.abstractmethod
    def create(self, args: argparse.Namespace, sockets: Sequence[str | None]) -> list[Device]:
        """One device per socket (a path, or None for the listening socket of --fd), in
        order. Raises UsageError (or ValueError) for options that do not make devices,
        having released whatever it made."""

    def qemu_device_args(self, chardev: str, device: Device) -> list[str]:
        """The QEMU options (after ``-chardev socket,id=CHARDEV,...``) that attach a
        guest to ``device``, for the "attach with" log line."""
        return []

    def describe(self, device: Device, where: str) -> str:
        """The log line saying what is served where."""
        return f"{self.program} on {where}"
