"""One program for every registered device, following the vhost-user spec's back-end
program conventions (--socket-path, --fd, --print-capabilities), plus client mode
(--client: connect to a front end that listens, see docs/client-mode.md).

``python -m vhost`` lists the registered devices (vhost.registry); ``python -m vhost
NAME ...`` runs one; each device also has a console script (``vhost-user-blk`` and so
on) that calls :func:`run` with its type. The program owns what every back end shares:
the sockets (one or more --socket-path, or --fd), logging (-v), signals and the clean
exit; the device type adds its options and makes one device per socket.

Bad arguments give one line on stderr and exit status 2, never a traceback.
``--print-capabilities`` is the exception the spec makes: it prints the JSON and exits 0
whatever else is on the command line ("other options are ignored"), even options that
are missing, unknown or in conflict.

One process may serve several devices: each socket gets a Server of its own (one front
end at a time each) on the shared event loop; queues still run where their device says
(their own worker threads for blk), so a busy disk does not wait for another one.

Boundary: imports no device; the registry finds them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from vhost import registry
from vhost.device import Device, DeviceType
from vhost.server import (
    BadSocketPath,
    Connector,
    Listener,
    Server,
    SocketInUse,
    listen_unix,
    socket_from_fd,
)

log = logging.getLogger("vhost")

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(device_type: DeviceType) -> argparse.ArgumentParser:
    ap = _Parser(prog=device_type.program, description=device_type.description or None)
    ap.add_argument(
        "--socket-path",
        metavar="PATH",
        action="append",
        default=[],
        help="unix socket to listen on (with --client: to connect to); repeat for several devices",
    )
    ap.add_argument("--fd", type=int, metavar="N", help="inherited listening socket fd")
    ap.add_argument(
        "--client",
        action="store_true",
        help="client mode: connect to each --socket-path, where the front end listens "
        "(QEMU -chardev socket,server=on,wait=off); retry until it accepts, and connect "
        "again whenever the connection drops",
    )
    ap.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the back end's capabilities as JSON and exit",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    device_type.add_arguments(ap)
    return ap


def qemu_command_line(
    device_type: DeviceType,
    paths: Sequence[str],
    devices: Sequence[Device],
    mem: str = "512M",
    *,
    client: bool = False,
) -> str:
    """The QEMU options that attach a guest to these devices (one per socket): QEMU
    reconnects to a back end that listens, and listens for one in client mode. Plain
    ``server=on`` there: QEMU 7.2 aborts in vhost-user-rng-pci's realize given
    ``wait=off`` and no back end yet, and blk and net wait at start-up for their back
    end either way (docs/client-mode.md)."""
    chardev_opts = "server=on" if client else "reconnect=1"
    parts = []
    for i, (path, device) in enumerate(zip(paths, devices, strict=True)):
        chardev = f"{device_type.chardev_prefix or device_type.name}{i}"
        parts.append(f"-chardev socket,id={chardev},path={path},{chardev_opts}")
        parts.extend(device_type.qemu_device_args(chardev, device))
    return (
        f"qemu-system-x86_64 -m {mem} "
        f"-object memory-backend-memfd,id=mem,size={mem},share=on -numa node,memdev=mem "
        f"{' '.join(parts)} ..."
    )


def _setup_logging(prog: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {prog}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


async def _serve(servers: list[tuple[Server, str | None]]) -> int:
    """Run every server until SIGINT/SIGTERM; then flush and close each device and
    remove each socket file it listened on (``None`` for one that is not ours: --fd, or
    the front end's in client mode). Returns the exit status: 1 if a device could not
    be flushed (its data may not be durable), else 0."""
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
                log.error(
                    "%s: flushing at exit failed: %s; writes since the guest's last "
                    "flush may not be durable",
                    server.name,
                    e.strerror,
                )
            server.device.close()
            server.close()
            if socket_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path)
        log.info("stopped")
    return status


def wants_capabilities(argv: Sequence[str]) -> bool:
    """Whether ``--print-capabilities`` is on the command line (before any ``--``),
    looked for before parsing: the spec says the other options are then ignored, so
    nothing else may stop it, not even an option that is missing or unknown."""
    args = list(argv)
    if "--" in args:
        args = args[: args.index("--")]
    return "--print-capabilities" in args


def _make_servers(
    args: argparse.Namespace, paths: Sequence[str | None], devices: Sequence[Device]
) -> list[tuple[Server, str | None]]:
    """One Server per device: connecting out (--client), or listening on its path or
    the inherited socket. Each entry has the socket file the daemon must remove at
    exit (None when the file is not its own). Raises SocketInUse or BadSocketPath,
    having closed and removed what it made."""
    servers: list[tuple[Server, str | None]] = []
    try:
        for path, device in zip(paths, devices, strict=True):
            name = os.path.basename(path or "fd")
            if args.client:
                assert path is not None
                servers.append((Server(Connector(path, name), device, name=name), None))
            else:
                sock = listen_unix(path) if path else socket_from_fd(args.fd)
                servers.append((Server(Listener(sock), device, name=name), path))
    except (SocketInUse, BadSocketPath):
        for server, owned in servers:
            server.close()
            if owned:
                os.unlink(owned)
        raise
    return servers


def run(device_type: DeviceType, argv: Sequence[str] | None = None) -> int:
    """The program for one device type; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_capabilities(argv):
        print(json.dumps(device_type.capabilities()))
        return 0
    ap = make_parser(device_type)
    args = ap.parse_args(argv)
    if args.print_capabilities:  # abbreviated (--print-cap): the rest parsed, too
        print(json.dumps(device_type.capabilities()))
        return 0
    if bool(args.socket_path) == (args.fd is not None):
        ap.error("give exactly one of --socket-path PATH (one per device) or --fd N")
    if args.client and args.fd is not None:
        ap.error("--client connects to --socket-path PATH; it cannot serve --fd N")
    paths: list[str | None] = list(args.socket_path) or [None]
    seen: set[str] = set()
    for path in args.socket_path:
        key = os.path.realpath(path)
        if key in seen:
            ap.error(f"--socket-path {path} is given twice (each device needs its own)")
        seen.add(key)
    # From the moment a socket accepts, SIGTERM/SIGINT must mean a clean stop: hold
    # them until the event loop's handlers are in place (_serve unblocks them).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        devices = device_type.create(args, paths)
    except ValueError as e:
        ap.error(str(e))
    if len(devices) != len(paths):
        raise RuntimeError(
            f"{device_type.name}: made {len(devices)} devices for {len(paths)} sockets"
        )
    try:
        servers = _make_servers(args, paths, devices)
    except (SocketInUse, BadSocketPath) as e:
        for device in devices:
            device.abort()
        ap.error(str(e))

    _setup_logging(device_type.program, args.verbose)
    for path, device in zip(paths, devices, strict=True):
        log.info("%s", device_type.describe(device, f"fd {args.fd}" if path is None else path))
    if args.client:
        log.info(
            "client mode: connecting to each socket, where the front end listens, and "
            "again whenever the connection drops"
        )
    if args.socket_path:
        line = qemu_command_line(
            device_type,
            [os.path.abspath(p) for p in args.socket_path],
            devices,
            client=args.client,
        )
        log.info("attach with: %s", line)
    import uvloop

    return uvloop.run(_serve(servers))


def _usage() -> str:
    lines = [
        "usage: python -m vhost DEVICE [options]   (python -m vhost DEVICE --help)",
        "",
        "devices:",
    ]
    for name in registry.names():
        try:
            summary = registry.load(name).summary
        except registry.RegistryError as e:
            summary = f"(cannot be loaded: {e})"
        lines.append(f"  {name:<10} {summary}")
    if not registry.names():
        lines.append("  (none registered: is the package installed?)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vhost``: list the devices, or run the one named first."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = args.pop(0)
    try:
        device_type = registry.load(name)
    except registry.RegistryError as e:
        print(f"python -m vhost: error: {e}", file=sys.stderr)
        return 2
    return run(device_type, args)
