"""Disk faults reach the guest as VIRTIO_BLK_S_IOERR for the request that hit them, and
for nothing else: the daemon, its other requests and its other queues go on, and the
log says what happened at a limited rate.

* ENOSPC: the image is a sparse 64 MiB file on an 8 MiB tmpfs mounted for the test
  (root only), filled up by the guest; space freed (a host file deleted, a guest
  discard) makes writes work again.
* EIO: the daemon runs under tests/faults/eio_shim.c (LD_PRELOAD), which fails the
  positioned I/O calls that touch a chosen byte range of the image.
* Short transfers: the same shim makes every read and write of the image move at most
  a few hundred bytes; requests must still complete whole and correct.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import ShimBuildError, build_eio_shim, shim_env
from tests.support.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    BlkDriver,
    BlkRequest,
    Completion,
    Guest,
    connect_guest,
)
from tests.support.daemon import Daemon, StartDaemon, spawn_blk
from tests.support.frontend import KiB, MiB
from vhost.protocol import GetVringBase, VringStateReply

SECTOR = 512
IMAGE_MIB = 64
TMPFS_MIB = 8
FILLER = 1 * MiB
#: RateLimitedLog in vhost/virtqueue.py: at most 5 lines per 5 s window, per queue
LOG_BURST = 5
LOG_WINDOW = 5.0
SUPPRESSED = re.compile(r"\((\d+) similar messages suppressed\)")


def pattern(seed: int | str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def host_read(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), n, offset)


def host_write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), data, offset)


def one(blk: BlkDriver, req: BlkRequest, timeout: float = 5.0) -> Completion:
    return blk.kick_and_wait([req], timeout)[0]


def statuses(cs: list[Completion]) -> list[int | None]:
    return [c.status for c in cs]


def warnings(d: Daemon, needle: str) -> list[str]:
    return [ln for ln in d.log_text().splitlines() if " WARNING " in ln and needle in ln]


# =========================================================================================
# Fixtures
# =========================================================================================


@pytest.fixture(scope="session")
def eio_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_eio_shim(tmp_path_factory.mktemp("eio-shim"))
    except ShimBuildError as e:
        pytest.fail(str(e), pytrace=False)


def _umount(where: Path) -> None:
    for _ in range(50):  # the daemon holding the image may take a moment to exit
        if subprocess.run(["umount", str(where)], check=False, capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of the test's own (unmounted at teardown)."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m,mode=0700", "tmpfs", str(where)],
        check=False,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield where
    finally:
        _umount(where)


@pytest.fixture
def full_disk_daemon(small_fs: Path, start_daemon: StartDaemon) -> Daemon:
    """A daemon whose 64 MiB sparse image lives on the 8 MiB tmpfs, beside a 1 MiB filler
    file the test can delete. Requested in this order, so the daemon stops (and lets go of
    the image) before the tmpfs is unmounted."""
    with open(small_fs / "filler", "wb") as f:
        f.write(b"\x5a" * FILLER)
    # the log and the socket stay in tmp_path: only the image is on the small tmpfs
    return start_daemon("--size", f"{IMAGE_MIB}M", image=small_fs / "disk.img", image_size=None)


def start_under_shim(
    start_daemon: StartDaemon,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    *args: str,
    image: Path,
) -> Daemon:
    """Start the daemon with ``env`` (LD_PRELOAD and the shim's variables) added; the
    test process itself never runs under the shim."""
    with monkeypatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        return start_daemon(*args, image=image)


def fresh_image(
    tmp_path: Path, name: str, size: int = IMAGE_MIB * MiB, filled: int = 16 * MiB
) -> Path:
    """A sparse image whose first ``filled`` bytes hold pattern(name)."""
    img = tmp_path / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size)
        f.write(pattern(name, filled))
    return img


# =========================================================================================
# ENOSPC
# =========================================================================================


def fill_until_enospc(
    g: Guest, start_sector: int, chunk: int = 256 * KiB, limit: int = 64
) -> tuple[int, dict[int, bytes]]:
    """Sequential writes from ``start_sector`` until one fails; returns the index of the
    failed write and what the successful ones wrote (sector -> data)."""
    written: dict[int, bytes] = {}
    for k in range(limit):
        sector = start_sector + k * chunk // SECTOR
        data = pattern(f"fill{sector}", chunk)
        st = g.blk.write(sector, data, segs=2)
        if st != VIRTIO_BLK_S_OK:
            assert st == VIRTIO_BLK_S_IOERR, f"write {k} at sector {sector}: status {st}"
            return k, written
        written[sector] = data
    raise AssertionError(f"{limit} writes of {chunk} bytes fit on a {TMPFS_MIB} MiB tmpfs")


def test_enospc_fails_only_the_request_that_does_not_fit(
    full_disk_daemon: Daemon, small_fs: Path
) -> None:
    d = full_disk_daemon
    chunk = 256 * KiB
    with connect_guest(d, ram_size=32 * MiB) as g:
        failed_at, written = fill_until_enospc(g, 0, chunk)
        # the tmpfs holds 8 MiB: 1 MiB filler, the rest image
        assert (TMPFS_MIB - 2) * MiB <= failed_at * chunk <= TMPFS_MIB * MiB, failed_at
        d.wait_log(re.compile(r"WARNING .*host I/O error: No space left on device"))

        # One batch with everything mixed in: overwrites of allocated blocks and reads
        # succeed, writes that need new blocks fail, flush works, all in one pass.
        blk = g.blk
        old = list(written)[:4]
        new_sectors = [(40 + k) * MiB // SECTOR for k in range(4)]
        reqs: list[tuple[str, BlkRequest]] = []
        for k, sector in enumerate(old):
            data = pattern(f"over{sector}", 64 * KiB)
            reqs.append(("over", blk.submit_write(sector, data, segs=3)))
            written[sector] = data + written[sector][len(data) :]
            reqs.append(("new", blk.submit_write(new_sectors[k], pattern(k, 64 * KiB))))
        for sector in list(written)[4:8]:
            reqs.append(("read", blk.submit_read(sector, chunk, segs=2)))
        reqs.append(("hole", blk.submit_read(60 * MiB // SECTOR, 16 * KiB)))
        reqs.append(("flush", blk.submit_flush()))
        done = blk.kick_and_wait([r for _, r in reqs])
        for (kind, req), c in zip(reqs, done, strict=False):
            want = VIRTIO_BLK_S_IOERR if kind == "new" else VIRTIO_BLK_S_OK
            assert c.status == want, f"{kind} request at sector {req.sector}: {c}"
            if kind == "read":
                assert c.data == written[req.sector]
            if kind == "hole":
                assert c.data == bytes(16 * KiB)
        for sector, data in written.items():
            assert host_read(d.image_path, sector * SECTOR, len(data)) == data

        # Space comes back: the host deletes its filler, then the guest discards.
        (small_fs / "filler").unlink()
        next_sector = failed_at * chunk // SECTOR
        more_at, more = fill_until_enospc(g, next_sector, chunk)
        assert 2 <= more_at <= FILLER // chunk + 1, more_at  # about the filler's 1 MiB
        written.update(more)
        blocks_before = os.stat(d.image_path).st_blocks
        discarded = list(written)[:8]  # 2 MiB
        assert blk.discard([(s, chunk // SECTOR, 0) for s in discarded]) == VIRTIO_BLK_S_OK
        assert os.stat(d.image_path).st_blocks < blocks_before
        for s in discarded:
            del written[s]
        after_at, after = fill_until_enospc(g, 48 * MiB // SECTOR, chunk)
        assert after_at >= 6, after_at  # most of the 2 MiB the discard freed
        written.update(after)
        for sector, data in written.items():
            assert blk.read(sector, len(data)) == data
        assert blk.flush() == VIRTIO_BLK_S_OK
    d.wait_disconnects(1)
    assert d.proc.poll() is None
    assert "Traceback" not in d.log_text()


def test_enospc_log_is_rate_limited(full_disk_daemon: Daemon) -> None:
    """Many failing requests, each in its own pass: at most LOG_BURST lines in a window,
    then one line saying how many were held back (written when the next failure comes
    after the window)."""
    d = full_disk_daemon
    with connect_guest(d) as g:
        fill_until_enospc(g, 0)
        t_first = time.monotonic()
        failures = 40
        for k in range(failures):  # one request per pass: each is a separate report
            c = one(
                g.blk, g.blk.submit_write((40 * MiB + k * 4 * KiB) // SECTOR, pattern(k, 4 * KiB))
            )
            assert c.status == VIRTIO_BLK_S_IOERR
        lines = warnings(d, "No space left on device")
        # all within one window (the machine would have to stall for seconds otherwise)
        assert time.monotonic() - t_first < LOG_WINDOW
        assert 1 <= len(lines) <= LOG_BURST, "\n".join(lines)
        assert all("/vq0: head " in ln and "errors since start" in ln for ln in lines), lines
        assert not SUPPRESSED.search(d.log_text())
        # the next failure after the window brings the count of what was held back
        time.sleep(max(0.0, t_first + LOG_WINDOW + 0.2 - time.monotonic()))
        assert (
            one(g.blk, g.blk.submit_write(50 * MiB // SECTOR, pattern(99, 4 * KiB))).status
            == VIRTIO_BLK_S_IOERR
        )
        line = d.wait_log(SUPPRESSED)[0]
        m = SUPPRESSED.search(line)
        assert m is not None and " WARNING " in line
        assert int(m.group(1)) == failures + 1 - len(lines), (line, lines)
        assert len(warnings(d, "No space left on device")) == len(lines) + 1
        # and the queue still works
        assert g.blk.read(0, 4 * KiB) == host_read(d.image_path, 0, 4 * KiB)


# =========================================================================================
# EIO (LD_PRELOAD shim)
# =========================================================================================

BAD_START = 4 * MiB
BAD_LEN = 64 * KiB
BAD_SECTOR = BAD_START // SECTOR


#: (kind, sector, bytes, data written or None, request)
Entry = tuple[str, int, int, bytes | None, BlkRequest]


def touches_bad(sector: int, nbytes: int) -> bool:
    off = sector * SECTOR
    return off < BAD_START + BAD_LEN and off + nbytes > BAD_START


def test_eio_fails_only_requests_touching_the_bad_range(
    start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eio_shim: Path
) -> None:
    img = fresh_image(tmp_path, "eio")
    original = host_read(img, 0, 16 * MiB)
    d = start_under_shim(
        start_daemon,
        monkeypatch,
        shim_env(eio_shim, img, start=BAD_START, length=BAD_LEN),
        "--num-queues",
        "2",
        image=img,
    )
    expect = bytearray(original)
    with connect_guest(d, queues=2) as g:
        # (kind, sector, bytes, segs) -- around, across and inside the bad range
        layout = [
            ("read", BAD_SECTOR - 16, 8 * KiB, 1),  # just before: ok
            ("read", BAD_SECTOR - 8, 8 * KiB, 2),  # across the start
            ("read", BAD_SECTOR + 8, 4 * KiB, 1),  # inside
            ("read", BAD_SECTOR + BAD_LEN // SECTOR - 8, 8 * KiB, 3),  # across the end
            ("read", BAD_SECTOR + BAD_LEN // SECTOR, 8 * KiB, 1),  # just after: ok
            ("read", 0, 64 * KiB, 4),  # far away
            ("write", BAD_SECTOR - 32, 16 * KiB, 2),  # ends right before: ok
            ("write", BAD_SECTOR + 16, 4 * KiB, 1),  # inside
            ("write", BAD_SECTOR - 8, 1 * MiB, 3),  # covers it
            ("write", BAD_SECTOR + BAD_LEN // SECTOR, 8 * KiB, 1),  # right after: ok
            ("flush", 0, 0, 1),
        ]
        for rnd in range(3):
            batches: list[list[Entry]] = []
            for qi, blk in enumerate(g.drivers):
                batch: list[Entry] = []
                for kind, sector, n, segs in layout:
                    if kind == "flush":
                        batch.append((kind, 0, 0, None, blk.submit_flush()))
                        continue
                    # queue 1 works 8 MiB higher, so the queues never touch the same bytes
                    sector += qi * (8 * MiB // SECTOR) if not touches_bad(sector, n) else 0
                    if kind == "read":
                        batch.append((kind, sector, n, None, blk.submit_read(sector, n, segs)))
                    else:
                        data = pattern(f"{rnd}/{qi}/{sector}", n)
                        batch.append((kind, sector, n, data, blk.submit_write(sector, data, segs)))
                batches.append(batch)
                blk.queue.publish()
            for blk in g.drivers:  # both queues busy at once
                blk.queue.kick()
            for blk, batch in zip(g.drivers, batches, strict=False):
                done = blk.wait([r for *_, r in batch])
                for (kind, sector, n, wrote, _r), c in zip(batch, done, strict=False):
                    bad = kind != "flush" and touches_bad(sector, n)
                    want = VIRTIO_BLK_S_IOERR if bad else VIRTIO_BLK_S_OK
                    assert c.status == want, f"round {rnd} {kind} {sector}+{n}: {c}"
                    if kind == "read" and not bad:
                        assert c.data == bytes(expect[sector * SECTOR : sector * SECTOR + n])
                    if kind == "write" and not bad:
                        assert wrote is not None
                        expect[sector * SECTOR : sector * SECTOR + n] = wrote
        # the image: every successful write landed, nothing else changed (the failed
        # writes included: the shim fails a call before it moves a byte)
        assert host_read(img, 0, 16 * MiB) == bytes(expect)
        assert host_read(img, BAD_START, BAD_LEN) == original[BAD_START : BAD_START + BAD_LEN]
        assert g.blk.flush() == VIRTIO_BLK_S_OK
        for blk in g.drivers:
            assert blk.read(0, 4 * KiB) == bytes(expect[: 4 * KiB])
    d.wait_disconnects(1)
    lines = warnings(d, "host I/O error: Input/output error")
    assert lines, d.log_text()
    for q in (0, 1):  # both queues reported, each within its own limit
        n = sum(f"/vq{q}: head " in ln for ln in lines)
        assert 1 <= n <= LOG_BURST, lines
    # 3 rounds x 2 queues x 5 failing requests, all counted
    assert re.search(r"counters since start: .*\bioerr=30\b", d.log_text()), d.log_text()


def test_eio_log_is_rate_limited(
    start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eio_shim: Path
) -> None:
    img = fresh_image(tmp_path, "eio-log")
    d = start_under_shim(
        start_daemon,
        monkeypatch,
        shim_env(eio_shim, img, start=BAD_START, length=BAD_LEN, ops="r"),
        image=img,
    )
    with connect_guest(d) as g:
        t0 = time.monotonic()
        for k in range(30):
            c = one(g.blk, g.blk.submit_read(BAD_SECTOR + k % 8, 4 * KiB))
            assert c.status == VIRTIO_BLK_S_IOERR
            # writes to the range still work: the shim fails only reads here
            assert g.blk.write(BAD_SECTOR + 64, pattern(k, 4 * KiB)) == VIRTIO_BLK_S_OK
        assert time.monotonic() - t0 < LOG_WINDOW
        lines = warnings(d, "Input/output error")
        assert 1 <= len(lines) <= LOG_BURST, lines
    d.wait_disconnects(1)


def test_held_back_count_is_logged_when_the_queue_stops(
    start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eio_shim: Path
) -> None:
    img = fresh_image(tmp_path, "eio-held")
    d = start_under_shim(
        start_daemon,
        monkeypatch,
        shim_env(eio_shim, img, start=BAD_START, length=BAD_LEN),
        image=img,
    )
    failures = 20
    with connect_guest(d) as g:
        for k in range(failures):
            assert (
                one(g.blk, g.blk.submit_read(BAD_SECTOR + k % 8, 4 * KiB)).status
                == VIRTIO_BLK_S_IOERR
            )
        shown = len(warnings(d, "Input/output error"))
        assert shown <= LOG_BURST
    d.wait_disconnects(1)
    m = SUPPRESSED.search(d.log_text())
    assert m is not None and int(m.group(1)) == failures - shown, d.log_text()


@pytest.fixture
def loose_daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts and stops itself (their exit is what it checks); any still
    running at teardown are killed."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_failed_flush_is_ioerr_and_io_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eio_shim: Path, loose_daemons: list[Daemon]
) -> None:
    img = fresh_image(tmp_path, "sync")
    with monkeypatch.context() as m:
        for k, v in shim_env(eio_shim, img, fail_sync=True).items():
            m.setenv(k, v)
        d = spawn_blk(tmp_path, "sync", image=img)
    loose_daemons.append(d)
    with connect_guest(d) as g:
        data = pattern("after", 8 * KiB)
        assert g.blk.write(100, data) == VIRTIO_BLK_S_OK
        assert g.blk.flush() == VIRTIO_BLK_S_IOERR
        d.wait_log(re.compile(r"WARNING .*head \d+: host I/O error: Input/output error"))
        assert g.blk.read(100, len(data)) == data
        assert g.blk.write(200, data) == VIRTIO_BLK_S_OK
        assert g.blk.flush() == VIRTIO_BLK_S_IOERR
        assert host_read(img, 100 * SECTOR, len(data)) == data
    d.wait_disconnects(1)
    assert d.proc.poll() is None
    assert "Traceback" not in d.log_text()


def test_failed_flush_at_get_vring_base_still_returns_where_the_ring_stopped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eio_shim: Path, loose_daemons: list[Daemon]
) -> None:
    """GET_VRING_BASE flushes the image (a migration's destination opens it next); when
    that fails the reply is still the index the ring stopped at, and the error is
    logged: a wrong index would corrupt the ring state the front end carries over."""
    img = fresh_image(tmp_path, "base-sync")
    with monkeypatch.context() as m:
        for k, v in shim_env(eio_shim, img, fail_sync=True).items():
            m.setenv(k, v)
        d = spawn_blk(tmp_path, "base-sync", image=img)
    loose_daemons.append(d)
    with connect_guest(d) as g:
        for i in range(3):
            assert g.blk.write(100 + 8 * i, pattern(i, 4 * KiB)) == VIRTIO_BLK_S_OK
        r = g.fe.request(GetVringBase(0))
        assert isinstance(r, VringStateReply) and r.num == 3
        d.wait_log(re.compile(r"ERROR .*queue 0 stopped at 3, but flush failed"))
    d.wait_disconnects(1)
    assert "Traceback" not in d.log_text()


def test_failed_flush_at_exit_is_one_log_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eio_shim: Path, loose_daemons: list[Daemon]
) -> None:
    """SIGTERM when the image cannot be made durable: the daemon says so in one line
    and still removes its socket (exit status non-zero: the data may not be on disk)."""
    img = fresh_image(tmp_path, "exit-sync")
    with monkeypatch.context() as m:
        for k, v in shim_env(eio_shim, img, fail_sync=True).items():
            m.setenv(k, v)
        d = spawn_blk(tmp_path, "exit-sync", image=img)
    loose_daemons.append(d)
    with connect_guest(d) as g:
        assert g.blk.write(100, pattern("x", 4 * KiB)) == VIRTIO_BLK_S_OK
    d.wait_disconnects(1)
    rc = d.terminate()
    log = d.log_text()
    assert "Traceback" not in log, log
    assert re.search(r"ERROR .*Input/output error", log), log
    assert not d.socket_path.exists(), log
    assert rc != 0, log


# =========================================================================================
# Short transfers
# =========================================================================================


@pytest.mark.parametrize("short", [1000, 512 + 7])
def test_short_reads_and_writes_are_resumed(
    start_daemon: StartDaemon,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    eio_shim: Path,
    short: int,
) -> None:
    """Every preadv/pwritev of the image moves at most ``short`` bytes (not a multiple of
    a sector, so the resumption point falls inside iovecs): each request must still
    complete whole, with the right bytes, and report OK."""
    img = fresh_image(tmp_path, f"short{short}")
    expect = bytearray(host_read(img, 0, 16 * MiB))
    d = start_under_shim(start_daemon, monkeypatch, shim_env(eio_shim, img, short=short), image=img)
    rng = random.Random(short)
    with connect_guest(d) as g:
        for rnd in range(4):
            reqs: list[tuple[int, int, bytes | None, BlkRequest]] = []
            for _ in range(16):
                n = rng.choice((512, 4 * KiB, 12 * KiB, 64 * KiB + 512))
                sector = rng.randrange(0, (16 * MiB - n) // SECTOR)
                segs = rng.choice((1, 2, 5))
                if rng.random() < 0.5 and not any(
                    s * SECTOR < (sector * SECTOR + n) and sector * SECTOR < s * SECTOR + m
                    for s, m, dd, _ in reqs
                    if dd is not None
                ):
                    data = rng.randbytes(n)
                    reqs.append((sector, n, data, g.blk.submit_write(sector, data, segs)))
                else:
                    reqs.append((sector, n, None, g.blk.submit_read(sector, n, segs)))
            # reads see the image as it was before this batch unless a write in the batch
            # overlaps them: compare reads only against ranges no write of the batch touches
            before = bytes(expect)
            done = g.blk.kick_and_wait([r for *_, r in reqs], timeout=10.0)
            for (sector, n, wrote, _r), c in zip(reqs, done, strict=False):
                assert c.status == VIRTIO_BLK_S_OK, (rnd, sector, n, c)
                off = sector * SECTOR
                if wrote is not None:
                    expect[off : off + n] = wrote
                elif not any(
                    s * SECTOR < off + n and off < s * SECTOR + m
                    for s, m, dd, _ in reqs
                    if dd is not None
                ):
                    assert c.data == before[off : off + n], (rnd, sector, n)
        assert host_read(img, 0, 16 * MiB) == bytes(expect)
        assert g.blk.flush() == VIRTIO_BLK_S_OK
    d.wait_disconnects(1)
    assert "host I/O error" not in d.log_text()
