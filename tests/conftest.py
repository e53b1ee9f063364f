"""Options shared by the whole suite.

``--fuzz-minutes N`` turns the fuzzers (ring walk differential, protocol state machine,
socket fuzz) from their CI budget (about a minute in all) into a long run of N minutes
each; see README.md, "Fuzzing". Tests read it through the ``fuzz_minutes`` fixture or
:func:`fuzz_minutes_of`.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-minutes",
        type=float,
        default=0.0,
        metavar="N",
        help="run each fuzzer for N minutes instead of its short CI budget (0: CI budget)",
    )


def fuzz_minutes_of(config: pytest.Config) -> float:
    return float(config.getoption("--fuzz-minutes"))


@pytest.fixture
def fuzz_minutes(request: pytest.FixtureRequest) -> float:
    """0.0 in CI; N with ``--fuzz-minutes N`` (a long fuzz run)."""
    return fuzz_minutes_of(request.config)
