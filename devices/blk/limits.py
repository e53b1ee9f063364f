"""Every bound on what a front end or a guest controls in the virtio-blk device, named
once (the core's are in vhost/limits.py; the table has the same shape).

=========================================  ==========  =============================================
bound                                      value       where it is enforced
=========================================  ==========  =============================================
MAX_BLK_QUEUES                             64          devices/blk: --num-queues (queue threads)
MAX_REQUEST_BYTES (blk data)               126 MiB     blk.c: SEG_MAX x SIZE_MAX, as advertised
MAX_DISCARD_SEG / _WRITE_ZEROES            32          blk.c: segments per request
MAX_DISCARD_SECTORS / _WZ                  2^22 - 1    blk.c: sectors per segment
=========================================  ==========  =============================================

The C side gets each value from Python (``struct blk_dev``) and enforces it per request;
the config space advertises the same values, so a driver that follows it never meets them.
A stop waits for at most one request per queue: at most MAX_REQUEST_BYTES of disk I/O.
"""

from __future__ import annotations

from typing import Final

MAX_BLK_QUEUES: Final = 64
SIZE_MAX: Final = 1 << 20  # bytes per data segment (config space size_max)
SEG_MAX: Final = 126  # QEMU's default queue size (128) minus header and status
MAX_REQUEST_BYTES: Final = SEG_MAX * SIZE_MAX
MAX_DISCARD_SECTORS: Final = (1 << 22) - 1
MAX_DISCARD_SEG: Final = 32
MAX_WRITE_ZEROES_SECTORS: Final = (1 << 22) - 1
MAX_WRITE_ZEROES_SEG: Final = 32
