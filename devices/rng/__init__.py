"""vhost-user-rng: a virtio-rng device (an entropy source for the guest's /dev/hwrng),
written in Python on the chain API.

The device type registered as ``rng`` (pyproject.toml, group ``vhost.devices``): its
options, and one :class:`~devices.rng.device.RngDevice` per --socket-path. QEMU attaches
with ``-chardev socket,id=rng0,path=SOCK -device vhost-user-rng-pci,chardev=rng0``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from devices.rng.device import RngDevice, RngOptions
from vhost.cli import run
from vhost.device import Device, DeviceType, UsageError

__all__ = ["DEVICE", "RngDevice", "RngOptions", "main"]


class RngType(DeviceType):
    name = "rng"
    program = "vhost-user-rng"
    summary = "virtio-rng entropy source, from getrandom or a file (Python chain API)"
    backend_type = "rng"
    description = (
        "vhost-user-rng back end: a virtio-rng device filled from the host's "
        "getrandom() or from --source FILE, optionally rate limited."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--source",
            metavar="FILE",
            help="read entropy from FILE (e.g. /dev/hwrng) instead of getrandom()",
        )
        parser.add_argument(
            "--max-bytes-per-second",
            type=int,
            metavar="N",
            help="give the guest at most N bytes per second (default: no limit)",
        )

    def create(self, args: argparse.Namespace, sockets: Sequence[str | None]) -> list[Device]:
        devices: list[Device] = []
        try:
            for _ in sockets:
                devices.append(RngDevice(RngOptions(args.source, args.max_bytes_per_second)))
        except ValueError as e:
            for device in devices:
                device.close()
            raise UsageError(str(e)) from None
        return devices

    def qemu_device_args(self, chardev: str, device: Device) -> list[str]:
        return ["-device", f"vhost-user-rng-pci,chardev={chardev}"]

    def describe(self, device: Device, where: str) -> str:
        assert isinstance(device, RngDevice)
        o = device.opts
        rate = f", at most {o.max_bytes_per_second} bytes/s" if o.max_bytes_per_second else ""
        return f"rng on {where}: entropy from {o.source or 'getrandom()'}{rate}"


DEVICE = RngType()


def main() -> None:
    """The ``vhost-user-rng`` console script."""
    sys.exit(run(DEVICE))
