"""cffi build script (API mode) for the core's private module ``vhost._native``, and the
pieces a device's own build script reuses.

The C lives in real .c/.h files beside this script; this file only declares the
interface Python may touch. The core knows no device: a device in C (devices/blk,
devices/net) has a build script of its own that compiles its sources together with
the core's (``CORE_SOURCES``) into its own module, with ``ffi.include(make_ffi())`` so
that the queues and memory maps made by ``vhost._native`` are the same C types there.
Each device module carries its own copy of the ring walker, compiled from the same
files with the same flags in the same build, so the data path makes no call across
modules; the copies are hidden (``-fvisibility=hidden``) so that none can resolve to
another module's.

Error codes are written once, as rows of an X-macro in a header (``VU_ERRORS`` in vu.h,
``BLK_ERRORS`` in devices/blk/blk.h, ...): :func:`error_defines` turns the rows into the
cffi declarations, and the module's ``*_error_table()`` gives Python the texts.

Set ``VHOST_SANITIZE=1`` in the environment to build with AddressSanitizer and UBSan
(for tests; run Python with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CORE_HEADER = HERE / "vu.h"
CORE_SOURCES = [HERE / name for name in ("memory.c", "ring.c", "errors.c")]

_ERROR_ROW = re.compile(r"X\((\w+),\s*(-\d+),\s*(VALUE|ERRNO),", re.S)

CDEF_TEMPLATE = """
#define VU_MAX_REGIONS ...
#define VU_MAX_QUEUE_SIZE ...
#define VU_MAX_CHAIN_IOV ...
#define VU_RUN_STOPPED ...
#define VU_RUN_ERRORS ...
#define VU_RUN_BROKEN ...
#define VU_RUN_FD_ERROR ...
#define VU_WAIT_IDLE ...
#define VU_WAIT_WORK ...
#define VU_WAIT_STOP ...
#define VU_INFLIGHT_VERSION ...
#define VU_LOG_PAGE ...
#define VU_LOG_CACHE ...
#define VHOST_VRING_F_LOG ...
#define VU_DETAIL_VALUE ...
#define VU_DETAIL_ERRNO ...
#define VU_ERR_DEVICE_BASE ...
#define VU_BATCH_BUCKETS ...
#define VU_ERROR_SLOTS ...
@ERRORS@

struct iovec { void *iov_base; size_t iov_len; };

struct vu_error_info { int32_t code; int32_t detail_kind; const char *name; const char *text; };
struct vu_error { int32_t code; uint32_t head; uint64_t detail; uint64_t count; };
struct vu_region { uint64_t gpa; uint64_t size; uint64_t uva; uint64_t mmap_offset;
                   uint8_t *host; ...; };
struct vu_mem { uint32_t nregions; struct vu_region regions[]; ...; };
struct vu_chain { uint32_t head; uint32_t n_out; uint32_t n_in; uint64_t out_bytes;
                  uint64_t in_bytes; struct iovec iov[]; ...; };
struct vu_chain_ref { uint32_t head; uint16_t slot; uint32_t iov_start; uint32_t n_out;
                      uint32_t n_in; uint64_t out_bytes; uint64_t in_bytes; };
struct vu_stats { uint64_t chains; uint64_t bad_chains; uint64_t kicks; uint64_t signals;
                  uint64_t batches; uint64_t log_words; uint64_t log_beyond;
                  uint64_t resubmitted; uint64_t pushed; uint64_t batch_chains;
                  uint64_t batch_hist[...]; uint64_t errors[...]; };
struct vu_log { uint8_t *base; uint64_t size; int call_fd; };
struct vu_inflight_desc { uint8_t inflight; uint16_t next; uint64_t counter; ...; };
struct vu_inflight_split { uint64_t features; uint16_t version; uint16_t desc_num;
                           uint16_t last_batch_head; uint16_t used_idx;
                           struct vu_inflight_desc desc[]; };
struct vu_vq {
    uint32_t num; int event_idx; int indirect;
    uint16_t last_avail_idx; uint16_t used_idx;
    int broken; int kick_fd; int call_fd; int err_fd; int stop_fd; int stop;
    struct vu_error err; struct vu_stats stats; struct vu_chain chain;
    struct vu_inflight_split *inflight; uint64_t inflight_counter;
    uint32_t resubmit_n; uint32_t resubmit_pos;
    const struct vu_log *log; uint64_t log_used_gpa; int log_used;
    ...;
};

const struct vu_error_info *vu_error_table(uint32_t *n);

int vu_mem_add(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva,
               uint64_t mmap_offset, int fd);
int vu_mem_remove(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva);
void vu_mem_clear(struct vu_mem *mem);
int vu_mem_retire(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva,
                  void **base, uint64_t *map_size);
