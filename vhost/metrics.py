"""Metrics: the daemon's counters in the Prometheus text exposition format (version
0.0.4), served over HTTP at ``/metrics`` on the daemon's event loop (``--metrics``).

Three layers, each usable alone:

* the data: :class:`MetricFamily` (a name, its help, its type, its samples) and
  :class:`Sample`; a device reports its own families with :meth:`Device.metrics
  <vhost.device.Device.metrics>`;
* :func:`collect` gathers the families of a set of :class:`~vhost.server.Server`: the
  core's per-queue ring counters (kept per device across connections,
  :class:`~vhost.virtqueue.QueueCounterBook`), each device's own, the connection state,
  and the process's CPU time and memory; :func:`format_text` writes them out, and
  :func:`render` does both -- pure functions of the servers, what the unit tests check;
* :class:`MetricsServer`, a small HTTP/1.x server (``asyncio.start_server``) that answers
  ``GET /metrics`` (and ``HEAD``), 404 for any other path, 405 for any other method, 400
  for a malformed request, and closes every connection after one response.

The counters live in C (struct vu_stats, blk_stats, net_stats), written by the worker
threads without locks; a scrape reads them as they are (a value may be one batch old)
and costs a few hundred field reads, so it runs on the event loop.

The format is written here by hand rather than with prometheus_client: it is a few
dozen lines (HELP and TYPE lines, escaped label values, cumulative histogram buckets),
the counters are read straight from C at scrape time (prometheus_client would want
collector classes and a registry on top of it), and the daemon gains no dependency.

Boundary: reads counters, never changes them; knows no device (a device's families come
from the device); the program (vhost.cli) parses ``--metrics`` with
:func:`parse_address` and starts and closes the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

from vhost.virtqueue import BATCH_BOUNDS

if TYPE_CHECKING:
    from vhost.device import Device
    from vhost.server import Server

log = logging.getLogger("vhost.metrics")

#: what the address of ``--metrics PORT`` is
DEFAULT_HOST = "127.0.0.1"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: a request's head (request line and headers) may be at most this long ...
MAX_REQUEST_BYTES = 8192
#: ... and must arrive within this many seconds; the response must be taken as fast
REQUEST_TIMEOUT = 10.0
#: connections served at once; one more is closed at once (a scraper needs one)
MAX_CLIENTS = 16

MetricType = Literal["counter", "gauge", "histogram"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


# =========================================================================================
# The data
# =========================================================================================


class Sample(NamedTuple):
    """One value of a family, with its labels; ``suffix`` names a histogram's series
    (``_bucket``, ``_sum``, ``_count``). A tuple: a scrape makes thousands."""

    labels: Mapping[str, str]
    value: float
    suffix: str = ""


@dataclass
class MetricFamily:
    """One metric: its name (``vhost_`` prefix, base units, ``_total`` for a counter), one
    line of help, its type and its samples. A device's families get the ``device`` label
    from the scrape; a ``shared`` family describes something several devices share (a
    switch): it gets no device label, and a sample two devices report is written once."""

    name: str
    help: str
    type: MetricType
    samples: list[Sample] = field(default_factory=list)
    shared: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"metric name {self.name!r} is not a Prometheus name")

    def add(self, value: float, **labels: str) -> None:
        self.samples.append(Sample(labels, value))


def histogram_samples(
    labels: Mapping[str, str],
    bounds: Sequence[float | None],
    counts: Sequence[int],
    total: float,
) -> list[Sample]:
    """A histogram's series from per-bucket counts (not cumulative: ``counts[i]`` is what
    fell at or below ``bounds[i]`` and above the bound before it; a bound of None is
    +Inf, and the last bucket always is): cumulative ``_bucket`` samples with ``le``,
    then ``_sum`` (``total``) and ``_count``."""
    if len(bounds) != len(counts):
        raise ValueError(f"{len(bounds)} bucket bounds for {len(counts)} counts")
    out = []
    running = 0
    for bound, n in zip(bounds, counts, strict=True):
        running += n
        le = "+Inf" if bound is None else _number(bound)
        out.append(Sample({**labels, "le": le}, running, "_bucket"))
    if bounds and bounds[-1] is not None:
        out.append(Sample({**labels, "le": "+Inf"}, running, "_bucket"))
    out.append(Sample(labels, total, "_sum"))
    out.append(Sample(labels, running, "_count"))
    return out


# =========================================================================================
# The text format
# =========================================================================================


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


@functools.lru_cache(maxsize=4096)  # the same few values (devices, queues) every scrape
def escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    if type(v) is int:  # nearly every value: the counters are integers
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def format_text(families: Iterable[MetricFamily]) -> str:
    """The exposition text of ``families``: each one's HELP and TYPE lines, then its
    samples. Families of one name are merged (the first one's help and type), since a
    name may appear once."""
    merged: dict[str, MetricFamily] = {}
    for fam in families:
        have = merged.get(fam.name)
        if have is None:
            merged[fam.name] = MetricFamily(fam.name, fam.help, fam.type, list(fam.samples))
        elif have.type != fam.type:
            raise ValueError(f"metric {fam.name} is both a {have.type} and a {fam.type}")
        else:
            have.samples.extend(fam.samples)
    lines: list[str] = []
    good_labels: set[str] = set()
    for fam in merged.values():
        lines.append(f"# HELP {fam.name} {escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for labels, v, suffix in fam.samples:
            if not labels:
                lines.append(f"{fam.name}{suffix} {_number(v)}")
                continue
            for k in labels:
                if k not in good_labels:
                    if not _LABEL.match(k) or k.startswith("__"):
                        raise ValueError(f"{fam.name}: {k!r} is not a label name")
                    good_labels.add(k)
            text = ",".join([f'{k}="{escape_label_value(x)}"' for k, x in labels.items()])
            lines.append(f"{fam.name}{suffix}{{{text}}} {_number(v)}")
    return "\n".join(lines) + "\n" if lines else ""


# =========================================================================================
# What a scrape collects
# =========================================================================================


#: the core's per-queue families: vhost_queue_NAME, help, type
QUEUE_FAMILIES: tuple[tuple[str, str, MetricType], ...] = (
    ("running", "1 while the queue is being served", "gauge"),
    (
        "chains_total",
        "descriptor chains handled: used entries given back to the driver (refused "
        "chains included)",
        "counter",
    ),
    ("bad_chains_total", "chains refused by the ring walk's validation", "counter"),
    ("kicks_total", "kicks received from the driver (kick eventfd)", "counter"),
    ("interrupts_total", "interrupts signalled to the driver (call eventfd)", "counter"),
    (
        "batch_chains",
        "chains per batch: per pass over the ring that found work (rx: per burst of used "
        "entries published)",
        "histogram",
    ),
    (
        "resubmitted_chains_total",
        "chains run again from the inflight region after a restart",
        "counter",
    ),
    ("errors_total", "errors the queue recorded, by error code", "counter"),
    ("dirty_log_words_total", "64-page words of the dirty log updated (migration)", "counter"),
    (
        "dirty_log_beyond_total",
        "guest writes to pages past the end of the dirty log (not logged)",
        "counter",
    ),
)


def _queue_families(device_label: str, device: Device) -> list[MetricFamily]:
    """The core's counters of each queue of ``device`` a front end has used (a disk may
    offer 64 queues and a guest use 1), added up over all its connections."""
    fams = {
        name: MetricFamily(f"vhost_queue_{name}", help_, kind)
        for name, help_, kind in QUEUE_FAMILIES
    }
    book = device.queue_counters
    totals = book.totals()
    for index in book.indexes():
        c = totals[index]
        labels = {"device": device_label, "queue": str(index)}
        fams["running"].samples.append(Sample(labels, int(book.running(index))))
        fams["chains_total"].samples.append(Sample(labels, c.pushed))
        fams["bad_chains_total"].samples.append(Sample(labels, c.bad_chains))
        fams["kicks_total"].samples.append(Sample(labels, c.kicks))
        fams["interrupts_total"].samples.append(Sample(labels, c.signals))
        fams["batch_chains"].samples.extend(
            histogram_samples(labels, BATCH_BOUNDS, c.batch_hist, c.batch_chains)
        )
        fams["resubmitted_chains_total"].samples.append(Sample(labels, c.resubmitted))
        for code, n in sorted(c.errors.items(), reverse=True):
            row = device.errors.get(code)
            name = row.name if row is not None else f"code {code}"
            fams["errors_total"].samples.append(Sample({**labels, "code": name}, n))
        fams["dirty_log_words_total"].samples.append(Sample(labels, c.log_words))
        fams["dirty_log_beyond_total"].samples.append(Sample(labels, c.log_beyond))
    return list(fams.values())


def _device_labels(servers: Sequence[Server]) -> list[str]:
    """The ``device`` label of each server: its name (the socket file's name), made
    unique with ``#2``, ``#3``... when two sockets in different directories share one."""
    seen: dict[str, int] = {}
    out = []
    for server in servers:
        n = seen[server.name] = seen.get(server.name, 0) + 1
        out.append(server.name if n == 1 else f"{server.name}#{n}")
    return out


def collect(servers: Sequence[Server], *, process: bool = True) -> list[MetricFamily]:
    """Every family a scrape reports for ``servers`` (one per device), and the process's
    own (``process``)."""
    connected = MetricFamily(
        "vhost_device_connected", "1 while a front end is connected to the device", "gauge"
    )
    connections = MetricFamily(
        "vhost_device_connections_total",
        "front-end connections accepted (or made, in client mode), probes included",
        "counter",
    )
    fams: list[MetricFamily] = [connected, connections]
    shared: list[MetricFamily] = []
    for label, server in zip(_device_labels(servers), servers, strict=True):
        connected.add(int(server.session is not None), device=label)
        connections.add(server.connections, device=label)
        fams.extend(_queue_families(label, server.device))
        for fam in server.device.metrics():
            if fam.shared:
                shared.append(fam)
            else:
                fams.append(_with_device(fam, label))
    fams.extend(_dedupe(shared))
    if process:
        fams.extend(process_families())
    return fams


def _with_device(fam: MetricFamily, label: str) -> MetricFamily:
    samples = [Sample({"device": label, **s.labels}, s.value, s.suffix) for s in fam.samples]
    return MetricFamily(fam.name, fam.help, fam.type, samples)


def _dedupe(families: list[MetricFamily]) -> list[MetricFamily]:
    """Shared families: one sample per series, whoever reported it first."""
    out: dict[str, MetricFamily] = {}
    seen: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
    for fam in families:
        have = out.setdefault(fam.name, MetricFamily(fam.name, fam.help, fam.type, shared=True))
        for s in fam.samples:
            key = (fam.name, s.suffix, tuple(sorted(s.labels.items())))
            if key not in seen:
                seen.add(key)
                have.samples.append(s)
    return list(out.values())


def render(servers: Sequence[Server], *, process: bool = True) -> str:
    """The text a scrape of ``servers`` answers."""
    return format_text(collect(servers, process=process))


# --- the process -------------------------------------------------------------------------


def _start_time() -> float:
    """When this process started, in seconds since the epoch: its start in clock ticks
    after boot (/proc/self/stat) plus the boot time (/proc/stat)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()  # not Linux's /proc: close enough at import


_PROCESS_START = _start_time()
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_families() -> list[MetricFamily]:
    """The standard process metrics (as prometheus_client names them)."""
    t = os.times()
    fams = [
        MetricFamily(
            "process_cpu_seconds_total",
            "user and system CPU time of the process, every thread",
            "counter",
            [Sample({}, t.user + t.system)],
        ),
        MetricFamily(
            "process_start_time_seconds",
            "start time of the process since the epoch, in seconds",
            "gauge",
            [Sample({}, round(_PROCESS_START, 2))],
        ),
    ]
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as f:
            size, resident = (int(v) for v in f.read().split()[:2])
        fams.append(
            MetricFamily(
                "process_virtual_memory_bytes",
                "virtual memory size",
                "gauge",
                [Sample({}, size * _PAGE_SIZE)],
            )
        )
        fams.append(
            MetricFamily(
                "process_resident_memory_bytes",
                "resident memory size (guest memory the daemon touched included)",
                "gauge",
                [Sample({}, resident * _PAGE_SIZE)],
            )
        )
    with contextlib.suppress(OSError):
        fams.append(
            MetricFamily(
                "process_open_fds",
                "open file descriptors",
                "gauge",
                [Sample({}, len(os.listdir("/proc/self/fd")))],
            )
        )
    fams.append(
        MetricFamily(
            "process_max_fds",
            "limit on open file descriptors",
            "gauge",
            [Sample({}, resource.getrlimit(resource.RLIMIT_NOFILE)[0])],
        )
    )
    return fams


# =========================================================================================
# --metrics ADDR:PORT
# =========================================================================================


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[IPv6]:PORT`` -> (host, port); the host is
    127.0.0.1 when only a port is given. Port 0 asks for any free port. Raises
    ValueError with a one-line message naming the option."""
    where = f"--metrics {text}" if text and text.split() == [text] else f"--metrics {text!r}"
    t = text.strip()
    if not t:
        raise ValueError(f"{where}: give PORT, ADDR:PORT or [IPv6]:PORT")
    if "/" in t:
        raise ValueError(f"{where}: not an address (give ADDR:PORT, not a URL)")
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or not t[end + 1 :].startswith(":"):
            raise ValueError(f"{where}: write an IPv6 address as [ADDR]:PORT")
        host, port_text = t[1:end], t[end + 2 :]
        if not host or ":" not in host:
            raise ValueError(f"{where}: {host!r} in brackets is not an IPv6 address")
    elif ":" in t:
        host, _, port_text = t.rpartition(":")
        if ":" in host:
            raise ValueError(f"{where}: write an IPv6 address in brackets, as [ADDR]:PORT")
        if not host:
            raise ValueError(f"{where}: no address before ':' (give PORT alone for {DEFAULT_HOST})")
    else:
        host, port_text = DEFAULT_HOST, t
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{where}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{where}: port {port} is not in 0..65535")
    if any(c.isspace() or c in "/[]@?#" for c in host):
        raise ValueError(f"{where}: {host!r} is not an address")
    return host, port


# =========================================================================================
# The HTTP server
# =========================================================================================

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    head_only: bool = False  # HEAD: the headers of the GET, no body

    def encode(self) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, '')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if self.head_only else head + self.body


