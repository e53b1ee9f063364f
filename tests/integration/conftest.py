"""Fixtures for the integration tests: the real ``vhost-user-blk`` as a subprocess
(tests/support/daemon.py), and the test front end (tests/support/blk.py) connected to
it over its unix socket.

* ``start_daemon`` -- a factory: ``start_daemon(*args, **options)`` starts
  ``vhost-user-blk`` on a socket and image in ``tmp_path`` (see
  :func:`~tests.support.daemon.spawn_blk`), waits until the daemon's event loop has
  accepted (and dropped) a probe connection, and returns a
  :class:`~tests.support.daemon.Daemon`. At teardown every daemon (latest first) gets
  SIGTERM; each must exit 0 with no ``Traceback`` in its log and remove its socket
  (killed on timeout).
* ``daemon`` -- one daemon with the default options, started for the test; a test
  marked ``@pytest.mark.shared_daemon`` instead gets a view of one daemon shared by the
  module (its log and disconnect counts start where the test started). Only tests that
  leave the daemon as they found it may share it; it saves a daemon start per test.
* ``guest`` -- a :class:`~tests.support.blk.Guest` on ``daemon``: negotiated, memory
  table sent, queue 0 set up, with a BlkDriver on it.

Boundary: no assertions about virtio-blk behaviour here; the tests make those.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.blk import Guest, connect_guest
from tests.support.daemon import Daemon, StartDaemon, borrowed, daemons, spawn_blk


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "shared_daemon: the daemon fixture is the module's shared daemon"
    )


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    with daemons(spawn_blk, tmp_path, "blk") as group:
        yield group.start


@pytest.fixture(scope="module")
def _module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemons(spawn_blk, tmp_path_factory.mktemp("shared"), "shared") as group:
        yield group.start()


@pytest.fixture
def daemon(request: pytest.FixtureRequest, start_daemon: StartDaemon) -> Iterator[Daemon]:
    if request.node.get_closest_marker("shared_daemon") is None:
        yield start_daemon()
        return
    with borrowed(request.getfixturevalue("_module_daemon")) as view:
        yield view


@pytest.fixture
def guest(daemon: Daemon) -> Iterator[Guest]:
    with connect_guest(daemon) as g:
        yield g
