"""The --config file: many disks or ports in one process, in TOML, as an alternative to
repeated flags.

Keys are the program's long options without the dashes. Program-wide options sit at
the top; each ``[[device]]`` table is one device, with its socket and its own options,
so two disks in one process may differ in every option (one read-only, one with four
queues)::

    socket-group = "libvirt-qemu"
    metrics = "127.0.0.1:9100"

    [[device]]
    socket-path = "/run/vhost-user-blk/disk0.sock"
    blk-file = "/var/lib/vhost-user-blk/disk0.img"
    num-queues = 4

    [[device]]
    socket-name = "disk1"          # a socket passed by systemd (FileDescriptorName=)
    blk-file = "/var/lib/vhost-user-blk/disk1.img"
    read-only = true

A value is a string or number (``--key value``), a boolean (``true`` gives the flag,
``false`` leaves it out) or a list (the option once per element). This module only turns
the file into argument lists; the program's parser checks them as it checks the command
line, so a file cannot say what the command line could not.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """The file cannot be read or says something the program has no option for."""


@dataclass
class Config:
    #: program-wide options, as arguments
    program: list[str]
    #: one argument list per [[device]] table, in order
    devices: list[list[str]]


def _value_args(option: str, value: Any, where: str) -> list[str]:
    if isinstance(value, bool):
        return [option] if value else []
    if isinstance(value, (str, int, float)):
        return [option, str(value)]
    if isinstance(value, list):
        out: list[str] = []
        for item in value:
            if isinstance(item, (list, dict, bool)):
                raise ConfigError(
                    f"{where}: {option[2:]} = {value!r}: a list of strings or numbers"
                )
            out += [option, str(item)]
        return out
    raise ConfigError(f"{where}: {option[2:]} = {value!r} is not a string, number, boolean or list")


def _table_args(
    table: dict[str, Any], allowed: Collection[str], where: str, what: str
) -> list[str]:
    args: list[str] = []
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown {what} option {key!r}")
        args += _value_args(f"--{key}", value, where)
    return args


def load(path: str, program_options: Collection[str], device_options: Collection[str]) -> Config:
    """Read ``path``; ``program_options`` and ``device_options`` are the long option
    names (without dashes) allowed at the top and in each [[device]] table."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
    tables = data.pop("device", None)
    if tables is None:
        raise ConfigError(f"--config {path}: no [[device]] table: it names no device to serve")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"--config {path}: 'device' must be an array of tables ([[device]])")
    if not tables:
        raise ConfigError(f"--config {path}: no [[device]] table: it names no device to serve")
    program = _table_args(data, program_options, f"--config {path}", "program-wide")
    devices = [
        _table_args(t, device_options, f"--config {path}: [[device]] {i + 1}", "device")
        for i, t in enumerate(tables)
    ]
    return Config(program, devices)
