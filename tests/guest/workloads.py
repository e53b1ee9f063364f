"""Guest workloads shared by the QEMU tests (tests/guest and tests/qemu).

:data:`BLK_WORKLOAD` is the block-device workload: O_DIRECT pattern writes and
reads (``dio_write``/``dio_read`` from /lib/vhtest.sh: busybox dd with bs=64k and
byte offsets, since busybox silently drops O_DIRECT for bs < 4096) with the
device's sector counters, an ext4 file system with a file copied through it,
optional device-specific checks (``extra``) and optionally fio.  It prints
``RESULT key=value`` lines; :func:`check_blk_results` checks them and
:func:`check_image` checks, host side, that the image holds the patterns.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path

MiB = 1 << 20
FS_SIZE_MB = 32  # the file system uses only the first 32 MiB; patterns live above it

# name -> (byte offset, data)
Patterns = Mapping[str, tuple[int, bytes]]


def pattern(seed: int, n: int) -> bytes:
    """``n`` pseudo-random bytes, the same for the same seed."""
    return random.Random(seed).randbytes(n)


def default_patterns(img_size: int) -> dict[str, tuple[int, bytes]]:
    """Patterns above the file system; offsets/lengths are 512-aligned, not all
    4 KiB-aligned, and one is the last block of a disk of ``img_size`` bytes."""
    assert img_size >= 64 * MiB
    return {
        "p0": (40 * MiB, pattern(0, 1 * MiB)),
        "p1": (50 * MiB + 4096, pattern(1, 64 * 1024 + 512)),
        "p2": (img_size - 4096, pattern(2, 4096)),  # last block of the disk
        "p3": (33 * MiB + 3 * 512, pattern(3, 3 * 512)),  # sector-sized, not page-aligned
    }


EXT4_FILE = pattern(4, 300 * 1024 + 123)

BLK_WORKLOAD = r"""
. /lib/vhtest.sh
fail() { echo "FAIL: $*"; exit 1; }
NAME=@DEV@
DEV=/dev/$NAME
[ -b "$DEV" ] || fail "no block device $DEV"
result dev_size "$(blockdev --getsize64 $DEV)"