void vu_unmap(void *base, uint64_t size);
void *vu_gpa_to_host(const struct vu_mem *mem, uint64_t gpa, uint64_t len);
void *vu_uva_to_host(const struct vu_mem *mem, uint64_t uva, uint64_t len);
int vu_gpa_to_iov(const struct vu_mem *mem, uint64_t gpa, uint64_t len,
                  struct iovec *iov, uint32_t max_iov);

int vu_vq_setup(struct vu_vq *vq, const struct vu_mem *mem, uint32_t num,
                uint64_t desc_uva, uint64_t avail_uva, uint64_t used_uva,
                uint16_t last_avail_idx, int event_idx, int indirect);
int vu_vq_avail_count(struct vu_vq *vq);
uint64_t vu_inflight_queue_size(uint32_t num);
int vu_vq_set_inflight(struct vu_vq *vq, void *region, uint64_t size);
int vu_vq_pop(struct vu_vq *vq, struct vu_chain *chain);
void vu_vq_push(struct vu_vq *vq, uint32_t head, uint32_t len);
void vu_vq_flush_used(struct vu_vq *vq);
int vu_vq_should_signal(struct vu_vq *vq);
int vu_vq_signal_if_needed(struct vu_vq *vq);
int vu_vq_enable_notification(struct vu_vq *vq);
int vu_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx);
void vu_vq_request_stop(struct vu_vq *vq);
void vu_vq_ring_state(struct vu_vq *vq, uint16_t *out);
void vu_vq_discard(struct vu_vq *vq, uint32_t n);
int vu_vq_pop_batch(struct vu_vq *vq, struct vu_chain_ref *out, uint32_t max_chains,
                    struct iovec *iov, uint32_t max_iov);
int vu_vq_push_batch(struct vu_vq *vq, const uint32_t *heads, const uint32_t *lens, uint32_t n);
int vu_vq_wait(struct vu_vq *vq, int timeout_ms);
void vu_log_write(struct vu_vq *vq, uint64_t gpa, uint64_t len);
void vu_log_flush(struct vu_vq *vq);
size_t vu_iov_copy_from(const struct iovec *iov, uint32_t niov, size_t skip, void *dst,
                        size_t len);
size_t vu_iov_copy_to(const struct iovec *iov, uint32_t niov, size_t skip, const void *src,
                      size_t len);
"""


def error_defines(header: Path, macro: str) -> str:
    """``#define NAME ...`` for every row of the X-macro ``macro`` in ``header``: the
    codes become constants of the compiled module without being written twice."""
    text = header.read_text()
    start = text.index(f"#define {macro}(X)")
    end = text.index("\n\n", start)
    names = [name for name, _value, _kind in _ERROR_ROW.findall(text[start:end])]
    if not names:
        raise RuntimeError(f"{header}: no rows in {macro}")
    return "\n".join(f"#define {name} ..." for name in names)


CDEF = CDEF_TEMPLATE.replace("@ERRORS@", error_defines(CORE_HEADER, "VU_ERRORS"))


def compile_args(hidden: bool = False) -> tuple[list[str], list[str]]:
    """(cflags, ldflags); ``hidden`` for a device module's private copy of the core."""
    cflags = [
        "-O2",
        "-g",
        "-std=gnu11",
        "-Wall",
        "-Wextra",
        "-Werror",
        # cffi's generated glue trips these; our own files are clean of them
        "-Wno-unused-parameter",
        "-Wno-missing-field-initializers",
    ]
    if hidden:
        cflags.append("-fvisibility=hidden")
    ldflags: list[str] = []
    if os.environ.get("VHOST_SANITIZE") == "1":
        san = [
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=undefined",
        ]
        cflags += san
        ldflags += san
    return cflags, ldflags


def relative(path: Path) -> str:
    """Paths relative to the project root, where setuptools runs the build."""
    return os.path.relpath(path, Path.cwd())


def make_ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF)
    cflags, ldflags = compile_args()
    ffi.set_source(
        "vhost._native",
        '#include "vu.h"\n',
        sources=[relative(s) for s in CORE_SOURCES],
        include_dirs=[relative(HERE)],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        depends=[relative(CORE_HEADER)],
    )
    return ffi


def make_device_ffi(module: str, cdef: str, header: Path, sources: list[Path]) -> FFI:
    """The FFI of a device module: its declarations (``cdef``) on top of the core's
    types, its sources compiled with a hidden copy of the core's."""
    ffi = FFI()
    ffi.include(make_ffi())
    ffi.cdef(cdef)
    cflags, ldflags = compile_args(hidden=True)
    ffi.set_source(
        module,
        f'#include "{header.name}"\n',
        sources=[relative(s) for s in [*sources, *CORE_SOURCES]],
        include_dirs=[relative(header.parent), relative(HERE)],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        depends=[relative(header), relative(CORE_HEADER)],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
