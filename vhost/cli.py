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
import fcntl
import grp
import json
import logging
import logging.handlers
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from vhost import config, registry, systemd
from vhost.device import Device, DeviceType, UsageError
from vhost.server import (
    DEFAULT_SOCKET_MODE,
    BadSocketPath,
    Connector,
    Listener,
    Server,
    SocketInUse,
    check_connect_path,
    check_listen_path,
    listen_unix,
    socket_from_fd,
)

if TYPE_CHECKING:  # imported when --metrics asks for it
    from vhost.metrics import MetricsServer

log = logging.getLogger("vhost")

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
LOG_LEVELS = ("debug", "info", "warning", "error")
#: options that are the whole program's (the rest are a device's: its socket and the
#: device type's own options); dests, as argparse names them
PROGRAM_WIDE = (
    "client",
    "socket_group",
    "socket_mode",
    "pidfile",
    "log_level",
    "syslog",
    "syslog_socket",
    "metrics",
    "verbose",
)
#: where a device's socket comes from
SOCKET_OPTIONS = ("socket_path", "fd", "socket_name")


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
        "--socket-name",
        metavar="NAME",
        action="append",
        default=[],
        help="serve the socket systemd passed under this name (LISTEN_FDNAMES, "
        "FileDescriptorName= in the .socket unit); repeat for several devices. Without "
        "--socket-path, --fd or --socket-name, every passed socket is a device, in order",
    )
    ap.add_argument(
        "--client",
        action="store_true",
        help="client mode: connect to each --socket-path, where the front end listens "
        "(QEMU -chardev socket,server=on,wait=off); retry until it accepts, and connect "
        "again whenever the connection drops",
    )
    ap.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="give the socket files this group (name or number) and mode 0660, so that "
        "a front end run as another user in the group can connect (libvirt's QEMU runs "
        "as libvirt-qemu)",
    )
    ap.add_argument(
        "--socket-mode",
        metavar="MODE",
        help="octal mode of the socket files (default 0600, or 0660 with --socket-group)",
    )
    ap.add_argument(
        "--pidfile",
        metavar="PATH",
        help="write the daemon's pid here once it is ready (locked while it runs, removed at exit)",
    )
    ap.add_argument(
        "--metrics",
        metavar="[ADDR:]PORT",
        help="serve counters in Prometheus text format on http://ADDR:PORT/metrics "
        "(ADDR defaults to 127.0.0.1)",
    )
    ap.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file naming the devices ([[device]] tables) and program-wide options",
    )
    ap.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the back end's capabilities as JSON and exit",
    )
    ap.add_argument(
        "--log-level", choices=LOG_LEVELS, help="the least severe messages logged (default info)"
    )
    ap.add_argument(
        "--syslog", action="store_true", help="log to syslog (facility daemon) instead of stderr"
    )
    ap.add_argument(
        "--syslog-socket",
        metavar="PATH",
        default="/dev/log",
        help="the syslog socket for --syslog (default /dev/log)",
    )
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (--log-level debug)"
    )
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


# =========================================================================================
# Logging
# =========================================================================================

