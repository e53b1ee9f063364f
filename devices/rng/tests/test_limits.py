"""The bounds of devices/rng/limits.py, each at the bound and one past it.

``ROWS`` names the tests of each row of that module's table; tests/unit/test_layout.py
checks that every device's table rows are covered this way. The per-chain bound is
tried through the daemon in test_rng.py; the per-call batch here, in-process, on the
device's handler."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devices.rng.device import RngDevice, RngOptions
from devices.rng.limits import MAX_BATCH
from tests.support.rings import Ring
from vhost.chains import ChainQueue

TESTS = "devices.rng.tests.test_rng"

ROWS: dict[str, list[str]] = {
    "MAX_CHAIN_BYTES": [
        f"{TESTS}::test_a_chain_gets_at_most_max_chain_bytes",
        f"{TESTS}::test_a_chain_claiming_gigabytes_costs_max_chain_bytes",
    ],
    "MAX_BATCH": ["test_one_call_takes_max_batch_chains"],
}


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring(num=256)
    yield r
    r.close()


@pytest.mark.parametrize("waiting", [MAX_BATCH, MAX_BATCH + 1])
def test_one_call_takes_max_batch_chains(ring: Ring, waiting: int) -> None:
    """MAX_BATCH chains waiting: one call serves them all; one more: that one is left
    in the ring (not taken: the next call serves it)."""
    for _ in range(waiting):
        ring.q.add_chain([(ring.buf(16), 16, True)])
    ring.q.publish()
    device = RngDevice(RngOptions())
    queue = ChainQueue(ring.vq, "limits/vq0", ring.mem)
    assert device.process_queue(queue) is None
    assert len(ring.q.get_used()) == MAX_BATCH
    assert ring.vq.last_avail_idx == MAX_BATCH
    device.process_queue(queue)
    assert len(ring.q.get_used()) == waiting - MAX_BATCH
    device.close()
