"""vhost-user-blk: a raw image or block device served as a virtio-blk disk.

The device type registered as ``blk`` (pyproject.toml, group ``vhost.devices``): its
options, and one :class:`~devices.blk.device.BlkDevice` per --socket-path, paired in
order with --blk-file (and --serial). The requests are handled in C (blk.c) by one
worker thread per queue.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from devices.blk.device import MAX_QUEUES, BlkDevice, BlkOptions, ImageError, parse_size
from vhost.cli import run
from vhost.device import Device, DeviceType, UsageError

__all__ = ["DEVICE", "BlkDevice", "BlkOptions", "main"]

#: queues offered unless --num-queues says otherwise: as many as a disk may have, so
#: that QEMU's default (``num-queues`` = one per vCPU) attaches. A queue costs nothing
#: until the front end enables it; only then does it get its worker thread.
DEFAULT_QUEUES = MAX_QUEUES


class BlkType(DeviceType):
    name = "blk"
    program = "vhost-user-blk"
    summary = "virtio-blk disk on a raw image or block device (C data path)"
    backend_type = "block"
    chardev_prefix = "vub"
    description = (
        "vhost-user-blk back end: serves a raw image or block device as a "
        "virtio-blk disk to QEMU over a unix socket. Several disks: repeat "
        "--socket-path and --blk-file, paired in order."
    )

    def capabilities(self) -> dict[str, object]:
        return {"type": "block", "features": ["read-only", "blk-file"]}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--blk-file",
            metavar="FILE",
            action="append",
            default=[],
            help="raw image file or block device; one per --socket-path, same order",
        )
        parser.add_argument(
            "--size",
            metavar="SIZE",
            help="create FILE sparse with this size if missing (e.g. 1G; every disk)",
        )
        parser.add_argument(
            "--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO (every disk)"
        )
        parser.add_argument(
            "--num-queues",
            type=int,
            default=DEFAULT_QUEUES,
            metavar="N",
            help=f"queues offered per disk (default and most: {MAX_QUEUES}); the front end "
            "uses as many as it asks for (QEMU: num-queues, one per vCPU by default) and "
            "only those run",
        )
        parser.add_argument(
            "--serial",
            metavar="S",
            action="append",
            default=[],
            help="serial for GET_ID (<= 20 bytes); with several disks, none "
            "or one per disk, same order",
        )

    def create(self, args: argparse.Namespace, sockets: Sequence[str | None]) -> list[Device]:
        _check_pairing(args, len(sockets))
        serials: list[str] = list(args.serial) or [""] * len(sockets)
        devices: list[Device] = []
        try:
            size = parse_size(args.size) if args.size is not None else None
            for blk_file, serial in zip(args.blk_file, serials, strict=True):
                devices.append(
                    BlkDevice(
                        BlkOptions(
                            path=blk_file,
                            size=size,
                            read_only=args.read_only,
                            num_queues=args.num_queues,
                            serial=serial,
                        )
                    )
                )
        except (ValueError, ImageError) as e:
            for device in devices:
                device.abort()  # a refused start leaves no image behind
            raise UsageError(str(e)) from None
        return devices

    def qemu_device_args(self, chardev: str, device: Device) -> list[str]:
        assert isinstance(device, BlkDevice)
        nq = device.opts.num_queues
        # QEMU's default (one queue per vCPU) fits the default offer
        queues = "" if nq == DEFAULT_QUEUES else f",num-queues={nq}"
        return ["-device", f"vhost-user-blk-pci,chardev={chardev}{queues}"]

    def describe(self, device: Device, where: str) -> str:
        assert isinstance(device, BlkDevice)
        o = device.opts
        return (
            f"serving {o.path} ({device.size} bytes{', read-only' if o.read_only else ''}, "
            f"{o.num_queues} queue{'s' if o.num_queues > 1 else ''}) on {where}"
        )


def _check_pairing(args: argparse.Namespace, sockets: int) -> None:
    """One --blk-file (and --serial, if any) per socket."""
    if not args.blk_file:
        raise UsageError("--blk-file FILE is required")
    if args.fd is not None and len(args.blk_file) > 1:
        raise UsageError(
            f"--fd N serves one disk, but {len(args.blk_file)} --blk-file were "
            "given (use one --socket-path per disk)"
        )
    if len(args.blk_file) != sockets:
        raise UsageError(
            f"{sockets} --socket-path but {len(args.blk_file)} --blk-file: give "
            "one --blk-file per --socket-path, in the same order"
        )
    if args.serial and len(args.serial) != sockets:
        raise UsageError(
            f"{len(args.serial)} --serial for {sockets} disks: give one --serial "
            "per disk, in the same order, or none"
        )
    seen: set[str] = set()
    for value in args.blk_file:
        key = os.path.realpath(value)
        if key in seen:
            raise UsageError(f"--blk-file {value} is given twice (each disk needs its own)")
        seen.add(key)


DEVICE = BlkType()


def main() -> None:
    """The ``vhost-user-blk`` console script."""
    sys.exit(run(DEVICE))