_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    """stderr read by journald: a <priority> prefix per line (SyslogLevelPrefix=), and
    no timestamp or pid, which the journal records itself."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{super().format(record)}"


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=DEV:INODE when stderr goes to the journal."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def _log_handler(prog: str, args: argparse.Namespace) -> logging.Handler:
    """The handler --syslog or stderr asks for; raises OSError if syslog is unreachable."""
    if args.syslog:
        # SysLogHandler only complains when it first sends: try the socket now
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
            probe.connect(args.syslog_socket)
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address=args.syslog_socket, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(
            logging.Formatter(f"{prog}[%(process)d]: %(levelname)s %(name)s: %(message)s")
        )
        return handler
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s {prog}[%(process)d] %(levelname)s %(name)s: %(message)s"
            )
        )
    return handler


def _log_level(args: argparse.Namespace) -> int:
    if args.log_level:
        return int(getattr(logging, args.log_level.upper()))
    return logging.DEBUG if args.verbose else logging.INFO


def _setup_logging(handler: logging.Handler, level: int) -> None:
    # A log sink that goes away (syslog restarted) must not fill stderr with tracebacks
    logging.raiseExceptions = False
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# =========================================================================================
# Where each device's socket comes from
# =========================================================================================


@dataclass
class Endpoint:
    """One device's socket: ``kind`` is "listen" (a path we bind), "connect" (client
    mode), "fd" (--fd N) or "activated" (passed by systemd)."""

    kind: str
    #: the socket file's path, where there is one (what the device type is told)
    path: str | None
    #: for the log: the path, "fd N" or "systemd socket NAME"
    where: str
    sock: socket.socket | None = None
    #: --fd N (its socket is taken when the servers are made)
    fd: int | None = None


class _Activated:
    """The sockets systemd passed, handed out by name or in order, each once."""

    def __init__(self, sockets: list[systemd.ActivatedSocket]) -> None:
        self.sockets = sockets
        self.taken: set[int] = set()

    def _endpoint(self, i: int) -> Endpoint:
        self.taken.add(i)
        a = self.sockets[i]
        where = f"systemd socket {a.name}" + (f" ({a.path})" if a.path else "")
        return Endpoint("activated", a.path or None, where, a.sock)

    def by_name(self, name: str) -> Endpoint:
        if not self.sockets:
            raise UsageError(
                f"--socket-name {name}: no sockets were passed by socket activation "
                "(LISTEN_FDS is not set for this process)"
            )
        for i, a in enumerate(self.sockets):
            if a.name == name and i not in self.taken:
                return self._endpoint(i)
        names = ", ".join(a.name for a in self.sockets)
        raise UsageError(
            f"--socket-name {name}: no passed socket has that name, or it is used twice "
            f"(LISTEN_FDNAMES: {names})"
        )

    def rest(self) -> list[Endpoint]:
        return [self._endpoint(i) for i in range(len(self.sockets)) if i not in self.taken]

    def unused(self) -> list[systemd.ActivatedSocket]:
        return [a for i, a in enumerate(self.sockets) if i not in self.taken]


def _endpoints(args: argparse.Namespace, activated: _Activated) -> list[Endpoint]:
    """The sockets one parsed set of device options names (several with repeated
    --socket-path or --socket-name). Raises UsageError."""
    given = [bool(args.socket_path), args.fd is not None, bool(args.socket_name)]
    if sum(given) > 1:
        raise UsageError(
            "give one of --socket-path PATH, --fd N or --socket-name NAME for each device"
        )
    if args.client and not args.socket_path:
        raise UsageError(
            "--client connects to --socket-path PATH; it cannot serve --fd N or a passed socket"
        )
    if args.socket_path:
        kind = "connect" if args.client else "listen"
        return [Endpoint(kind, path, path) for path in args.socket_path]
    if args.fd is not None:
        return [Endpoint("fd", None, f"fd {args.fd}", fd=args.fd)]
    if args.socket_name:
        return [activated.by_name(name) for name in args.socket_name]
    rest = activated.rest()
    if not rest:
        raise UsageError(
            "give --socket-path PATH (one per device) or --fd N, or start the program "
            "with sockets passed by socket activation (LISTEN_FDS)"
        )
    return rest


def _socket_access(args: argparse.Namespace) -> tuple[int, int | None]:
    """(mode, gid) for the socket files we create."""
    gid: int | None = None
    if args.socket_group is not None:
        g = args.socket_group
        try:
            gid = grp.getgrnam(g).gr_gid
        except KeyError:
            if not g.isdigit():
                raise UsageError(f"--socket-group {g}: no such group") from None
            gid = int(g)
    mode = 0o660 if gid is not None else DEFAULT_SOCKET_MODE
    if args.socket_mode is not None:
        try:
            mode = int(args.socket_mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            raise UsageError(f"--socket-mode {args.socket_mode}: give an octal mode such as 0660")
    return mode, gid


# =========================================================================================
# The plan: what to start, checked before anything starts
# =========================================================================================


@dataclass
class _Group:
    """One create() call: the options and the sockets of the devices it makes."""

    args: argparse.Namespace
    endpoints: list[Endpoint]


def _dests(ap: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in ap._actions if a.option_strings}


def _long_name(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))[2:]


def _device_dests(ap: argparse.ArgumentParser) -> list[str]:
    skip = {*PROGRAM_WIDE, "help", "print_capabilities", "config"}
    return [d for d in _dests(ap) if d not in skip]


def _plan(
    ap: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace, activated: _Activated
) -> tuple[argparse.Namespace, list[_Group]]:
    """The program-wide options and the groups of devices to make. Raises UsageError."""
    if args.config is None:
        return args, [_Group(args, _endpoints(args, activated))]
    dests = _dests(ap)
    on_command_line = [d for d in _device_dests(ap) if getattr(args, d) != ap.get_default(d)]
    if on_command_line:
        names = ", ".join(f"--{_long_name(dests[d])}" for d in on_command_line)
        raise UsageError(
            f"with --config, device options go in the file's [[device]] tables ({names} "
            "given on the command line)"
        )
    program_names = {_long_name(dests[d]) for d in PROGRAM_WIDE}
    device_names = {_long_name(dests[d]) for d in _device_dests(ap)}
    try:
        conf = config.load(args.config, program_names, device_names)
    except config.ConfigError as e:
        raise UsageError(str(e)) from None
    # The command line's program-wide options come after the file's: they win.
    without_config = _strip_config(argv)
    groups = []
    for i, device_argv in enumerate(conf.devices):
        ns = ap.parse_args([*conf.program, *without_config, *device_argv])
        try:
            groups.append(_Group(ns, _endpoints(ns, activated)))
        except UsageError as e:
            raise UsageError(f"--config {args.config}: [[device]] {i + 1}: {e}") from None
    return groups[0].args, groups


def _strip_config(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--config":
            skip = True
        elif not a.startswith("--config="):
            out.append(a)
    return out


# =========================================================================================
# Running
# =========================================================================================


class _PidFile:
    """--pidfile: taken (locked) at start, so a second daemon on the same file is
    refused before it starts anything; the pid is written once the daemon is ready;
    removed at exit (qemu-storage-daemon's behaviour)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UsageError(f"--pidfile {path}: {e.strerror}") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise UsageError(f"--pidfile {path}: held by a daemon that is running") from None

    def write(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


@dataclass
class _Running:
    """Everything started, for _serve and for the clean-up of a start that failed."""

    servers: list[tuple[Server, str | None]]
    devices: list[Device]
    options: argparse.Namespace
    pidfile: _PidFile | None
    describe: list[str] = field(default_factory=list)

    def abort(self) -> None:
        """The start failed after the sockets were made: undo all of it."""
        for server, owned in self.servers:
            server.close()
            if owned:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(owned)
        for device in self.devices:
            device.abort()
        if self.pidfile is not None:
            self.pidfile.remove()


class _StartFailed(Exception):
    """A usage error found once the loop runs (the metrics port is taken)."""


async def _start_metrics(running: _Running) -> MetricsServer | None:
    if running.options.metrics is None:
        return None
    from vhost import metrics

    host, port = metrics.parse_address(running.options.metrics)
    server = metrics.MetricsServer(host, port, [s for s, _ in running.servers])
    try:
        await server.start()
    except OSError as e:
        raise _StartFailed(f"--metrics {running.options.metrics}: {e.strerror or e}") from None
    return server


async def _serve(running: _Running) -> int:
    """Start metrics, say ready, and run every server until SIGINT/SIGTERM; then flush
    and close each device and remove each socket file it listened on (``None`` for one
    that is not ours: --fd, a passed socket, or the front end's in client mode).
    Returns the exit status: 1 if a device could not be flushed (its data may not be
    durable), else 0. Raises _StartFailed, having started nothing that lasts."""
    loop = asyncio.get_running_loop()
    servers = running.servers
    metrics_server = await _start_metrics(running)
    for line in running.describe:
        log.info("%s", line)
    if metrics_server is not None:
        log.info("metrics on %s", metrics_server.url)

    def stop_all() -> None:
        systemd.notify("STOPPING=1")
        for server, _ in servers:
            server.stop()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_all)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # Every socket listens (or, in client mode, is being connected): ready.
    if running.pidfile is not None:
        running.pidfile.write()
    systemd.notify(f"READY=1\nSTATUS=serving {len(servers)} device(s)\nMAINPID={os.getpid()}")
    log.info("ready: %d device%s", len(servers), "" if len(servers) == 1 else "s")
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
        if metrics_server is not None:
            metrics_server.close()
        if running.pidfile is not None:
            running.pidfile.remove()
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
    endpoints: Sequence[Endpoint],
    devices: Sequence[Device],
    mode: int,
    gid: int | None,
) -> list[tuple[Server, str | None]]:
    """One Server per device: connecting out (--client), or listening on its path, the
    inherited socket or a passed one. Each entry has the socket file the daemon must
    remove at exit (None when the file is not its own). Raises SocketInUse or
    BadSocketPath, having closed and removed what it made."""
    servers: list[tuple[Server, str | None]] = []
    try:
        for ep, device in zip(endpoints, devices, strict=True):
            name = os.path.basename(ep.path or ("fd" if ep.kind == "fd" else ep.where.split()[-1]))
            if ep.kind == "connect":
                assert ep.path is not None
                servers.append((Server(Connector(ep.path, name), device, name=name), None))
            elif ep.kind == "listen":
                assert ep.path is not None
                sock = listen_unix(ep.path, mode, gid)
                servers.append((Server(Listener(sock), device, name=name), ep.path))
            else:
                given = socket_from_fd(ep.fd) if ep.fd is not None else ep.sock
                assert given is not None
                servers.append((Server(Listener(given), device, name=name), None))
    except (SocketInUse, BadSocketPath):
        for server, owned in servers:
            server.close()
            if owned:
                os.unlink(owned)
        raise
    return servers


