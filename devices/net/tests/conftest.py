"""Fixtures for the net device's own tests: ``vhost-user-net`` as a subprocess
(tests/support/daemon.py), on a switch or on a TAP inside a network namespace the test
makes and deletes (tests/netns.py), and packet agents on that namespace's interfaces
(tests/support/packet_agent.py).

* ``start_net(*args, ports=N)`` -- a daemon with N sockets in ``tmp_path``;
  ``start_tap(*args)`` -- one inside ``netns``. At teardown each must exit 0 with no
  traceback and remove its sockets (a TAP daemon before its namespace goes).
* ``netns`` -- a fresh namespace (IPv6 off: no stray frames), deleted afterwards.
* ``agent(ifname)`` -- a packet agent on that interface of ``netns``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns import NetNs, list_namespaces
from tests.support.daemon import Daemon, daemons, spawn_net
from tests.support.packet_agent import PacketAgent

StartNet = Callable[..., Daemon]
MakeAgent = Callable[[str], PacketAgent]


@pytest.fixture
def start_net(tmp_path: Path) -> Iterator[StartNet]:
    with daemons(spawn_net, tmp_path, "sw") as group:
        yield group.start


@pytest.fixture
def netns() -> Iterator[NetNs]:
    with NetNs("vnr") as ns:
        yield ns
    assert ns.name not in list_namespaces(), f"{ns.name} was not deleted"


@pytest.fixture
def start_tap(netns: NetNs, tmp_path: Path) -> Iterator[StartNet]:
    with daemons(spawn_net, tmp_path, "tap", exec_prefix=netns.exec_args([])) as group:
        yield group.start


@pytest.fixture
def agent(netns: NetNs) -> Iterator[MakeAgent]:
    agents: list[PacketAgent] = []

    def make(ifname: str) -> PacketAgent:
        agents.append(PacketAgent(netns.exec_args([]), ifname))
        return agents[-1]

    yield make
    for a in agents:
        a.close()