def _error(status: int, why: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, f"{status} {_REASONS[status]}: {why}\n".encode(), headers=headers)


def respond(request_line: bytes, scrape: Callable[[], str]) -> Response:
    """The answer to one request (its first line; the headers do not matter): GET or
    HEAD of /metrics (any query string) gets ``scrape()``."""
    try:
        parts = request_line.decode("ascii").split()
    except UnicodeDecodeError:
        return _error(400, "the request line is not ASCII")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _error(400, "expected METHOD PATH HTTP/1.x")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return _error(405, f"{method} is not served; use GET", (("Allow", "GET, HEAD"),))
    path = target.split("?", 1)[0]
    if path != "/metrics":
        return _error(404, f"{path} is not here; the metrics are at /metrics")
    try:
        body = scrape().encode()
    except Exception:
        log.exception("metrics: the scrape failed")
        return _error(500, "the scrape failed (see the daemon's log)")
    return Response(200, body, CONTENT_TYPE, head_only=method == "HEAD")


class MetricsServer:
    """``GET /metrics`` over HTTP on the running event loop, for ``servers``."""

    def __init__(self, host: str, port: int, servers: Sequence[Server]) -> None:
        self.host = host
        self._requested_port = port
        self.servers = list(servers)
        #: scrapes answered (200), for the log and the tests
        self.scrapes = 0
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The port bound (the one asked for, or the one given for port 0)."""
        if self._server is None or not self._server.sockets:
            return self._requested_port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        """Listen; raises OSError (EADDRINUSE, EADDRNOTAVAIL, a name that does not
        resolve: socket.gaierror) and then holds nothing."""
        self._server = await asyncio.start_server(
            self._serve_client,
            self.host,
            self._requested_port,
            reuse_address=True,
            limit=MAX_REQUEST_BYTES,
        )

    def close(self) -> None:
        """Stop listening and drop the connections being served."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._clients):
            writer.transport.abort()
        self._clients.clear()

    def scrape(self) -> str:
        return render(self.servers)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.close()  # no queue of stalled clients: this one may try again
            return
        self._clients.add(writer)
        try:
            try:
                request_line = await asyncio.wait_for(_read_head(reader), REQUEST_TIMEOUT)
            except TimeoutError:
                response: Response | None = _error(408, "the request took too long")
            except (ValueError, asyncio.LimitOverrunError):
                response = _error(400, f"the request head is longer than {MAX_REQUEST_BYTES} bytes")
            else:
                response = None if request_line is None else respond(request_line, self.scrape)
            if response is None:
                return  # the client went before it finished asking
            if response.status == 200:
                self.scrapes += 1
            writer.write(response.encode())
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.debug("metrics: client dropped: %r", e)
        except asyncio.CancelledError:
            # The loop is ending (close() dropped the client first). Ending quietly
            # keeps asyncio from logging the cancelled task of a stream callback
            # (Python 3.11 does) as an error in a clean shutdown.
            pass
        finally:
            self._clients.discard(writer)
            writer.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request line, once the whole head (up to its empty line) is in; None if the
    client closed before. Raises ValueError for a head over MAX_REQUEST_BYTES."""
    first: bytes | None = None
    total = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        total += len(line)
        if total > MAX_REQUEST_BYTES:
            raise ValueError("request head too long")
        if first is None:
            if line.strip() == b"":
                continue  # RFC 9112: a server ignores empty lines before the request
            first = line
        elif line in (b"\r\n", b"\n"):
            return first
