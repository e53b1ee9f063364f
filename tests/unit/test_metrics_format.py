"""vhost/metrics.py without a socket: the Prometheus text format it writes (read back by
a small parser of the format written here from the exposition format's rules), label
and help escaping, histogram buckets, ``--metrics`` addresses, the HTTP answers, what a
scrape collects from servers and devices, and the C counters under it (the
chains-per-batch buckets, errors by code) driven on an in-process ring.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.support.rings import NEXT, Ring
from vhost._native import ffi, lib
from vhost.device import Device
from vhost.errors import CORE_ERRORS
from vhost.metrics import (
    CONTENT_TYPE,
    MetricFamily,
    Sample,
    format_text,
    histogram_samples,
    parse_address,
    render,
    respond,
)
from vhost.ring_reference import ErrorCode as E
from vhost.server import Server
from vhost.virtqueue import (
    BATCH_BOUNDS,
    BATCH_BUCKETS,
    RingCounters,
    Virtqueue,
    read_ring_counters,
)

# =========================================================================================
# A parser of the text format (version 0.0.4), strict about what we write
# =========================================================================================

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)\Z")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|\Z)')
Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    help: str
    type: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)


def _unescape(text: str, quote: bool) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1]
            assert nxt in ('\\n"' if quote else "\\n"), f"bad escape \\{nxt} in {text!r}"
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            assert not (quote and c in '"\n'), f"unescaped {c!r} in {text!r}"
            out.append(c)
            i += 1
    return "".join(out)


def _labels(text: str | None) -> Labels:
    if not text:
        return ()
    body, out, pos = text[1:-1], [], 0
    while pos < len(body):
        m = _LABEL.match(body, pos)
        assert m, f"bad labels at {body[pos:]!r}"
        out.append((m[1], _unescape(m[2], quote=True)))
        pos = m.end()
    names = [k for k, _ in out]
    assert len(names) == len(set(names)), f"a label twice in {text}"
    return tuple(out)


def _value(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf}.get(text) or float(text)


def parse(text: str) -> dict[str, Family]:
    """The families in ``text``. Asserts the rules a scraper relies on: HELP then TYPE
    once per family, before its samples; every sample of a family together, named after
    it (a histogram's with _bucket, _sum or _count); no series twice."""
    assert text.endswith("\n") and "\r" not in text
    fams: dict[str, Family] = {}
    current: str | None = None
    series: set[tuple[str, Labels]] = set()
    lines = text[:-1].split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("# HELP "):
            name, _, help_ = line[len("# HELP ") :].partition(" ")
            assert name not in fams, f"{name} declared twice"
            t = lines[i + 1]
            assert t.startswith(f"# TYPE {name} "), f"no TYPE after HELP {name}: {t!r}"
            kind = t.split(" ")[3]
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            fams[name] = Family(_unescape(help_, quote=False), kind)
            current = name
            i += 2
            continue
        assert not line.startswith("#"), f"stray comment {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        assert current is not None, f"sample before any family: {line!r}"
        name = m[1]
        suffixes = ("_bucket", "_sum", "_count") if fams[current].type == "histogram" else ("",)
        assert name in [current + s for s in suffixes], f"{name} under family {current}"
        labels = _labels(m[2])
        assert (name, labels) not in series, f"series twice: {line}"
        series.add((name, labels))
        fams[current].samples.append((name, labels, _value(m[3])))
        i += 1
    return fams


def value(fams: dict[str, Family], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    family = name if name in fams else re.sub(r"_(bucket|sum|count)\Z", "", name)
    hits = [v for n, ls, v in fams[family].samples if n == name and set(labels.items()) <= set(ls)]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


# =========================================================================================
# The format
# =========================================================================================


def test_families_render_and_parse_back() -> None:
    a = MetricFamily("vhost_x_total", "things counted", "counter")
    a.add(3, device="d0", queue="0")
    a.add(2**40, device="d0", queue="1")
    g = MetricFamily("vhost_level", "a level", "gauge", [Sample({}, 0.25)])
    fams = parse(format_text([a, g]))
    assert fams["vhost_x_total"].type == "counter"
    assert fams["vhost_x_total"].help == "things counted"
    assert fams["vhost_x_total"].samples == [
        ("vhost_x_total", (("device", "d0"), ("queue", "0")), 3),
        ("vhost_x_total", (("device", "d0"), ("queue", "1")), 2**40),
    ]
    assert value(fams, "vhost_level") == 0.25
    # integers are written as integers, even large ones (no 1.099511627776e+12)
    assert 'vhost_x_total{device="d0",queue="1"} 1099511627776\n' in format_text([a])


def test_label_values_and_help_are_escaped() -> None:
    nasty = 'a"b\\c\nd}{,e="f"'
    f = MetricFamily("vhost_t", 'help with \\ and\nnewline and "quotes"', "gauge")
    f.add(1, device=nasty)
    text = format_text([f])
    assert text.count("\n") == 3  # HELP, TYPE, one sample: no raw newline got through
    assert '\\"' in text and "\\\\" in text and "\\n" in text
    fams = parse(text)
    assert fams["vhost_t"].samples[0][1] == (("device", nasty),)
    assert fams["vhost_t"].help == 'help with \\ and\nnewline and "quotes"'


def test_special_values() -> None:
    f = MetricFamily("vhost_v", "v", "gauge")
    f.add(math.inf, k="inf")
    f.add(-math.inf, k="ninf")
    f.add(math.nan, k="nan")
    f.add(1.5, k="float")
    f.add(2.0, k="whole")
    text = format_text([f])
    assert 'k="inf"} +Inf\n' in text and 'k="ninf"} -Inf\n' in text and 'k="nan"} NaN\n' in text
    assert 'k="float"} 1.5\n' in text and 'k="whole"} 2\n' in text


def test_families_of_one_name_are_merged() -> None:
    one = MetricFamily("vhost_m_total", "first help", "counter")
    one.add(1, device="a")
    two = MetricFamily("vhost_m_total", "second help", "counter")
    two.add(2, device="b")
    fams = parse(format_text([one, two]))
    assert fams["vhost_m_total"].help == "first help"
    assert [v for _, _, v in fams["vhost_m_total"].samples] == [1, 2]
    with pytest.raises(ValueError, match="both a counter and a gauge"):
        format_text([one, MetricFamily("vhost_m_total", "x", "gauge")])


def test_names_are_checked() -> None:
    with pytest.raises(ValueError, match="not a Prometheus name"):
        MetricFamily("vhost-bad", "x", "gauge")
    with pytest.raises(ValueError, match="not a Prometheus name"):
        MetricFamily("1vhost", "x", "gauge")
    f = MetricFamily("vhost_ok", "x", "gauge", [Sample({"bad-label": "v"}, 1)])
    with pytest.raises(ValueError, match="not a label name"):
        format_text([f])
    f = MetricFamily("vhost_ok", "x", "gauge", [Sample({"__reserved": "v"}, 1)])
    with pytest.raises(ValueError, match="not a label name"):
        format_text([f])


def test_nothing_renders_nothing() -> None:
    assert format_text([]) == ""


# --- histograms ---------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative() -> None:
    counts = [3, 0, 5, 1] + [0] * (BATCH_BUCKETS - 5) + [2]
    f = MetricFamily("vhost_h", "h", "histogram")
    f.samples += histogram_samples({"queue": "0"}, BATCH_BOUNDS, counts, 123)
    fams = parse(format_text([f]))
    buckets = [(dict(ls)["le"], v) for n, ls, v in fams["vhost_h"].samples if n == "vhost_h_bucket"]
    les = [_value(le) for le, _ in buckets]
    assert les == sorted(les) and les[-1] == math.inf
    assert les[:-1] == [float(2**b) for b in range(BATCH_BUCKETS - 1)]
    running = [v for _, v in buckets]
    assert running == sorted(running)  # cumulative: never goes down
    assert running[:4] == [3, 3, 8, 9]
    assert running[-1] == sum(counts) == value(fams, "vhost_h_count", queue="0")
    assert value(fams, "vhost_h_sum", queue="0") == 123


def test_histogram_with_finite_last_bound_gets_inf() -> None:
    s = histogram_samples({}, [1, 10], [1, 2], 7.5)
    assert [(x.suffix, dict(x.labels).get("le"), x.value) for x in s] == [
        ("_bucket", "1", 1),
        ("_bucket", "10", 3),
        ("_bucket", "+Inf", 3),
        ("_sum", None, 7.5),
        ("_count", None, 3),
    ]
    with pytest.raises(ValueError):
        histogram_samples({}, [1, None], [1], 0)


# --- the C counters under the histogram and the errors ------------------------------------


@pytest.mark.parametrize(
    ("n", "bucket"),
    [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 2),
        (5, 3),
        (8, 3),
        (9, 4),
        (512, 9),
        (513, 10),
        (1024, 10),
        (1025, 11),
        (5000, 11),
    ],
)
def test_c_counts_a_batch_in_its_power_of_two_bucket(
    make: Callable[..., Ring], n: int, bucket: int
) -> None:
    r = make(num=8)
    heads = ffi.new("uint32_t[]", [0] * n)
    lens = ffi.new("uint32_t[]", [0] * n)
    lib.vu_vq_push_batch(r.vq, heads, lens, n)
    c = counters_of(r)
    assert c.batches == 1 and c.batch_chains == n
    assert c.batch_hist == tuple(int(b == bucket) for b in range(BATCH_BUCKETS))
    # the bucket is the first whose bound holds n (the le= the scrape writes)
    first = next(b for b, bound in enumerate(BATCH_BOUNDS) if bound is None or n <= bound)
    assert first == bucket


def test_c_sums_batches_of_a_pass(make: Callable[..., Ring]) -> None:
    """vu_vq_pop_batch + vu_vq_push_batch, the chain API: one batch per push, its
    chains counted."""
    r = make(num=16)
    for _ in range(5):
        r.q.add_chain([(r.buf(64), 64, True)])
    r.q.publish()
    refs = ffi.new("struct vu_chain_ref[]", 16)
    iov = ffi.new("struct iovec[]", lib.VU_MAX_CHAIN_IOV)
    n = lib.vu_vq_pop_batch(r.vq, refs, 16, iov, lib.VU_MAX_CHAIN_IOV)
    assert n == 5
    heads = ffi.new("uint32_t[]", [refs[i].head for i in range(n)])
    lens = ffi.new("uint32_t[]", [1] * n)
    lib.vu_vq_push_batch(r.vq, heads, lens, 3)
    lib.vu_vq_push_batch(r.vq, heads + 3, lens, 2)
    c = counters_of(r)
    assert (c.chains, c.batches, c.batch_chains) == (5, 2, 5)
    assert c.batch_hist[1] == 1 and c.batch_hist[2] == 1  # 2 chains (<= 2), 3 (<= 4)


def test_given_back_chains_never_make_the_count_go_back(make: Callable[..., Ring]) -> None:
    """Net takes rx chains for the largest frame and gives back what a frame did not
    need (vu_vq_discard): ``chains`` goes down then, and a scrape that saw it high
    would make Prometheus see a counter reset. The scrape reports ``pushed``."""
    r = make(num=8)
    for _ in range(3):
        r.q.add_chain([(r.buf(64), 64, True)])
    r.q.publish()
    for _ in range(3):
        r.pop_ok()
    assert counters_of(r).chains == 3
    lib.vu_vq_discard(r.vq, 2)
    lib.vu_vq_push(r.vq, r.chain.head, 0)  # the one a frame used (any head will do)
    c = counters_of(r)
    assert (c.chains, c.pushed) == (1, 1)
    for _ in range(2):  # the two given back are taken again and used
        r.pop_ok()
        lib.vu_vq_push(r.vq, r.chain.head, 0)
    c = counters_of(r)
    assert (c.chains, c.pushed) == (3, 3)


def test_c_counts_errors_by_code(make: Callable[..., Ring]) -> None:
    """Each error the walker records is counted under its code (vu_vq_record_error)."""
    r = make(num=8)
    far = 0xDEAD_0000_0000
    r.descs({0: (far, 16, 0, 0), 1: (r.buf(16), 16, NEXT, 1), 2: (far, 32, 0, 0)})
    for head, code in ((0, E.ADDR), (1, E.LOOP), (2, E.ADDR)):
        r.offer(head)
        r.refused(code)
    c = counters_of(r)
    assert c.errors == {int(E.ADDR): 2, int(E.LOOP): 1}
    assert sum(c.errors.values()) == r.vq.err.count == 3


def test_every_error_code_has_a_slot() -> None:
    from devices.blk.device import BLK_ERRORS
    from devices.net.device import NET_ERRORS

    for table in (CORE_ERRORS, BLK_ERRORS, NET_ERRORS):
        for row in table:
            assert -lib.VU_ERROR_SLOTS < row.code < 0, row


def counters_of(r: Ring) -> RingCounters:
    return read_ring_counters(r.vq)


# =========================================================================================
# What a scrape collects
# =========================================================================================


class _NoConnections:
    async def next_connection(self) -> object:
        raise AssertionError("not served in these tests")

    def connection_ended(self, messages: int) -> None:
        pass

    def close(self) -> None:
        pass


class _ToyDevice(Device):
    """Two queues, one family of its own (one shared), errors from the core's table."""

    def __init__(self, name: str = "toy") -> None:
        self.name = name

    @property
    def features(self) -> int:
        return 0

    @property
    def num_queues(self) -> int:
        return 2

    def metrics(self) -> list[MetricFamily]:
        own = MetricFamily("vhost_toy_widgets_total", "widgets made", "counter")
        own.add(7, queue="0")
        shared = MetricFamily("vhost_toy_pool_entries", "a pool both use", "gauge", shared=True)
        shared.add(4, pool="p")
        return [own, shared]


def _server(device: Device, name: str) -> Server:
    return Server(_NoConnections(), device, name=name)  # type: ignore[arg-type]


def test_collect_reports_queues_used_devices_connections_and_process() -> None:
    dev = _ToyDevice()
    q0 = Virtqueue(0, "toy/vq0")
    dev.queue_counters.attach(q0)
    s = q0.handle.stats
    s.pushed, s.kicks, s.signals = 10, 4, 3
    s.batches, s.batch_chains, s.resubmitted = 3, 10, 2
    s.batch_hist[0], s.batch_hist[2], s.batch_hist[3] = 1, 1, 1
    s.errors[-lib.VU_ERR_LOOP] = 1
    server = _server(dev, 'disk "one"')
    server.connections = 5
    fams = parse(render([server]))

    dev_label = {"device": 'disk "one"'}
    assert value(fams, "vhost_device_connected", **dev_label) == 0
    assert value(fams, "vhost_device_connections_total", **dev_label) == 5
    q = {**dev_label, "queue": "0"}
    assert value(fams, "vhost_queue_chains_total", **q) == 10
    assert value(fams, "vhost_queue_kicks_total", **q) == 4
    assert value(fams, "vhost_queue_interrupts_total", **q) == 3
    assert value(fams, "vhost_queue_resubmitted_chains_total", **q) == 2
    assert value(fams, "vhost_queue_errors_total", **q, code="VU_ERR_LOOP") == 1
    assert value(fams, "vhost_queue_batch_chains_count", **q) == 3
    assert value(fams, "vhost_queue_batch_chains_sum", **q) == 10
    assert value(fams, "vhost_queue_batch_chains_bucket", **q, le="4") == 2
    assert value(fams, "vhost_queue_running", **q) == 0
    # queue 1 was never used: no series for it
    assert not [ls for _, ls, _ in fams["vhost_queue_chains_total"].samples if ("queue", "1") in ls]
    # the device's own families get the device label; a shared one does not
    assert value(fams, "vhost_toy_widgets_total", **dev_label, queue="0") == 7
    assert fams["vhost_toy_pool_entries"].samples == [
        ("vhost_toy_pool_entries", (("pool", "p"),), 4)
    ]
    # the process
    assert value(fams, "process_cpu_seconds_total") > 0
    start = value(fams, "process_start_time_seconds")
    assert time.time() - 3600 * 24 * 365 < start <= time.time() + 1
    assert value(fams, "process_resident_memory_bytes") > 1 << 20
    assert value(fams, "process_open_fds") > 0


def test_shared_samples_are_written_once_and_names_made_unique() -> None:
    a, b = _server(_ToyDevice(), "blk.sock"), _server(_ToyDevice(), "blk.sock")
    fams = parse(render([a, b], process=False))
    assert len(fams["vhost_toy_pool_entries"].samples) == 1
    devices = [dict(ls)["device"] for _, ls, _ in fams["vhost_device_connected"].samples]
    assert devices == ["blk.sock", "blk.sock#2"]
    assert "process_cpu_seconds_total" not in fams


def test_counters_add_up_over_connections() -> None:
    """Each connection's queues count from zero; the device's totals never go back."""
    dev = _ToyDevice()
    first = Virtqueue(0, "c1/vq0")
    dev.queue_counters.attach(first)
    first.handle.stats.kicks = 5
    first.handle.stats.errors[-lib.VU_ERR_ADDR] = 1
    assert dev.queue_counters.totals()[0].kicks == 5
    dev.queue_counters.attach(first)  # started again in the same connection: no change
    assert dev.queue_counters.totals()[0].kicks == 5
    second = Virtqueue(0, "c2/vq0")  # the next front end's queue 0
    dev.queue_counters.attach(second)
    second.handle.stats.kicks = 2
    second.handle.stats.errors[-lib.VU_ERR_ADDR] = 1
    second.handle.stats.errors[-lib.VU_ERR_HEAD] = 1
    total = dev.queue_counters.totals()[0]
    assert total.kicks == 7
    assert total.errors == {lib.VU_ERR_ADDR: 2, lib.VU_ERR_HEAD: 1}
    first.handle.stats.kicks = 1000  # a retired queue no longer counts
    assert dev.queue_counters.totals()[0].kicks == 7


def test_ring_counters_add() -> None:
    a = RingCounters(chains=1, batch_hist=(1,) + (0,) * (BATCH_BUCKETS - 1), errors={-1: 1})
    b = RingCounters(
        chains=2, batch_hist=(0, 2) + (0,) * (BATCH_BUCKETS - 2), errors={-1: 1, -2: 3}
    )
    c = a + b
    assert c.chains == 3 and c.batch_hist[:2] == (1, 2) and c.errors == {-1: 2, -2: 3}


# =========================================================================================
# --metrics ADDR:PORT
# =========================================================================================


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("9100", ("127.0.0.1", 9100)),
        ("0", ("127.0.0.1", 0)),
        ("65535", ("127.0.0.1", 65535)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("10.1.2.3:80", ("10.1.2.3", 80)),
        ("localhost:9100", ("localhost", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::]:0", ("::", 0)),
        ("[fe80::1%eth0]:9100", ("fe80::1%eth0", 9100)),
        (" 9100 ", ("127.0.0.1", 9100)),
    ],
)
def test_parse_address(text: str, expect: tuple[str, int]) -> None:
    assert parse_address(text) == expect


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "give PORT"),
        ("65536", "not in 0..65535"),
        ("99999999999999999999", "not in 0..65535"),
        ("-1", "not a number"),
        ("http", "not a number"),
        ("9100x", "not a number"),
        ("host:", "not a number"),
        (":9100", "no address before"),
        ("::1:9100", "in brackets"),
        ("[::1]", "[ADDR]:PORT"),
        ("[::1:9100", "[ADDR]:PORT"),
        ("[]:9100", "not an IPv6 address"),
        ("[1.2.3.4]:9100", "not an IPv6 address"),
        ("a b:9100", "not an address"),
        ("http://x:9100", "not a URL"),
        ("x:9100/metrics", "not a URL"),
        ("80:٣", "not a number"),
    ],
)
def test_parse_address_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_address(text)
    msg = str(e.value)
    assert why in msg and "\n" not in msg and msg.startswith("--metrics ")