# --- raw O_DIRECT writes, read back with O_DIRECT -------------------------
# (the sector counters prove the I/O bypassed the page cache: a direct write
# reaches the device before dd returns, a direct read is not served from cache)
for spec in @SPECS@; do
    name=${spec%%:*}; off=${spec#*:}
    f=/data/$name
    len=$(wc -c < $f)
    w0=$(wr_sectors $NAME)
    dio_write $f $DEV $off || fail "dd write $name"
    w1=$(wr_sectors $NAME)
    dio_read $DEV $off $len /tmp/$name.back || fail "dd read $name"
    r1=$(rd_sectors $NAME)
    dio_read $DEV $off $len /tmp/$name.back2 || fail "dd read2 $name"
    r2=$(rd_sectors $NAME)
    want=$(md5sum < $f)
    ok=ok
    [ "$want" = "$(md5sum < /tmp/$name.back)" ] || ok=BAD
    [ "$want" = "$(md5sum < /tmp/$name.back2)" ] || ok=BAD
    result md5_$name $ok
    result wrsect_$name $((w1 - w0))
    result rdsect_$name $((r2 - r1))
done

# --- ext4 -----------------------------------------------------------------
if command -v mkfs.ext4 >/dev/null; then
    mkfs.ext4 -q -F $DEV @FS_MB@M || fail mkfs.ext4
    echo "RESULT mkfs=mkfs.ext4"
else
    mke2fs -F $DEV $((@FS_MB@ * 1024)) >/dev/null || fail mke2fs
    echo "RESULT mkfs=busybox-mke2fs"
fi
mkdir -p /mnt/t
mount -t ext4 $DEV /mnt/t || fail "mount"
cp /data/ext4file /mnt/t/f || fail "cp"
sync
umount /mnt/t || fail "umount"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro $DEV /mnt/t || fail "remount"
want=$(md5sum < /data/ext4file); got=$(md5sum < /mnt/t/f)
echo "RESULT ext4_md5=$( [ "$want" = "$got" ] && echo ok || echo BAD )"
echo "RESULT ext4_fstype=$(awk '$2 == "/mnt/t" {print $3}' /proc/mounts)"
umount /mnt/t || fail "umount 2"

# --- device-specific checks -------------------------------------------------
@EXTRA@

# --- fio ------------------------------------------------------------------
if [ "@FIO@" = 1 ] && command -v fio >/dev/null; then
    echo "RESULT fio_version=$(fio --version)"
    for eng in libaio psync; do
        qd=1; [ $eng = libaio ] && qd=16
        out=$(fio --name=rr --filename=$DEV --rw=randread --bs=4k --direct=1 \
              --ioengine=$eng --iodepth=$qd --runtime=2 --time_based --minimal 2>&1) \
            || { echo "$out"; fail "fio $eng"; }
        # terse v3: field 5 = error, field 8 = read IOPS
        echo "RESULT fio_${eng}_err=$(echo "$out" | cut -d';' -f5)"
        echo "RESULT fio_${eng}_iops=$(echo "$out" | cut -d';' -f8)"
    done
fi
echo "RESULT done=1"
"""


def blk_script(
    dev: str,
    patterns: Patterns,
    *,
    fio: bool = False,
    extra: str = "",
    fs_mb: int = FS_SIZE_MB,
) -> str:
    """The block workload for guest device ``dev`` (e.g. ``vda``); ``extra`` is
    shell run after the ext4 part (``$DEV``, ``$NAME``, ``fail`` and the
    /lib/vhtest.sh helpers are available)."""
    specs = " ".join(f"{n}:{off}" for n, (off, _) in patterns.items())
    return (
        BLK_WORKLOAD.replace("@DEV@", dev)
        .replace("@SPECS@", specs)
        .replace("@FS_MB@", str(fs_mb))
        .replace("@FIO@", "1" if fio else "0")
        .replace("@EXTRA@", extra or ":")
    )


def blk_files(patterns: Patterns) -> dict[str, bytes]:
    """The initrd files :data:`BLK_WORKLOAD` reads: one per pattern, and the ext4 file."""
    files = {f"/data/{n}": data for n, (_, data) in patterns.items()}
    files["/data/ext4file"] = EXT4_FILE
    return files


def check_blk_results(res: Mapping[str, str], patterns: Patterns, size: int, text: str) -> None:
    """Assert what every run of :data:`BLK_WORKLOAD` must report."""
    tail = text[-3000:]
    assert res.get("done") == "1", tail
    assert int(res["dev_size"]) == size, res
    for name, (_, data) in patterns.items():
        assert res[f"md5_{name}"] == "ok", (name, tail)
        # O_DIRECT bypasses the page cache: exactly the bytes asked for hit the device
        assert int(res[f"wrsect_{name}"]) == len(data) // 512, (name, res)
        assert int(res[f"rdsect_{name}"]) == len(data) // 512, (name, res)
    assert res["ext4_md5"] == "ok", res
    assert res["ext4_fstype"] == "ext4", res


def check_image(img: Path, patterns: Patterns, ext4: bool = True) -> None:
    """The host image holds each pattern at its offset (and an ext2/3/4 superblock)."""
    with open(img, "rb") as f:
        for name, (off, data) in patterns.items():
            f.seek(off)
            assert f.read(len(data)) == data, f"pattern {name} not at offset {off} of {img}"
        if ext4:
            f.seek(1024 + 56)
            assert f.read(2) == b"\x53\xef", "no ext2/3/4 superblock magic at 1080"


# --- fio passes with crc32c verification, until the host asks for a stop ------------------
#: Shell functions for a guest that keeps fio writing and verifying while the host does
#: something to it (live migration: tests/qemu/test_migration.py). The lines it prints
#: are the ones tests/qemu/crash_harness.Console parses: ``IO uptime reads writes
#: in_flight`` every ``$TICK`` s (``io_monitor_start``/``io_monitor_stop``), ``FIO PASS n
#: START``, ``FIO PASS n END rc=N``, ``FIOJSON n {...}`` and ``FIOERR n line``. Each pass
#: (``fio_loop``) writes random blocks of mixed sizes over the first ``$FIO_SIZE`` bytes of
#: ``$DEV`` (O_DIRECT, libaio, iodepth 16) and verifies every one (``verify=crc32c``,
#: ``verify_fatal``); the loop ends after the first failed pass, or after a pass once the
#: block at ``$CTL_BLOCK`` (4 KiB units, outside fio's region) holds ``$STOP_MAGIC`` (the
#: host writes it into the image). It sets ``FIO_RC`` and prints ``RESULT passes`` and
#: ``RESULT fio_rc``. Variables: DEV, NAME (e.g. vda), FIO_SIZE, CTL_BLOCK, STOP_MAGIC,
#: TICK, MAX_PASSES; /lib/vhtest.sh sourced.
FIO_VERIFY_LOOP_SH = r"""
io_monitor_start() {
    (
        while :; do
            read -r _up _idle < /proc/uptime
            read -r _r1 _r2 _r3 _r4 _w1 _w2 _w3 _w4 _inf _rest < /sys/block/$NAME/stat
            echo "IO $_up $_r1 $_w1 $_inf"
            sleep $TICK
        done
    ) &
    MON_PID=$!
}
io_monitor_stop() { kill $MON_PID 2>/dev/null; }
stop_requested() {
    dd if=$DEV bs=4096 skip=$CTL_BLOCK count=1 iflag=direct 2>/dev/null | grep -q "$STOP_MAGIC"
}
fio_loop() {
    _pass=0
    FIO_RC=0
    while :; do
        _pass=$((_pass + 1))
        echo "FIO PASS $_pass START"
        fio --name=verify --filename=$DEV --offset=0 --size=$FIO_SIZE \
            --rw=randwrite --bssplit=4k/80:8k/10:64k/8:256k/2 --randseed=$_pass \
            --direct=1 --ioengine=libaio --iodepth=16 \
            --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=256 \
            --verify_state_save=0 --output-format=json --output=/tmp/fio.json \
            > /tmp/fio.err 2>&1
        FIO_RC=$?
        echo "FIO PASS $_pass END rc=$FIO_RC"
        echo "FIOJSON $_pass $(tr -d '\n' < /tmp/fio.json)"
        while read -r _l; do echo "FIOERR $_pass $_l"; done < /tmp/fio.err
        [ $FIO_RC -eq 0 ] || break
        stop_requested && break
        [ $_pass -lt $MAX_PASSES ] \
            || { echo "FAIL: no stop request after $_pass passes"; FIO_RC=99; break; }
    done
    result passes $_pass
    result fio_rc $FIO_RC
}
"""


def fio_verify_loop_vars(
    dev: str,
    fio_size: int,
    ctl_offset: int,
    stop_magic: bytes,
    *,
    tick: float = 0.2,
    max_passes: int = 1000,
) -> str:
    """The variables :data:`FIO_VERIFY_LOOP_SH` reads, as shell assignments."""
    assert ctl_offset % 4096 == 0 and ctl_offset >= fio_size, (ctl_offset, fio_size)
    return (
        f"NAME={dev}\nDEV=/dev/{dev}\nFIO_SIZE={fio_size}\nCTL_BLOCK={ctl_offset // 4096}\n"
        f"STOP_MAGIC={stop_magic.decode()}\nTICK={tick}\nMAX_PASSES={max_passes}\n"
    )


def request_stop(image: Path, ctl_offset: int, stop_magic: bytes) -> None:
    """Host side of :data:`FIO_VERIFY_LOOP_SH`: write the stop block into the image (the
    back end reads it through the host's page cache, where this write lands)."""
    with open(image, "r+b") as f:
        os.pwrite(f.fileno(), stop_magic.ljust(4096, b"\0"), ctl_offset)
