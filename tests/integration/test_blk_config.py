"""What the vhost-user-blk device offers and describes, over a real socket: its config
space (capacity, block size, queue count, discard and write-zeroes bounds; read-only to
the driver), the features it offers and refuses, and ``--read-only`` (VIRTIO_BLK_F_RO
offered, writes, discards and write-zeroes refused with IOERR, the image untouched).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devices.blk import DEFAULT_QUEUES
from tests.support.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    Guest,
    check_io_works,
    connect_guest,
    parse_blk_config,
    pattern,
)
from tests.support.daemon import IMAGE_SIZE, StartDaemon
from tests.support.frontend import (
    ALL_FEATURES,
    F_LOG_ALL,
    AckError,
    KiB,
    MiB,
)

SECTOR = SECTOR_SIZE
shared = pytest.mark.shared_daemon  # see conftest: the module's daemon, not a fresh one
CAPACITY = IMAGE_SIZE // SECTOR


# =========================================================================================
# Config space and features
# =========================================================================================


@shared
def test_config_space(guest: Guest) -> None:
    cfg = parse_blk_config(guest.fe.get_config())
    assert cfg["capacity"] == CAPACITY
    assert cfg["blk_size"] == SECTOR
    assert cfg["num_queues"] == DEFAULT_QUEUES  # QEMU's default attaches: it asks one per vCPU
    assert cfg["seg_max"] >= 1 and cfg["size_max"] >= 4 * KiB
    assert cfg["max_discard_seg"] == 32 and cfg["max_write_zeroes_seg"] == 32
    assert cfg["max_discard_sectors"] > 0 and cfg["max_write_zeroes_sectors"] > 0
    assert cfg["write_zeroes_may_unmap"] == 1
    # a window of it, and reads past its end are zero
    assert guest.fe.get_config(8, 0) == guest.fe.get_config()[:8]
    assert guest.fe.get_config(16, 60) == guest.fe.get_config()[60:] + bytes(16)
    # config space is read-only here
    with pytest.raises(AckError):
        guest.fe.set_config(32, b"\x01")
    assert parse_blk_config(guest.fe.get_config())["writeback"] == 0
    check_io_works(guest, guest.daemon)


@shared
def test_features_not_offered_are_refused(guest: Guest) -> None:
    with pytest.raises(AckError):
        guest.fe.set_features(ALL_FEATURES)
    guest.fe.set_features(guest.fe.offered_features)  # the offer itself is fine
    # (LOG_ALL among them: without a dirty log the queue then waits for one)
    guest.fe.set_features(guest.fe.offered_features & ~F_LOG_ALL)
    check_io_works(guest, guest.daemon)


# =========================================================================================
# Read-only
# =========================================================================================


def test_read_only(start_daemon: StartDaemon, tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    content = pattern(16, 1 * MiB)
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(content)
    before = os.stat(image)
    d = start_daemon("--read-only", image=image)
    with connect_guest(d) as g:
        assert g.fe.offered_features & (1 << VIRTIO_BLK_F_RO)
        assert g.fe.features & (1 << VIRTIO_BLK_F_RO)
        blk = g.blk
        assert blk.read(0, len(content), segs=4) == content
        assert blk.write(0, bytes(4 * KiB)) == VIRTIO_BLK_S_IOERR
        assert blk.discard([(0, 8, 0)]) == VIRTIO_BLK_S_IOERR
        assert blk.write_zeroes([(8, 8, 0)]) == VIRTIO_BLK_S_IOERR
        assert blk.write_zeroes([(8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]) == VIRTIO_BLK_S_IOERR
        assert blk.flush() == VIRTIO_BLK_S_OK
        assert blk.read(0, len(content)) == content
        d.wait_log("write to a read-only device")
    with open(image, "rb") as f:
        assert f.read(len(content)) == content
    after = os.stat(image)
    assert (after.st_size, after.st_blocks, after.st_mtime_ns) == (
        before.st_size,
        before.st_blocks,
        before.st_mtime_ns,
    )


@shared
def test_not_read_only_without_flag(guest: Guest) -> None:
    assert not guest.fe.offered_features & (1 << VIRTIO_BLK_F_RO)
