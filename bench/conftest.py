"""Options of the microbenchmarks.

``--baseline-tree=PATH``: another checkout of this project, built in place
(``python setup.py build_ext --inplace`` there). Its back ends run as one more case,
``baseline-tree``, beside ours in the same run, so a change can be measured against the code
before it (``git worktree add /tmp/before HEAD~3``): the machine is too noisy for
figures from different runs. Give it as ``--baseline-tree=PATH`` (one word): written
as two, pytest takes PATH for a test root before it knows the option, and imports
that tree's ``tests`` package instead of this one's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--baseline-tree",
        metavar="PATH",
        default=None,
        help="a checkout of this project built in place: its back ends run as "
        "the 'baseline-tree' case beside ours",
    )


def baseline_tree(config: pytest.Config) -> Path | None:
    value = config.getoption("--baseline-tree")
    return Path(value).resolve() if value else None


def baseline_command(tree: Path, device: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) running ``device`` ("blk" or "net") from ``tree``: with the
    device registry (``python -m vhost blk``), or from before it (``python -m vhost`` was
    the blk program, ``vhost.cli:net_entry`` the net one)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    if (tree / "devices" / device / "__init__.py").exists():
        return [sys.executable, "-P", "-m", "vhost", device], env
    if device == "blk":
        return [sys.executable, "-P", "-m", "vhost"], env
    return [sys.executable, "-P", "-c", "from vhost.cli import net_entry; net_entry()"], env
