"""Fixtures of the in-process unit tests.

* ``make`` -- ``make(*args, **kw)`` builds a :class:`~tests.support.rings.Ring` (guest
  RAM, a GuestMemory, a C vu_vq on a DriverQueue); every ring made is closed after the
  test.
* ``make_fd`` -- ``make_fd()`` gives a fresh eventfd (to attach to a message); whatever
  is still open after the test is closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.rings import Ring, ring_factory
from tests.support.wire import MakeFd, eventfds


@pytest.fixture
def make() -> Iterator[Callable[..., Ring]]:
    with ring_factory() as new:
        yield new


@pytest.fixture
def make_fd() -> Iterator[MakeFd]:
    with eventfds() as new:
        yield new
