"""cffi build script for ``devices.blk._blk``: the virtio-blk request handler (blk.c)
compiled with the core's ring walker (c_ext/build.py says how and why)."""

from __future__ import annotations

import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the core's build script: its cdef, sources and make_device_ffi (run, not imported:
# c_ext/ is not a package, and setuptools runs this file the same way)
core = runpy.run_path(str(HERE.parents[1] / "c_ext" / "build.py"))

CDEF = (
    core["error_defines"](HERE / "blk.h", "BLK_ERRORS")
    + """
struct blk_dev {
    int fd; int read_only; int is_blockdev; uint64_t capacity;
    uint32_t max_discard_sectors; uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors; uint32_t max_write_zeroes_seg;
    uint64_t max_request_bytes;
    uint8_t serial[20];
};
struct blk_stats {
    uint64_t reads; uint64_t writes; uint64_t flushes; uint64_t discards;
    uint64_t write_zeroes; uint64_t get_ids; uint64_t ioerr; uint64_t unsupp;
    uint64_t bytes_read; uint64_t bytes_written;
};
struct blk_queue { const struct blk_dev *dev; struct blk_stats stats; };
int blk_run_queue(struct vu_vq *vq, struct blk_queue *q);
const struct vu_error_info *blk_error_table(uint32_t *n);
"""
)

ffibuilder = core["make_device_ffi"]("devices.blk._blk", CDEF, HERE / "blk.h", [HERE / "blk.c"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
