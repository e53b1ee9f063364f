"""Fixtures for the rng device's tests: ``vhost-user-rng`` as a subprocess
(tests/support/daemon.py), and connections of the test front end's virtio-rng driver
(tests/support/rng.py) to it.

* ``start_rng(*args, ports=1)`` -- a factory: the daemon on ``ports`` sockets in
  ``tmp_path``, started once every socket accepted a probe; at teardown each must exit 0
  with no traceback and remove its sockets.
* ``rng`` -- one default daemon; ``guest`` -- a connection to it with requestq set up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.daemon import Daemon, daemons, spawn_rng
from tests.support.rng import Rng, connect_rng


class StartRng(Protocol):
    def __call__(self, *args: str, ports: int = ..., **options: Any) -> Daemon: ...


@pytest.fixture
def start_rng(tmp_path: Path) -> Iterator[StartRng]:
    with daemons(spawn_rng, tmp_path, "rng") as group:
        yield group.start


@pytest.fixture
def rng(start_rng: StartRng) -> Daemon:
    return start_rng()


@pytest.fixture
def guest(rng: Daemon) -> Iterator[Rng]:
    with connect_rng(rng) as g:
        yield g