def _check_paths(groups: Sequence[_Group]) -> None:
    """Paths no bind() or connect() could use, and one path for two devices: refused
    before any device is made."""
    seen: set[str] = set()
    for g in groups:
        for ep in g.endpoints:
            if ep.kind == "listen" and ep.path is not None:
                check_listen_path(ep.path)
            elif ep.kind == "connect" and ep.path is not None:
                check_connect_path(ep.path)
            if ep.path:
                key = os.path.realpath(ep.path)
                if key in seen:
                    raise UsageError(
                        f"--socket-path {ep.path} is given twice (each device needs its own)"
                    )
                seen.add(key)


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
    try:
        activated = _Activated(systemd.activated_sockets())
        options, groups = _plan(ap, argv, args, activated)
        mode, gid = _socket_access(options)
        _check_paths(groups)
        handler = _log_handler(device_type.program, options)
    except (UsageError, systemd.ActivationError, SocketInUse, BadSocketPath) as e:
        ap.error(str(e))
    except OSError as e:  # --syslog
        ap.error(f"--syslog: cannot reach {options.syslog_socket}: {e.strerror or e}")
    if options.metrics is not None:
        from vhost import metrics

        try:
            metrics.parse_address(options.metrics)
        except ValueError as e:
            ap.error(str(e))
    for unused in activated.unused():
        unused.sock.close()
    # From the moment a socket accepts, SIGTERM/SIGINT must mean a clean stop: hold
    # them until the event loop's handlers are in place (_serve unblocks them).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pidfile = _PidFile(options.pidfile) if options.pidfile else None
    except UsageError as e:
        ap.error(str(e))
    devices: list[Device] = []
    endpoints: list[Endpoint] = []
    try:
        for g in groups:
            made = device_type.create(g.args, [ep.path for ep in g.endpoints])
            if len(made) != len(g.endpoints):
                raise RuntimeError(
                    f"{device_type.name}: made {len(made)} devices for {len(g.endpoints)} sockets"
                )
            devices += made
            endpoints += g.endpoints
        servers = _make_servers(endpoints, devices, mode, gid)
    except (ValueError, SocketInUse) as e:
        for device in devices:
            device.abort()
        if pidfile is not None:
            pidfile.remove()
        ap.error(str(e))
    running = _Running(servers, devices, options, pidfile)
    running.describe = [
        device_type.describe(d, ep.where) for d, ep in zip(devices, endpoints, strict=True)
    ]
    if (options.socket_group or options.socket_mode) and not any(
        ep.kind == "listen" for ep in endpoints
    ):
        running.describe.append(
            "--socket-group/--socket-mode ignored: they apply to socket files this daemon "
            "creates (a passed socket keeps what its launcher gave it: SocketGroup=, SocketMode=)"
        )
    if unused_names := [a.name for a in activated.unused()]:
        running.describe.append(f"passed sockets not used, closed: {', '.join(unused_names)}")
    if options.client:
        running.describe.append(
            "client mode: connecting to each socket, where the front end listens, and "
            "again whenever the connection drops"
        )
    paths = [ep.path for ep in endpoints]
    if all(paths):
        line = qemu_command_line(
            device_type,
            [os.path.abspath(p) for p in paths if p],
            devices,
            client=options.client,
        )
        running.describe.append(f"attach with: {line}")
    _setup_logging(handler, _log_level(options))
    import uvloop

    try:
        return uvloop.run(_serve(running))
    except _StartFailed as e:
        running.abort()
        ap.error(str(e))


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
    lines += [
        "",
        "commands:",
        "  install-descriptors",
        "             install the JSON descriptors by which QEMU and libvirt find back ends",
        "             (in /usr/share/qemu/vhost-user/; --help for its options)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vhost``: list the devices, or run the one named first."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = args.pop(0)
    if name == "install-descriptors":
        from vhost import descriptors

        return descriptors.main(args)
    try:
        device_type = registry.load(name)
    except registry.RegistryError as e:
        print(f"python -m vhost: error: {e}", file=sys.stderr)
        return 2
    return run(device_type, args)
