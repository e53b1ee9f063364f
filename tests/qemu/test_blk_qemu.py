"""End to end: QEMU 7.2 (TCG) guests on ``vhost-user-blk-pci`` served by our daemon.

Each test starts the real ``vhost-user-blk`` as a subprocess (log in tmp_path), boots
a busybox guest whose Linux virtio_blk driver drives the device, and checks effects
on both sides: what the guest reads and sees in sysfs, the bytes (and holes) in the
image file on the host, and what the daemon logged.  At teardown every daemon gets
SIGTERM and must exit 0 without a traceback (conftest.py).

Run: ``python -m pytest tests/qemu -q -m qemu`` (``-s`` shows timings).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest import qemu, workloads
from tests.guest.workloads import MiB, pattern

from .harness import (
    RAM_BACKENDS,
    UL_BLKDISCARD,
    BootGuest,
    StartDaemon,
    blk_qemu_args,
    needs_qemu,
    skip_unless_ram,
    wait_hugepage_maps,
)

pytestmark = [pytest.mark.qemu, needs_qemu]

IMG_SIZE = 64 * MiB
PATTERNS = workloads.default_patterns(IMG_SIZE)
GUEST_TIMEOUT = 90.0
SERIAL = "vhost-py-e2e-0123"  # virtio-blk serials are at most 20 bytes

# test 1: regions above the file system and clear of PATTERNS, 4 KiB aligned
DISCARD_OFF, DISCARD_LEN = 44 * MiB, 1 * MiB
WZ_OFF, WZ_LEN = 46 * MiB, 1 * MiB
DISCARD_DATA = pattern(10, DISCARD_LEN)
WZ_DATA = pattern(11, WZ_LEN)

RecordProperty = Callable[[str, object], None]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _is_hole(path: Path, off: int, length: int) -> bool:
    """True if [off, off+length) of ``path`` has no data extents (SEEK_DATA skips it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            return os.lseek(fd, off, os.SEEK_DATA) >= off + length
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after off
                return True
            raise
    finally:
        os.close(fd)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_ZERO_RANGE = 0x10
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HDR = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXT = struct.Struct("=QQQ2QI3I")  # logical, physical, length, .., flags, ..


def _written_extents(path: Path, off: int, length: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of ``path`` in [off, off+length) that hold written
    data: holes and unwritten (preallocated, reads-as-zero) extents are left out.
    Unlike SEEK_DATA this does not count page-cache pages the host read in."""
    out: list[tuple[int, int]] = []
    n = 64
    with open(path, "rb") as f:
        pos, end = off, off + length
        while pos < end:
            buf = bytearray(_FIEMAP_HDR.pack(pos, end - pos, _FIEMAP_FLAG_SYNC, 0, n, 0))
            buf += bytes(_FIEMAP_EXT.size * n)
            fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HDR.unpack_from(buf)[3]
            if mapped == 0:
                break
            last = False
            for i in range(mapped):
                e = _FIEMAP_EXT.unpack_from(buf, _FIEMAP_HDR.size + i * _FIEMAP_EXT.size)
                logical, ext_len, flags = e[0], e[2], e[5]
                if not flags & _FIEMAP_EXTENT_UNWRITTEN:
                    lo, hi = max(logical, off), min(logical + ext_len, end)
                    if lo < hi:
                        out.append((lo, hi))
                pos = logical + ext_len
                last = last or bool(flags & _FIEMAP_EXTENT_LAST)
            if last:
                break
    return out


def _host_zero_range_unwritten(directory: Path) -> bool:
    """Whether, on this host file system, FIEMAP works and fallocate(ZERO_RANGE) over
    written data leaves no written extent (ext4/xfs: unwritten extents) -- then a
    guest WRITE_ZEROES served with ZERO_RANGE is told apart from zeros written as
    data (tmpfs, say, has neither, and the daemon rightly writes zeros there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    probe = directory / "zero-range.probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, b"x" * (256 << 10), 0)
        if libc.fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, 64 << 10, 64 << 10):
            return False
        try:
            return (
                _written_extents(probe, 0, 64 << 10) == [(0, 64 << 10)]
                and not _written_extents(probe, 64 << 10, 64 << 10)
                and os.pread(fd, 16, 64 << 10) == bytes(16)
            )
        except OSError:  # no FIEMAP
            return False
    finally:
        os.close(fd)
        probe.unlink()


def _run(g: qemu.Guest, what: str) -> tuple[dict[str, str], str, float, float]:
    """Wait for the guest's workload; (results, text, boot s, workload s)."""
    rc, text = g.run_workload(timeout=GUEST_TIMEOUT)
    assert rc == 0, f"{what}: workload failed (rc={rc}):\n{text[-3000:]}"
    return qemu.results(text), text, g.boot_time() or -1.0, g.workload_time() or -1.0


def _daemon_problems(log: str) -> list[str]:
    """Daemon log lines at WARNING or above."""
    return [ln for ln in log.splitlines() if " WARNING " in ln or " ERROR " in ln]


# shell shared by the extra checks: field N (1-based) of /sys/block/$NAME/stat
# (7 = sectors written, 14 = sectors discarded, 16 = flushes completed)
STAT_FIELD = r"""
stat_field() { _f=$1; set -- $(cat /sys/block/$NAME/stat); eval "echo \${$_f}"; }
same() { [ "$(md5sum < "$1")" = "$(md5sum < "$2")" ] && echo ok || echo BAD; }
"""

IDENTITY_AND_TRIM = (
    STAT_FIELD
    + r"""
result serial "$(cat /sys/block/$NAME/serial)"
result ro "$(cat /sys/block/$NAME/ro)"
result mq "$(ls /sys/block/$NAME/mq | wc -l)"
result discard_max "$(cat /sys/block/$NAME/queue/discard_max_bytes)"
result wz_max "$(cat /sys/block/$NAME/queue/write_zeroes_max_bytes)"
result flushes "$(stat_field 16)"
dd if=/dev/zero of=/tmp/zeros bs=64k count=16 2>/dev/null

# discard (busybox blkdiscard: BLKDISCARD -> VIRTIO_BLK_T_DISCARD)
dio_write /data/d0 $DEV @DOFF@ || fail "write d0"
dio_read $DEV @DOFF@ @DLEN@ /tmp/d0.pre || fail "read d0"
[ "$(same /data/d0 /tmp/d0.pre)" = ok ] || fail "d0 not written"
s0=$(stat_field 14)
blkdiscard -o @DOFF@ -l @DLEN@ $DEV 2>/tmp/bd.err || { cat /tmp/bd.err; fail blkdiscard; }
result discard_sectors $(( $(stat_field 14) - s0 ))
dio_read $DEV @DOFF@ @DLEN@ /tmp/d0.back || fail "read discarded"
result discard_zero "$(same /tmp/zeros /tmp/d0.back)"

# write zeroes (util-linux blkdiscard -z: BLKZEROOUT -> VIRTIO_BLK_T_WRITE_ZEROES)
if [ -x @UL@ ]; then
    dio_write /data/z0 $DEV @ZOFF@ || fail "write z0"
    dio_read $DEV @ZOFF@ @ZLEN@ /tmp/z0.pre || fail "read z0"
    [ "$(same /data/z0 /tmp/z0.pre)" = ok ] || fail "z0 not written"
    s0=$(stat_field 7)
    @UL@ -f -z -o @ZOFF@ -l @ZLEN@ $DEV || fail "blkdiscard -z"
    result wz_sectors $(( $(stat_field 7) - s0 ))
    dio_read $DEV @ZOFF@ @ZLEN@ /tmp/z0.back || fail "read zeroed"
    result wz_zero "$(same /tmp/zeros /tmp/z0.back)"
    result wz_max_after "$(cat /sys/block/$NAME/queue/write_zeroes_max_bytes)"
fi
"""
)


@pytest.mark.parametrize("ram", RAM_BACKENDS)
def test_vhost_user_blk_guest(
    blk_daemon: StartDaemon,
    guests: BootGuest,
    tmp_path: Path,
    record_property: RecordProperty,
    ram: str,
) -> None:
    """The full block workload through our daemon, plus serial, size, discard and
    write-zeroes; the image is created by the daemon (--size). Guest RAM is a memfd, or
    on hugetlbfs (``memory-backend-file,mem-path=/dev/hugepages``: QEMU sends the
    daemon regions in whole huge pages)."""
    skip_unless_ram(ram)
    img = tmp_path / "created.img"
    d = blk_daemon("--size", "64M", "--serial", SERIAL, image=img)
    assert img.stat().st_size == IMG_SIZE
    assert _is_hole(img, 0, IMG_SIZE), "--size should create the image sparse"

    extra = (
        IDENTITY_AND_TRIM.replace("@DOFF@", str(DISCARD_OFF))
        .replace("@DLEN@", str(DISCARD_LEN))
        .replace("@ZOFF@", str(WZ_OFF))
        .replace("@ZLEN@", str(WZ_LEN))
        .replace("@UL@", UL_BLKDISCARD)
    )
    files = workloads.blk_files(PATTERNS) | {"/data/d0": DISCARD_DATA, "/data/z0": WZ_DATA}
    t0 = time.monotonic()
    with guests(
        workloads.blk_script("vda", PATTERNS, extra=extra), blk_qemu_args(d), files=files, ram=ram
    ) as g:
        if ram == "hugepages":  # the daemon maps the guest's RAM from hugetlbfs
            maps = wait_hugepage_maps(d.pid, GUEST_TIMEOUT)
            record_property("hugepage_maps", len(maps))
        res, text, boot, work = _run(g, "guest")
    total = time.monotonic() - t0
    print(f"\n[blk {ram}] boot {boot:.1f}s workload {work:.1f}s total {total:.1f}s {res}")
    record_property("total_s", round(total, 2))

    workloads.check_blk_results(res, PATTERNS, IMG_SIZE, text)
    assert res["serial"] == SERIAL  # VIRTIO_BLK_T_GET_ID
    assert res["ro"] == "0"
    assert res["mq"] == "1"
    assert int(res["flushes"]) > 0, "ext4 + sync should have sent VIRTIO_BLK_T_FLUSH"
    assert int(res["discard_max"]) > 0, "VIRTIO_BLK_F_DISCARD not seen by the guest"
    assert int(res["discard_sectors"]) == DISCARD_LEN // 512, res
    assert res["discard_zero"] == "ok", res
    wz = "wz_zero" in res  # util-linux blkdiscard was in the guest
    if wz:
        assert int(res["wz_max"]) > 0, "VIRTIO_BLK_F_WRITE_ZEROES not seen by the guest"
        assert res["wz_zero"] == "ok", res
        assert int(res["wz_sectors"]) == WZ_LEN // 512, res
        # the kernel stops using WRITE_ZEROES after the device fails one
        assert res["wz_max_after"] == res["wz_max"], res
    record_property("write_zeroes_checked", wz)

    d.wait_connection_closed(2)
    workloads.check_image(img, PATTERNS)
    with open(img, "rb") as f:
        f.seek(DISCARD_OFF)
        assert f.read(DISCARD_LEN) == bytes(DISCARD_LEN), "discarded range not zero"
        f.seek(WZ_OFF)
        assert f.read(WZ_LEN) == bytes(WZ_LEN), "write-zeroes range not zero"
    # the daemon deallocated: a punched hole for discard; for write-zeroes (no UNMAP
    # flag from BLKZEROOUT) ZERO_RANGE's unwritten extents where the host fs has them.
    # Zeros written as data (by the daemon, or by a guest kernel falling back) would
    # show as written extents.
    assert _is_hole(img, DISCARD_OFF, DISCARD_LEN), "discard did not punch a hole"
    zero_range = wz and _host_zero_range_unwritten(tmp_path)
    if zero_range:
        assert not _written_extents(img, WZ_OFF, WZ_LEN), "write-zeroes wrote data"
    record_property("write_zeroes_unwritten_checked", zero_range)
    assert d.log_lines(f"{d.connection(2)}: front end connected")
    problems = _daemon_problems(d.log_text())
    assert not problems, "\n".join(problems)


# --- multiqueue -------------------------------------------------------------

QJOB = rb"""# qjob.sh SRC DEV OFF N: N times write SRC at OFF with O_DIRECT and read it back
src=$1 dev=$2 off=$3 n=$4
len=$(wc -c < $src)
want=$(md5sum < $src)
i=0
while [ $i -lt $n ]; do
    dd if=$src of=$dev bs=64k seek=$off oflag=seek_bytes,direct conv=notrunc 2>/dev/null \
        || exit 1
    dd if=$dev of=/tmp/qjob.$$ bs=64k skip=$off count=$len \
        iflag=skip_bytes,count_bytes,direct 2>/dev/null || exit 2
    [ "$(md5sum < /tmp/qjob.$$)" = "$want" ] || exit 3
    i=$((i + 1))
done
"""
Q_OFF = (56 * MiB, 58 * MiB)
Q_DATA = (pattern(20, 256 << 10), pattern(21, 256 << 10))
Q_ROUNDS = 8

MQ_EXTRA = r"""
result mq "$(ls /sys/block/$NAME/mq | wc -l)"
result cpus "$(grep -c ^processor /proc/cpuinfo)"
# completions signalled per queue: the MSI-X vector of virtqueue req.N, all CPUs
irqs() {
    awk -v q="$1" 'NR == 1 {n = NF}
        $NF == q {s = 0; for (i = 2; i <= n + 1; i++) s += $i; print s}' /proc/interrupts
}
a0=$(irqs virtio0-req.0); a1=$(irqs virtio0-req.1)
# blk-mq maps CPU n to hardware queue n: one job pinned to each CPU
taskset 1 sh /data/qjob.sh /data/q0 $DEV @Q0@ @N@ & j0=$!
taskset 2 sh /data/qjob.sh /data/q1 $DEV @Q1@ @N@ & j1=$!
wait $j0; result qjob0 $?
wait $j1; result qjob1 $?
result irq_req0 $(( $(irqs virtio0-req.0) - a0 ))
result irq_req1 $(( $(irqs virtio0-req.1) - a1 ))
"""


def test_vhost_user_blk_two_queues(
    blk_daemon: StartDaemon,
    guests: BootGuest,
    record_property: RecordProperty,
) -> None:
    """--num-queues 2 with num-queues=2 and 2 vCPUs (virtio_blk uses at most one queue
    per CPU): the guest has two hardware queues, the workload passes, and I/O pinned to
    each CPU completes on its own queue."""
    d = blk_daemon("--num-queues", "2", "--verbose", image_size=IMG_SIZE)
    extra = (
        MQ_EXTRA.replace("@Q0@", str(Q_OFF[0]))
        .replace("@Q1@", str(Q_OFF[1]))
        .replace("@N@", str(Q_ROUNDS))
    )
    files = workloads.blk_files(PATTERNS) | {
        "/data/q0": Q_DATA[0],
        "/data/q1": Q_DATA[1],
        "/data/qjob.sh": QJOB,
    }
    args = [*blk_qemu_args(d, num_queues=2), "-smp", "2"]
    t0 = time.monotonic()
    with guests(workloads.blk_script("vda", PATTERNS, extra=extra), args, files=files) as g:
        res, text, boot, work = _run(g, "guest")
    total = time.monotonic() - t0
    print(f"\n[mq] boot {boot:.1f}s workload {work:.1f}s total {total:.1f}s {res}")
    record_property("total_s", round(total, 2))

    workloads.check_blk_results(res, PATTERNS, IMG_SIZE, text)
    assert res["cpus"] == "2", res
    assert res["mq"] == "2", res
    assert res["qjob0"] == "0" and res["qjob1"] == "0", res
    assert int(res["irq_req0"]) > 0, res
    assert int(res["irq_req1"]) > 0, "no completion signalled on the second queue"

    d.wait_connection_closed(2)
    workloads.check_image(d.image_path, PATTERNS)
    with open(d.image_path, "rb") as f:
        for off, data in zip(Q_OFF, Q_DATA, strict=True):
            f.seek(off)
            assert f.read(len(data)) == data
    # the daemon started a worker for each queue of the QEMU connection
    for q in (0, 1):
        assert d.log_lines(f"{d.connection(2)}/vq{q}: started"), d.log_text()
    problems = _daemon_problems(d.log_text())
    assert not problems, "\n".join(problems)


# --- read-only --------------------------------------------------------------

RO_WRITE_OFF = 48 * MiB
RO_FILE = pattern(30, 200 * 1024 + 7)

RO_SCRIPT = r"""
. /lib/vhtest.sh
fail() { echo "FAIL: $*"; exit 1; }
NAME=vda
DEV=/dev/$NAME
[ -b $DEV ] || fail "no $DEV"
result ro "$(cat /sys/block/$NAME/ro)"
result getro "$(blockdev --getro $DEV)"
result dev_size "$(blockdev --getsize64 $DEV)"
# data the host put in the image reads back
for spec in @SPECS@; do
    name=${spec%%:*}; rest=${spec#*:}; off=${rest%%:*}; len=${rest#*:}
    dio_read $DEV $off $len /tmp/$name || fail "read $name"
    result md5_$name "$(md5sum < /tmp/$name | cut -d' ' -f1)"
done
w0=$(wr_sectors $NAME)
# writes must fail: O_DIRECT, buffered + fsync, discard
dd if=/data/w of=$DEV bs=4096 count=1 seek=@WOFF@ oflag=seek_bytes,direct conv=notrunc \
    2>/tmp/w1.err
result dd_direct_rc $?
result dd_direct_err "$(grep -v records /tmp/w1.err | tail -n 1)"
dd if=/data/w of=$DEV bs=4096 count=1 seek=@WOFF@ oflag=seek_bytes conv=notrunc,fsync \
    2>/tmp/w2.err
result dd_buffered_rc $?
result dd_buffered_err "$(grep -v records /tmp/w2.err | tail -n 1)"
blkdiscard -o @WOFF@ -l 4096 $DEV 2>/tmp/w3.err
result discard_rc $?
result discard_err "$(tail -n 1 /tmp/w3.err)"
result wrsect $(( $(wr_sectors $NAME) - w0 ))
dio_read $DEV @WOFF@ 4096 /tmp/after || fail "read after"
result after_md5 "$(md5sum < /tmp/after | cut -d' ' -f1)"
if [ @FS@ = 1 ]; then
    mkdir -p /mnt/t
    mount -t ext4 -o ro $DEV /mnt/t || fail "mount ro"
    result fs_md5 "$(md5sum < /mnt/t/f | cut -d' ' -f1)"
    umount /mnt/t
fi
result done 1
"""


def _image_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_vhost_user_blk_read_only(
    blk_daemon: StartDaemon,
    guests: BootGuest,
    tmp_path: Path,
    record_property: RecordProperty,
) -> None:
    """--read-only: the guest sees a read-only disk, its writes fail (and none reach
    the device), data the host put in the image (raw and in an ext4 file system made
    by the host) reads back, and the image is unchanged."""
    img = tmp_path / "ro.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    mke2fs = shutil.which("mke2fs") or shutil.which("mkfs.ext4")
    fs = mke2fs is not None
    if mke2fs is not None:
        src = tmp_path / "fs-src"
        src.mkdir()
        (src / "f").write_bytes(RO_FILE)
        subprocess.run(
            [mke2fs, "-q", "-F", "-t", "ext4", "-d", str(src), str(img), "32M"],
            check=True,
            capture_output=True,
        )
    with open(img, "r+b") as f:
        for off, data in PATTERNS.values():
            f.seek(off)
            f.write(data)
    before = _image_sha(img)
    with open(img, "rb") as f:
        f.seek(RO_WRITE_OFF)
        at_write_off = f.read(4096)

    d = blk_daemon("--read-only", image=img)
    specs = " ".join(f"{n}:{off}:{len(data)}" for n, (off, data) in PATTERNS.items())
    script = (
        RO_SCRIPT.replace("@SPECS@", specs)
        .replace("@WOFF@", str(RO_WRITE_OFF))
        .replace("@FS@", "1" if fs else "0")
    )
    t0 = time.monotonic()
    with guests(script, blk_qemu_args(d), files={"/data/w": pattern(31, 4096)}) as g:
        res, text, boot, work = _run(g, "guest")
    total = time.monotonic() - t0
    print(f"\n[ro] boot {boot:.1f}s workload {work:.1f}s total {total:.1f}s {res}")
    record_property("total_s", round(total, 2))
    for k in ("dd_direct_err", "dd_buffered_err", "discard_err"):
        record_property(k, res.get(k, ""))

    assert res.get("done") == "1", text[-3000:]
    assert res["ro"] == "1" and res["getro"] == "1", res
    assert int(res["dev_size"]) == IMG_SIZE
    for name, (_, data) in PATTERNS.items():
        assert res[f"md5_{name}"] == _md5(data), (name, res)
    assert res["dd_direct_rc"] != "0", f"O_DIRECT write to a read-only disk succeeded: {res}"
    assert res["dd_buffered_rc"] != "0", f"buffered write to a read-only disk succeeded: {res}"
    assert res["discard_rc"] != "0", f"discard on a read-only disk succeeded: {res}"
    assert res["wrsect"] == "0", res
    assert res["after_md5"] == _md5(at_write_off), res
    if fs:
        assert res["fs_md5"] == _md5(RO_FILE), res
    record_property("ext4_checked", fs)

    d.wait_connection_closed(2)
    assert _image_sha(img) == before, "the read-only image changed"
    problems = _daemon_problems(d.log_text())
    assert not problems, "\n".join(problems)


# --- front end killed mid-I/O, a new one on the same daemon ------------------

FIRST_OFF, FIRST = 8 * MiB, pattern(40, 8 * MiB)
LOOP_OFF = 24 * MiB
SECOND_OFF, SECOND = 40 * MiB, pattern(41, 256 << 10)
FIRST_MARKER = "=== FIRST PATTERN WRITTEN ==="

WRITER_SCRIPT = r"""
. /lib/vhtest.sh
dio_write /data/first /dev/vda @FIRST_OFF@ || { echo "FAIL: first write"; exit 1; }
sync
echo "@MARKER@"
i=0
while :; do
    dio_write /data/first /dev/vda @LOOP_OFF@ || { echo "FAIL: loop write"; exit 1; }
    i=$((i + 1))
    echo "LOOP $i"
done
"""

READER_SCRIPT = r"""
. /lib/vhtest.sh
fail() { echo "FAIL: $*"; exit 1; }
dio_read /dev/vda @FIRST_OFF@ @FIRST_LEN@ /tmp/first || fail "read first"
result first_md5 "$(md5sum < /tmp/first | cut -d' ' -f1)"
dio_write /data/second /dev/vda @SECOND_OFF@ || fail "write second"
dio_read /dev/vda @SECOND_OFF@ @SECOND_LEN@ /tmp/second || fail "read second"
result second_md5 "$(md5sum < /tmp/second | cut -d' ' -f1)"
result done 1
"""


def test_qemu_killed_mid_io_then_new_qemu(
    blk_daemon: StartDaemon,
    guests: BootGuest,
    record_property: RecordProperty,
) -> None:
    """SIGKILL QEMU while its guest writes in a loop; a new QEMU on the same daemon
    process (same socket) reads back what the first guest wrote before the kill."""
    d = blk_daemon(image_size=IMG_SIZE)
    pid = d.pid
    writer = (
        WRITER_SCRIPT.replace("@FIRST_OFF@", str(FIRST_OFF))
        .replace("@LOOP_OFF@", str(LOOP_OFF))
        .replace("@MARKER@", FIRST_MARKER)
    )
    t0 = time.monotonic()
    with guests(writer, blk_qemu_args(d), name="writer", files={"/data/first": FIRST}) as g1:
        g1.wait_for(FIRST_MARKER, GUEST_TIMEOUT)
        g1.wait_for("LOOP 2\n", 30)  # the write loop is going: I/O is in flight
        g1.kill()
        killed_at = g1.output().count("LOOP ")
    t_kill = time.monotonic() - t0
    record_property("loops_before_kill", killed_at)

    why = d.wait_connection_closed(2)
    record_property("disconnect_reason", why.split("disconnected:", 1)[1].strip())
    assert d.alive() and d.pid == pid
    with open(d.image_path, "rb") as f:
        f.seek(FIRST_OFF)
        assert f.read(len(FIRST)) == FIRST, "first pattern not in the image after the kill"

    reader = (
        READER_SCRIPT.replace("@FIRST_OFF@", str(FIRST_OFF))
        .replace("@FIRST_LEN@", str(len(FIRST)))
        .replace("@SECOND_OFF@", str(SECOND_OFF))
        .replace("@SECOND_LEN@", str(len(SECOND)))
    )
    with guests(reader, blk_qemu_args(d), name="reader", files={"/data/second": SECOND}) as g2:
        res, text, boot, work = _run(g2, "second guest")
    total = time.monotonic() - t0
    print(
        f"\n[kill] writer killed after {t_kill:.1f}s ({killed_at} loops); reader boot "
        f"{boot:.1f}s workload {work:.1f}s; total {total:.1f}s {res}"
    )
    record_property("total_s", round(total, 2))

    assert res.get("done") == "1", text[-3000:]
    assert res["first_md5"] == _md5(FIRST), res
    assert res["second_md5"] == _md5(SECOND), res

    d.wait_connection_closed(3)
    assert d.alive() and d.pid == pid, "the daemon did not survive"
    for conn in (2, 3):
        assert d.log_lines(f"{d.connection(conn)}: front end connected"), d.log_text()
        assert d.log_lines(f"{d.connection(conn)}: disconnected:"), d.log_text()
    with open(d.image_path, "rb") as f:
        f.seek(FIRST_OFF)
        assert f.read(len(FIRST)) == FIRST
        f.seek(SECOND_OFF)
        assert f.read(len(SECOND)) == SECOND
    # a front end dying is not an error for the daemon
    problems = _daemon_problems(d.log_text())
    assert not problems, "\n".join(problems)


# --- back end restarted under a live guest (QEMU reconnect=1) -----------------

RESTART_DATA = pattern(50, 1 * MiB)
RESTART_OFF = 8 * MiB
RESTART_ROUNDS = 30

RESTART_SCRIPT = r"""
. /lib/vhtest.sh
want=$(md5sum < /data/x)
i=0; bad=0
while [ $i -lt @N@ ]; do
    dio_write /data/x /dev/vda @OFF@ || { echo "WRITE FAILED $i"; bad=$((bad + 1)); }
    dio_read /dev/vda @OFF@ @LEN@ /tmp/y || { echo "READ FAILED $i"; bad=$((bad + 1)); }
    [ "$(md5sum < /tmp/y)" = "$want" ] || { echo "MISMATCH $i"; bad=$((bad + 1)); }
    i=$((i + 1))
    echo "LOOP $i"
done
result bad $bad
result loops $i
result ioerr_msgs "$(dmesg | grep -c 'I/O error')"
result done 1
"""


def test_daemon_restarted_under_live_guest(
    blk_daemon: StartDaemon,
    guests: BootGuest,
    record_property: RecordProperty,
) -> None:
    """With ``reconnect=1`` on the chardev (what the daemon's "attach with" hint
    says), SIGTERM the daemon while the guest loops over O_DIRECT write/read/verify,
    start a new daemon on the same socket and image: QEMU reconnects, and the
    guest's loop finishes with every round verified and no I/O error."""
    d1 = blk_daemon(image_size=IMG_SIZE)
    script = (
        RESTART_SCRIPT.replace("@N@", str(RESTART_ROUNDS))
        .replace("@OFF@", str(RESTART_OFF))
        .replace("@LEN@", str(len(RESTART_DATA)))
    )
    args = blk_qemu_args(d1, chardev_opts=",reconnect=1")
    t0 = time.monotonic()
    with guests(script, args, files={"/data/x": RESTART_DATA}) as g:
        g.wait_for("LOOP 3\n", GUEST_TIMEOUT)
        d1.check_clean_exit()  # SIGTERM with the front end attached: exit 0, no traceback
        stopped_at = g.output().count("LOOP ")
        assert "=== WORKLOAD EXIT" not in g.output()
        # stopped cleanly: what the guest wrote is in the image
        with open(d1.image_path, "rb") as f:
            f.seek(RESTART_OFF)
            assert f.read(len(RESTART_DATA)) == RESTART_DATA
        d2 = blk_daemon(image=d1.image_path, socket_path=d1.socket_path)
        res, text, _, _ = _run(g, "guest")
    total = time.monotonic() - t0
    print(f"\n[restart] daemon stopped after loop {stopped_at}; total {total:.1f}s {res}")
    record_property("loops_before_restart", stopped_at)
    record_property("total_s", round(total, 2))

    assert stopped_at < RESTART_ROUNDS
    assert res.get("done") == "1", text[-3000:]
    assert res["loops"] == str(RESTART_ROUNDS), res
    assert res["bad"] == "0", text[-3000:]
    assert res["ioerr_msgs"] == "0", res
    assert d1.log_lines(f"{d1.connection(2)}: disconnected: daemon stopping"), d1.log_text()
    d2.wait_connection_closed(2)  # QEMU reconnected to the new daemon, then powered off
    problems = _daemon_problems(d1.log_text() + d2.log_text())
    assert not problems, "\n".join(problems)
