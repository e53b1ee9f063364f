"""The back-end programs, following the vhost-user spec's back-end program
conventions (--socket-path, --fd, --print-capabilities).

Bad arguments give one line on stderr and exit status 2, never a traceback.

One process may serve several devices: ``vhost-user-blk`` pairs repeated --socket-path
and --blk-file options in order (one disk per socket), ``vhost-user-net`` makes one
switch port per --socket-path. Each socket gets a Server of its own (one front end at a
time each) on the shared event loop; each queue still has its own worker thread, so a
busy disk does not wait for another one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from devices.blk import BlkDevice, BlkOptions, ImageError, parse_size
from devices.net import (
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
from vhost.server import Server, SocketInUse, listen_unix, socket_from_fd

log = logging.getLogger("vhost")

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _blk_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vhost-user-blk",
                 description="vhost-user-blk back end: serves a raw image or block device "
                             "as a virtio-blk disk to QEMU over a unix socket. Several disks: "
                             "repeat --socket-path and --blk-file, paired in order.")
    ap.add_argument("--socket-path", metavar="PATH", action="append", default=[],
                    help="unix socket to listen on; repeat for several disks")
    ap.add_argument("--fd", type=int, metavar="N", help="inherited listening socket fd")
    ap.add_argument("--blk-file", metavar="FILE", action="append", default=[],
                    help="raw image file or block device; one per --socket-path, same order")
    ap.add_argument("--size", metavar="SIZE",
                    help="create FILE sparse with this size if missing (e.g. 1G; every disk)")
    ap.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO (every disk)")
    ap.add_argument("--num-queues", type=int, default=1, metavar="N",
                    help="queues per disk (default 1)")
    ap.add_argument("--serial", metavar="S", action="append", default=[],
                    help="serial for GET_ID (<= 20 bytes); with several disks, none or one "
                         "per disk, same order")
    ap.add_argument("--print-capabilities", action="store_true",
                    help="print the back end's capabilities as JSON and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def qemu_command_line(socket_paths: str | Sequence[str], num_queues: int = 1,
                      mem: str = "512M") -> str:
    """The QEMU options that attach a guest to this back end (one disk per socket)."""
    paths = [socket_paths] if isinstance(socket_paths, str) else list(socket_paths)
    disks = " ".join(f"-chardev socket,id=vub{i},path={path},reconnect=1 "
                     f"-device vhost-user-blk-pci,chardev=vub{i},num-queues={num_queues}"
                     for i, path in enumerate(paths))
    return (f"qemu-system-x86_64 -m {mem} "
            f"-object memory-backend-memfd,id=mem,size={mem},share=on -numa node,memdev=mem "
            f"{disks} ...")


def _setup_logging(prog: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s {prog}[%(process)d] %(levelname)s %(name)s: %(message)s")


async def _serve(servers: list[tuple[Server, str | None]]) -> int:
    """Run every server until SIGINT/SIGTERM; then flush and close each device and
    remove each socket file. Returns the exit status: 1 if a device could not be
    flushed (its data may not be durable), else 0."""
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for server, _ in servers:
            server.stop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_all)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    status = 0
    try:
        await asyncio.gather(*(server.serve_forever() for server, _ in servers))
    finally:
        for server, socket_path in servers:
            # Queues are stopped by now (their batches finished); make the data durable.
            try:
                await loop.run_in_executor(None, server.device.flush)
            except OSError as e:
                status = 1
                log.error("%s: flushing at exit failed: %s; writes since the guest's last "
                          "flush may not be durable", server.name, e.strerror)
            server.device.close()
            server.listener.close()
            if socket_path:
                try:
                    os.unlink(socket_path)
                except FileNotFoundError:
                    pass
        log.info("stopped")
    return status


def _check_blk_disks(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The disk options must pair up: one --blk-file (and --serial, if any) per socket."""
    if bool(args.socket_path) == (args.fd is not None):
        ap.error("give exactly one of --socket-path PATH (one per disk) or --fd N")
    if not args.blk_file:
        ap.error("--blk-file FILE is required")
    sockets = len(args.socket_path) or 1  # --fd: one socket
    if args.fd is not None and len(args.blk_file) > 1:
        ap.error(f"--fd N serves one disk, but {len(args.blk_file)} --blk-file were given "
                 "(use one --socket-path per disk)")
    if len(args.blk_file) != sockets:
        ap.error(f"{sockets} --socket-path but {len(args.blk_file)} --blk-file: give one "
                 "--blk-file per --socket-path, in the same order")
    if args.serial and len(args.serial) != sockets:
        ap.error(f"{len(args.serial)} --serial for {sockets} disks: give one --serial per "
                 "disk, in the same order, or none")
    for option, values in (("--socket-path", args.socket_path), ("--blk-file", args.blk_file)):
        seen: set[str] = set()
        for value in values:
            key = os.path.realpath(value)
            if key in seen:
                ap.error(f"{option} {value} is given twice (each disk needs its own)")
            seen.add(key)


def _discard_blk_devices(devices: list[BlkDevice]) -> None:
    """Undo a start that did not happen: close the images and remove those this run
    created, so a refused start leaves no trace."""
    for device in devices:
        device.close()
        if device.created:
            os.unlink(device.opts.path)


