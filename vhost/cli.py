"""The back-end programs, following the vhost-user spec's back-end program
conventions (--socket-path, --fd, --print-capabilities).

Bad arguments give one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import NoReturn

from devices.blk import BlkDevice, BlkOptions, ImageError, parse_size
from vhost.device import Device
from vhost.server import Server, SocketInUse, listen_unix, socket_from_fd

log = logging.getLogger("vhost")

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _blk_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vhost-user-blk",
                 description="vhost-user-blk back end: serves a raw image or block device "
                             "as a virtio-blk disk to QEMU over a unix socket.")
    ap.add_argument("--socket-path", metavar="PATH", help="unix socket to listen on")
    ap.add_argument("--fd", type=int, metavar="N", help="inherited listening socket fd")
    ap.add_argument("--blk-file", metavar="FILE", help="raw image file or block device")
    ap.add_argument("--size", metavar="SIZE",
                    help="create FILE sparse with this size if missing (e.g. 1G)")
    ap.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO")
    ap.add_argument("--num-queues", type=int, default=1, metavar="N", help="queues (default 1)")
    ap.add_argument("--serial", default="", metavar="S", help="serial for GET_ID (<= 20 bytes)")
    ap.add_argument("--print-capabilities", action="store_true",
                    help="print the back end's capabilities as JSON and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def qemu_command_line(socket_path: str, num_queues: int = 1, mem: str = "512M") -> str:
    """The QEMU options that attach a guest to this back end."""
    return (f"qemu-system-x86_64 -m {mem} "
            f"-object memory-backend-memfd,id=mem,size={mem},share=on -numa node,memdev=mem "
            f"-chardev socket,id=vub0,path={socket_path},reconnect=1 "
            f"-device vhost-user-blk-pci,chardev=vub0,num-queues={num_queues} ...")


def _setup_logging(prog: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s {prog}[%(process)d] %(levelname)s %(name)s: %(message)s")


async def _serve(server: Server, device: Device, socket_path: str | None) -> None:
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, server.stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        await server.serve_forever()
    finally:
        # Queues are stopped by now (their batches finished); make the data durable.
        await loop.run_in_executor(None, device.flush)
        device.close()
        server.listener.close()
        if socket_path:
            try:
                os.unlink(socket_path)
            except FileNotFoundError:
                pass
        log.info("stopped")


def blk_main(argv: list[str] | None = None) -> int:
    ap = _blk_parser()
    args = ap.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": "block", "features": ["read-only", "blk-file"]}))
        return 0
    if (args.socket_path is None) == (args.fd is None):
        ap.error("give exactly one of --socket-path PATH or --fd N")
    if not args.blk_file:
        ap.error("--blk-file FILE is required")
    try:
        size = parse_size(args.size) if args.size is not None else None
        device = BlkDevice(BlkOptions(path=args.blk_file, size=size, read_only=args.read_only,
                                      num_queues=args.num_queues, serial=args.serial))
    except (ValueError, ImageError) as e:
        ap.error(str(e))
    # From the moment the socket accepts, SIGTERM/SIGINT must mean a clean stop: hold
    # them until the event loop's handlers are in place (_serve unblocks them).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        listener = (listen_unix(args.socket_path) if args.socket_path
                    else socket_from_fd(args.fd))
    except SocketInUse as e:
        device.close()
        if device.created:
            os.unlink(args.blk_file)  # leave no trace of a start that did not happen
        ap.error(str(e))

    _setup_logging("vhost-user-blk", args.verbose)
    where = args.socket_path or f"fd {args.fd}"
    log.info("serving %s (%d bytes%s, %d queue%s) on %s", args.blk_file, device.size,
             ", read-only" if args.read_only else "", args.num_queues,
             "s" if args.num_queues > 1 else "", where)
    if args.socket_path:
        log.info("attach with: %s", qemu_command_line(os.path.abspath(args.socket_path),
                                                      args.num_queues))
    import uvloop

    server = Server(listener, device, name=os.path.basename(args.socket_path or "fd"))
    uvloop.run(_serve(server, device, args.socket_path))
    return 0


def main() -> None:
    sys.exit(blk_main())
