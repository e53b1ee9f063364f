"""What the tests and the benchmarks drive the back ends with, in one package.

* :mod:`tests.support.frontend` -- the vhost-user front end that plays QEMU: guest RAM
  (memfd), driver-side split virtqueues with their eventfds, the message exchange.
* :mod:`tests.support.blk`, :mod:`tests.support.net`, :mod:`tests.support.rng` -- the
  virtio drivers on top of it, one per device.
* :mod:`tests.support.daemon` -- a back-end daemon as a subprocess: start-up, log, /proc
  resources, a clean stop.
* :mod:`tests.support.rings` -- the in-process ring fixture: guest RAM mapped into a
  GuestMemory with the C walker's queue on it, no socket and no daemon.
* :mod:`tests.support.packet_agent` -- frames sent and captured on an interface inside a
  network namespace.

Boundary: this package asserts nothing about the back ends (only about its own
bookkeeping); the tests make the assertions. Test modules import from here, never from
each other or from a conftest.py.
"""
