"""What the tests and the benchmarks drive the back ends with, in one package.

* :mod:`tests.support.frontend` -- the vhost-user front end that plays QEMU: guest RAM
  (memfd), driver-side split virtqueues with their eventfds, the message exchange.
* :mod:`tests.support.blk`, :mod:`tests.support.net`, :mod:`tests.support.rng` -- the
  virtio drivers on top of it, one per device, each with the helper that connects it to
  a running daemon.
* :mod:`tests.support.daemon` -- a back-end daemon as a subprocess (any device program,
  any exec prefix): start-up, log, /proc figures, restarts on the same sockets, a clean
  stop; and the group a conftest fixture yields.
* :mod:`tests.support.rings` -- the in-process ring fixture: guest RAM mapped into a
  GuestMemory with the core's C walker on a queue, no socket and no daemon.
* :mod:`tests.support.wire` -- vhost-user messages as raw bytes, for the reader's tests.
* :mod:`tests.support.packet_agent` -- frames sent and captured on an interface inside a
  network namespace.

Boundary: the drivers and harnesses assert nothing about the back ends beyond their own
bookkeeping; the few shared checks are named ``check_*`` (a daemon's clean exit and its
usage errors, I/O that still reaches the image) or live in wire.py (the reader's two).
Test modules import from here (and from tests.guest, tests.netns, tests.dpdk), never
from each other or from a conftest.py; bench/ does the same.
"""
