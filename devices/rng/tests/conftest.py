"""Fixtures for the rng device's tests: ``vhost-user-rng`` as a subprocess
(tests/support/daemon.py), and connections of the test front end's virtio-rng driver
(tests/support/rng.py) to it.

* ``start_rng(*args, sockets=1)`` -- a factory: the daemon on ``sockets`` sockets in
  ``tmp_path``, started once every socket accepted a probe; at teardown each must exit 0
  with no traceback and remove its sockets.
* ``rng`` -- one default daemon; ``guest`` -- a connection to it with requestq set up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.daemon import Daemon, Launch, daemons, device_command
from tests.support.rng import Rng, connect_rng


def spawn_rng(directory: Path, name: str, *args: str, sockets: int = 1,
              **options: Any) -> Daemon:
    """``vhost-user-rng --socket-path NAME[-k].sock ... ARGS``, log in NAME.log."""
    paths = [directory / (f"{name}.sock" if sockets == 1 else f"{name}-{k}.sock")
             for k in range(sockets)]
    argv = [*device_command("rng"), *(a for p in paths for a in ("--socket-path", str(p))),
            *args]
    return Launch(tuple(argv), tuple(paths), **options).start(directory / f"{name}.log")


class StartRng(Protocol):
    def __call__(self, *args: str, sockets: int = ..., **options: Any) -> Daemon: ...


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