def blk_main(argv: list[str] | None = None) -> int:
    ap = _blk_parser()
    args = ap.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": "block", "features": ["read-only", "blk-file"]}))
        return 0
    _check_blk_disks(ap, args)
    paths: list[str | None] = list(args.socket_path) or [None]
    serials: list[str] = list(args.serial) or [""] * len(paths)
    devices: list[BlkDevice] = []
    try:
        size = parse_size(args.size) if args.size is not None else None
        for blk_file, serial in zip(args.blk_file, serials):
            devices.append(BlkDevice(BlkOptions(
                path=blk_file, size=size, read_only=args.read_only,
                num_queues=args.num_queues, serial=serial)))
    except (ValueError, ImageError) as e:
        _discard_blk_devices(devices)
        ap.error(str(e))
    # From the moment a socket accepts, SIGTERM/SIGINT must mean a clean stop: hold
    # them until the event loop's handlers are in place (_serve unblocks them).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    servers: list[tuple[Server, str | None]] = []
    try:
        for path, device in zip(paths, devices):
            listener = listen_unix(path) if path else socket_from_fd(args.fd)
            servers.append((Server(listener, device, name=os.path.basename(path or "fd")),
                            path))
    except SocketInUse as e:
        for server, path in servers:
            server.listener.close()
            if path:
                os.unlink(path)
        _discard_blk_devices(devices)
        ap.error(str(e))

    _setup_logging("vhost-user-blk", args.verbose)
    for (server, path), device in zip(servers, devices):
        where = path or f"fd {args.fd}"
        log.info("serving %s (%d bytes%s, %d queue%s) on %s", device.opts.path, device.size,
                 ", read-only" if args.read_only else "", args.num_queues,
                 "s" if args.num_queues > 1 else "", where)
    if args.socket_path:
        log.info("attach with: %s", qemu_command_line(
            [os.path.abspath(path) for path in args.socket_path], args.num_queues))
    import uvloop

    return uvloop.run(_serve(servers))


def _net_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vhost-user-net",
                 description="vhost-user-net back end: a virtio-net port on a TAP device, or "
                             "ports on a learning switch inside this process.")
    ap.add_argument("--socket-path", metavar="PATH", action="append", default=[],
                    help="unix socket to listen on; repeat for several switch ports")
    ap.add_argument("--fd", type=int, metavar="N", help="inherited listening socket fd")
    be = ap.add_mutually_exclusive_group()
    be.add_argument("--tap", metavar="NAME", help="attach to (or create) this TAP device")
    be.add_argument("--switch", metavar="NAME", help="ports on a switch inside the daemon")
    ap.add_argument("--mac", metavar="MAC", help="MAC address (default: derived from the "
                    "socket path; with several sockets, each gets its own)")
    ap.add_argument("--num-queues", type=int, default=1, metavar="N", help="queue pairs")
    ap.add_argument("--mtu", type=int, default=DEFAULT_MTU, metavar="N", help="MTU (1500)")
    ap.add_argument("--busy-poll-us", type=int, default=DEFAULT_BUSY_POLL_US, metavar="US",
                    help="keep polling the rings this long after the last frame before "
                         f"sleeping on the kick fds (default {DEFAULT_BUSY_POLL_US}; 0: never)")
    ap.add_argument("--print-capabilities", action="store_true",
                    help="print the back end's capabilities as JSON and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def net_main(argv: list[str] | None = None) -> int:
    ap = _net_parser()
    args = ap.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": "net"}))
        return 0
    if bool(args.socket_path) == (args.fd is not None):
        ap.error("give --socket-path PATH (one or more) or --fd N")
    if not (args.tap or args.switch):
        ap.error("give --tap NAME or --switch NAME")
    if args.tap and len(args.socket_path) > 1:
        ap.error("--tap serves one port: give one --socket-path (use --switch for several)")
    if args.mac and len(args.socket_path) > 1:
        ap.error("--mac names one port: with several --socket-path each gets its own MAC")
    paths: list[str | None] = list(args.socket_path) or [None]
    if args.switch and len(paths) * args.num_queues > MAX_ENGINE_PAIRS:
        ap.error(f"{len(paths)} ports x {args.num_queues} queue pairs is more than a switch "
                 f"serves ({MAX_ENGINE_PAIRS} queue pairs)")
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    devices: list[NetDevice] = []
    servers: list[tuple[Server, str | None]] = []
    try:
        switch = Switch(args.switch, args.busy_poll_us) if args.switch else None
        for path in paths:
            mac = parse_mac(args.mac) if args.mac else default_mac(path or f"fd{args.fd}")
            tap = (TapBackend(args.tap, args.num_queues, args.busy_poll_us) if args.tap
                   else None)
            opts = NetOptions(mac=mac, num_queue_pairs=args.num_queues, mtu=args.mtu)
            devices.append(NetDevice(opts, tap=tap, switch=switch))
            listener = listen_unix(path) if path else socket_from_fd(args.fd)
            servers.append((Server(listener, devices[-1], name=os.path.basename(path or "fd")),
                            path))
    except (ValueError, SocketInUse) as e:
        for d in devices:
            d.close()
        for server, path in servers:
            server.listener.close()
            if path:
                os.unlink(path)
        ap.error(str(e))

    _setup_logging("vhost-user-net", args.verbose)
    for (server, path), dev in zip(servers, devices):
        log.info("port %s (MAC %s) on %s, %s %s", server.name, format_mac(dev.opts.mac),
                 path or f"fd {args.fd}", "TAP" if args.tap else "switch",
                 args.tap or args.switch)
    import uvloop

    return uvloop.run(_serve(servers))


def net_entry() -> None:
    sys.exit(net_main())


def main() -> None:
    sys.exit(blk_main())
