"""cffi build script (API mode) for the private module ``vhost._native``.

The C lives in real .c/.h files beside this script; this file only declares the
interface Python may touch. Set ``VHOST_SANITIZE=1`` in the environment to
build with AddressSanitizer and UBSan (for tests; run Python with
``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``).
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
#define VU_MAX_REGIONS ...
#define VU_MAX_QUEUE_SIZE ...
#define VU_MAX_CHAIN_IOV ...
#define VU_RUN_STOPPED ...
#define VU_RUN_ERRORS ...
#define VU_RUN_BROKEN ...
#define VU_RUN_FD_ERROR ...
#define VU_INFLIGHT_VERSION ...

struct iovec { void *iov_base; size_t iov_len; };

struct vu_error { int32_t code; uint32_t head; uint64_t detail; uint64_t count; };
struct vu_region { uint64_t gpa; uint64_t size; uint64_t uva; uint64_t mmap_offset;
                   uint8_t *host; ...; };
struct vu_mem { uint32_t nregions; struct vu_region regions[]; ...; };
struct vu_chain { uint32_t head; uint32_t n_out; uint32_t n_in; uint64_t out_bytes;
                  uint64_t in_bytes; struct iovec iov[]; ...; };
struct vu_stats { uint64_t chains; uint64_t bad_chains; uint64_t kicks; uint64_t signals;
                  uint64_t batches; };
struct vu_inflight_desc { uint8_t inflight; uint16_t next; uint64_t counter; ...; };
struct vu_inflight_split { uint64_t features; uint16_t version; uint16_t desc_num;
                           uint16_t last_batch_head; uint16_t used_idx;
                           struct vu_inflight_desc desc[]; };
struct vu_vq {
    uint32_t num; int event_idx; int indirect;
    uint16_t last_avail_idx; uint16_t used_idx;
    int broken; int kick_fd; int call_fd; int err_fd; int stop_fd;
    struct vu_error err; struct vu_stats stats; struct vu_chain chain;
    struct vu_inflight_split *inflight; uint64_t inflight_counter;
    uint32_t resubmit_n; uint32_t resubmit_pos;
    ...;
};

int vu_mem_add(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva,
               uint64_t mmap_offset, int fd);
int vu_mem_remove(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva);
void vu_mem_clear(struct vu_mem *mem);
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
int vu_vq_enable_notification(struct vu_vq *vq);
int vu_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx);
void vu_vq_request_stop(struct vu_vq *vq);
void vu_vq_ring_state(struct vu_vq *vq, uint16_t *out);

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
int blk_process_queue(struct vu_vq *vq, struct blk_queue *q);

#define NET_MAX_PAIRS ...
#define NET_MAC_BUCKETS ...
#define NET_MAC_WAYS ...
#define NET_RX_BUDGET ...
struct net_stats {
    uint64_t tx_packets; uint64_t tx_bytes; uint64_t tx_dropped; uint64_t rx_packets;
    uint64_t rx_bytes; uint64_t rx_dropped; uint64_t rx_no_buffers; uint64_t flooded;
};
struct net_port {
    uint32_t id; uint32_t hdr_len; uint32_t max_frame; int mergeable; int guest_gso;
    int host_gso; struct net_stats stats;
};
struct net_pair {
    struct net_port *port; struct vu_vq *rx; struct vu_vq *tx; int tap_fd; int rx_starved;
    uint16_t rx_starved_idx; int rx_touched;
};
struct net_engine {
    uint32_t npairs; int switch_mode; uint32_t mac_age; uint32_t busy_poll_us; int stop_fd;
    int stop;
    struct net_pair pairs[];
    ...;
};
int net_run(struct net_engine *e);
void net_request_stop(struct net_engine *e);
void net_clear_macs(struct net_engine *e);
int net_switch_lookup(struct net_engine *e, const uint8_t *mac);
"""

SOURCES = ["memory.c", "ring.c", "blk.c", "net.c"]


def _compile_args() -> tuple[list[str], list[str]]:
    cflags = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
              # cffi's generated glue trips these; our own files are clean of them
              "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
    ldflags: list[str] = []
    if os.environ.get("VHOST_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined"]
        cflags += san
        ldflags += san
    return cflags, ldflags


def make_ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF)
    cflags, ldflags = _compile_args()
    # Paths relative to the project root, where setuptools runs the build.
    rel = os.path.relpath(HERE, Path.cwd())
    ffi.set_source(
        "vhost._native",
        '#include "vu.h"\n#include "blk.h"\n#include "net.h"\n',
        sources=[os.path.join(rel, s) for s in SOURCES],
        include_dirs=[rel],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        depends=[os.path.join(rel, h) for h in ("vu.h", "blk.h", "net.h")],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
