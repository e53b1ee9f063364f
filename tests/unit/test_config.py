"""vhost.config: TOML tables become the argument lists the program parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhost import config

PROGRAM = {"socket-group", "log-level", "syslog", "metrics"}
DEVICE = {"socket-path", "blk-file", "read-only", "serial", "num-queues"}


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_tables_to_arguments(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'socket-group = "kvm"\nsyslog = true\n\n'
        '[[device]]\nsocket-path = "/run/a.sock"\nblk-file = "a.img"\nnum-queues = 4\n'
        "read-only = false\n\n"
        '[[device]]\nsocket-path = "/run/b.sock"\nblk-file = "b.img"\nread-only = true\n'
        'serial = ["x"]\n',
    )
    c = config.load(path, PROGRAM, DEVICE)
    assert c.program == ["--socket-group", "kvm", "--syslog"]
    assert c.devices == [
        ["--socket-path", "/run/a.sock", "--blk-file", "a.img", "--num-queues", "4"],
        ["--socket-path", "/run/b.sock", "--blk-file", "b.img", "--read-only", "--serial", "x"],
    ]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[[device]]\nbogus = 1\n", "[[device]] 1: unknown device option 'bogus'"),
        ("blk-file = 'x'\n[[device]]\n", "unknown program-wide option 'blk-file'"),
        ("[device]\nblk-file = 'x'\n", "array of tables"),
        ("device = []\n", "no [[device]]"),
        ("metrics = 1\n", "no [[device]]"),
        ("[[device]]\nserial = [[1]]\n", "a list of strings or numbers"),
        ("[[device]]\nblk-file = {a = 1}\n", "is not a string"),
        ("[[device]\n", "not valid TOML"),
    ],
)
def test_refused(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load(write(tmp_path, text), PROGRAM, DEVICE)
    assert needle in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="No such file"):
        config.load(str(tmp_path / "none.toml"), PROGRAM, DEVICE)
