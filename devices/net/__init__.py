"""vhost-user-net: a virtio-net port on a TAP device, or ports on a learning switch
inside the daemon.

The device type registered as ``net`` (pyproject.toml, group ``vhost.devices``): its
options, and one :class:`~devices.net.device.NetDevice` per --socket-path (with
--switch, every one a port of the same switch). Frames move in C (net.c), one engine
thread per TAP port or per switch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from devices.net.device import (
    DEFAULT_BUSY_POLL_US,
    DEFAULT_MTU,
    MAX_ENGINE_PAIRS,
    NetDevice,
    NetOptions,
    Switch,
    TapBackend,
    default_mac,
    format_mac,
    parse_mac,
)
from vhost.cli import run
from vhost.device import Device, DeviceType, UsageError

__all__ = ["DEVICE", "NetDevice", "NetOptions", "main"]


class NetType(DeviceType):
    name = "net"
    program = "vhost-user-net"
    summary = "virtio-net port on a TAP device or a switch inside the daemon (C data path)"
    backend_type = "net"
    description = (
        "vhost-user-net back end: a virtio-net port on a TAP device, or ports on "
        "a learning switch inside this process."
    )

    def __init__(self) -> None:
        #: the switches made so far, by name, with their --busy-poll-us
        self._switches: dict[str, tuple[Switch, int]] = {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        be = parser.add_mutually_exclusive_group()
        be.add_argument("--tap", metavar="NAME", help="attach to (or create) this TAP device")
        be.add_argument("--switch", metavar="NAME", help="ports on a switch inside the daemon")
        parser.add_argument(
            "--mac",
            metavar="MAC",
            help="MAC address (default: derived from "
            "the socket path; with several sockets, each gets its own)",
        )
        parser.add_argument("--num-queues", type=int, default=1, metavar="N", help="queue pairs")
        parser.add_argument("--mtu", type=int, default=DEFAULT_MTU, metavar="N", help="MTU (1500)")
        parser.add_argument(
            "--busy-poll-us",
            type=int,
            default=DEFAULT_BUSY_POLL_US,
            metavar="US",
            help="keep polling the rings this long after the last frame "
            "before sleeping on the kick fds (default "
            f"{DEFAULT_BUSY_POLL_US}; 0: never)",
        )

    def create(self, args: argparse.Namespace, sockets: Sequence[str | None]) -> list[Device]:
        if not (args.tap or args.switch):
            raise UsageError("give --tap NAME or --switch NAME")
        if args.tap and len(sockets) > 1:
            raise UsageError(
                "--tap serves one port: give one --socket-path (use --switch for several)"
            )
        if args.mac and len(sockets) > 1:
            raise UsageError(
                "--mac names one port: with several --socket-path each gets its own MAC"
            )
        if args.switch and len(sockets) * args.num_queues > MAX_ENGINE_PAIRS:
            raise UsageError(
                f"{len(sockets)} ports x {args.num_queues} queue pairs is more "
                f"than a switch serves ({MAX_ENGINE_PAIRS} queue pairs)"
            )
        devices: list[Device] = []
        try:
            switch = self._switch(args.switch, args.busy_poll_us) if args.switch else None
            for path in sockets:
                mac = parse_mac(args.mac) if args.mac else default_mac(path or f"fd{args.fd}")
                tap = TapBackend(args.tap, args.num_queues, args.busy_poll_us) if args.tap else None
                opts = NetOptions(mac=mac, num_queue_pairs=args.num_queues, mtu=args.mtu)
                devices.append(NetDevice(opts, tap=tap, switch=switch))
        except ValueError as e:
            for device in devices:
                device.close()
            raise UsageError(str(e)) from None
        return devices

    def _switch(self, name: str, busy_poll_us: int) -> Switch:
        """The process's switch of that name: ports named in separate --config
        [[device]] tables share one switch, as ports given on one command line do."""
        if name not in self._switches:
            self._switches[name] = (Switch(name, busy_poll_us), busy_poll_us)
        switch, polls = self._switches[name]
        if polls != busy_poll_us:
            raise UsageError(
                f"--switch {name}: its ports ask for different --busy-poll-us "
                f"({polls} and {busy_poll_us})"
            )
        return switch

    def qemu_device_args(self, chardev: str, device: Device) -> list[str]:
        assert isinstance(device, NetDevice)
        pairs = device.opts.num_queue_pairs
        mq = f",queues={pairs}" if pairs > 1 else ""
        return [
            "-netdev",
            f"vhost-user,id=net-{chardev},chardev={chardev}{mq}",
            "-device",
            f"virtio-net-pci,netdev=net-{chardev},mac={format_mac(device.opts.mac)},vectors=0",
        ]

    def describe(self, device: Device, where: str) -> str:
        assert isinstance(device, NetDevice)
        if device.tap is not None:
            backend = f"TAP {device.tap.name}"
        else:
            assert device.switch is not None
            backend = f"switch {device.switch.name}"
        name = os.path.basename(where)
        return f"port {name} (MAC {format_mac(device.opts.mac)}) on {where}, {backend}"


DEVICE = NetType()


def main() -> None:
    """The ``vhost-user-net`` console script."""
    sys.exit(run(DEVICE))