# =========================================================================================
# HTTP answers
# =========================================================================================


def _scrape() -> str:
    return "# HELP vhost_x x\n# TYPE vhost_x gauge\nvhost_x 1\n"


def _split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *headers = head.decode("latin-1").split("\r\n")
    return status, dict(h.split(": ", 1) for h in headers), body


def test_get_metrics() -> None:
    status, headers, body = _split(respond(b"GET /metrics HTTP/1.1\r\n", _scrape).encode())
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == CONTENT_TYPE
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Connection"] == "close"
    assert body.decode() == _scrape()
    # a query string is fine (Prometheus may add one); HTTP/1.0 too
    assert respond(b"GET /metrics?x=1 HTTP/1.0\r\n", _scrape).status == 200


def test_head_has_the_headers_of_get_and_no_body() -> None:
    status, headers, body = _split(respond(b"HEAD /metrics HTTP/1.1\r\n", _scrape).encode())
    assert status == "HTTP/1.1 200 OK" and body == b""
    assert int(headers["Content-Length"]) == len(_scrape())


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET / HTTP/1.1\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\n", 404),
        (b"GET /metrics/ HTTP/1.1\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\n", 405),
        (b"DELETE /x HTTP/1.1\r\n", 405),
        (b"GET /metrics\r\n", 400),
        (b"GET /metrics HTTP/2\r\n", 400),
        (b"GET /metrics HTTP/1.1 extra\r\n", 400),
        (b"\xff\xfe /metrics HTTP/1.1\r\n", 400),
        (b"garbage\r\n", 400),
    ],
)
def test_other_requests(line: bytes, status: int) -> None:
    r = respond(line, _scrape)
    assert r.status == status
    raw = r.encode().decode("latin-1")
    assert raw.startswith(f"HTTP/1.1 {status} ")
    if status == 405:
        assert "\r\nAllow: GET, HEAD\r\n" in raw


def test_a_failing_scrape_is_a_500_not_a_crash() -> None:
    def broken() -> str:
        raise RuntimeError("boom")

    assert respond(b"GET /metrics HTTP/1.1\r\n", broken).status == 500


def test_process_start_time_matches_proc() -> None:
    from vhost import metrics

    # this process started before the test and after boot
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    assert time.time() - uptime - 5 <= metrics._PROCESS_START <= time.time()
    assert os.times().elapsed > 0
