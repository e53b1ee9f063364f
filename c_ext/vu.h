/*
 * vu.h - the C data path of the vhost-user back end: guest memory map, split
 * virtqueue walk with full validation, used ring and event-idx signalling.
 *
 * Boundary: nothing here parses vhost-user messages or knows a device. Python
 * (vhost/memory.py, vhost/virtqueue.py) owns these structs and fills them from
 * the session. A device in C (devices/blk, devices/net) plugs a per-chain handler
 * into vu_vq_run(), or drives vu_vq_pop/vu_vq_push itself; a device in Python takes
 * batches of validated chains through vu_vq_pop_batch/vu_vq_push_batch.
 * Everything the guest wrote is treated as hostile: each descriptor is copied
 * once, then checked before use.
 */
#ifndef VU_H
#define VU_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* Named bounds: each guest- or front-end-controlled quantity has one here. */
#define VU_MAX_REGIONS 256      /* memory slots advertised (GET_MAX_MEM_SLOTS): QEMU's x86 limit */
#define VU_MAX_QUEUE_SIZE 1024  /* largest SET_VRING_NUM accepted */
#define VU_MAX_CHAIN_IOV 2048   /* iovecs per chain (a descriptor may span regions) */
#define VU_INFLIGHT_ALIGN 64    /* each queue's inflight region starts on this boundary */

/* Split ring layouts (virtio 1.x, little endian on x86). */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];
};

/*
 * Error codes: negative and stable. Each row is (name, value, detail kind, text); the
 * table is the one place they are written: the enum below, the table Python reads
 * through vu_error_table() (log lines, exceptions, the reference walker's names) and
 * the cffi declarations (c_ext/build.py reads the rows) all come from it. Codes down to
 * VU_ERR_DEVICE_BASE + 1 are the core's; a device numbers its own from
 * VU_ERR_DEVICE_BASE down and exports its table the same way (see devices/blk/blk.h).
 * Detail kinds: VALUE, an address, index or count (logged in hex); ERRNO, an errno.
 */
#define VU_DETAIL_VALUE 0
#define VU_DETAIL_ERRNO 1
#define VU_ERR_DEVICE_BASE (-30)

#define VU_ERRORS(X) \
    X(VU_ERR_AVAIL_IDX, -1, VALUE, "avail index moved further than the queue size") \
    X(VU_ERR_HEAD, -2, VALUE, "head index outside the descriptor table") \
    X(VU_ERR_NEXT, -3, VALUE, "next index outside its descriptor table") \
    X(VU_ERR_ADDR, -4, VALUE, "buffer outside guest memory") \
    X(VU_ERR_LOOP, -5, VALUE, "descriptor loop") \
    X(VU_ERR_CHAIN_TOO_LONG, -6, VALUE, "chain longer than the queue size") \
    X(VU_ERR_INDIRECT_NESTED, -7, VALUE, "nested indirect descriptor") \
    X(VU_ERR_INDIRECT_LEN, -8, VALUE, "indirect table length not a positive multiple of 16") \
    X(VU_ERR_INDIRECT_ADDR, -9, VALUE, "indirect table outside guest memory") \
    X(VU_ERR_DIRECTION, -10, VALUE, "device-readable descriptor after a device-writable one") \
    X(VU_ERR_TOO_MANY_IOV, -11, VALUE, "chain needs too many iovecs") \
    X(VU_ERR_INDIRECT_NEXT, -12, VALUE, "indirect descriptor with NEXT set") \
    X(VU_ERR_INDIRECT_FEATURE, -13, VALUE, "indirect descriptor but INDIRECT_DESC not negotiated") \
    X(VU_ERR_RING_ADDR, -14, VALUE, "ring address not in guest memory or misaligned") \
    X(VU_ERR_QUEUE_SIZE, -15, VALUE, "queue size not a power of 2 in 1..1024") \
    X(VU_ERR_REGION_OVERLAP, -16, VALUE, "overlaps an existing region") \
    X(VU_ERR_REGION_FULL, -17, VALUE, "no free slot") \
    X(VU_ERR_REGION_BAD, -18, VALUE, "has zero size or wraps around the address space") \
    X(VU_ERR_REGION_NOT_FOUND, -19, VALUE, "does not match any mapped region") \
    X(VU_ERR_MMAP, -20, ERRNO, "cannot map the region") \
    X(VU_ERR_INFLIGHT, -21, VALUE, \
      "inflight region unusable (too small, wrong version or queue size, bad last batch)") \
    X(VU_ERR_REGION_FILE, -22, VALUE, "runs past the end of its file (mmap_offset + size > file size)") \
    X(VU_ERR_KICK_FD, -23, ERRNO, "kick fd failed") \
    X(VU_ERR_KICK_HUP, -24, VALUE, "kick fd hung up or at end of file (detail: poll events)") \
    X(VU_ERR_BROKEN, -25, VALUE, "ring broken by an earlier error") \
    X(VU_ERR_REGION_ALIGN, -26, VALUE, \
      "is on hugetlbfs but its mmap_offset or size is not a multiple of the huge page size")

/* One row of an error table, as Python reads it. */
struct vu_error_info {
    int32_t code;
    int32_t detail_kind; /* VU_DETAIL_* */
    const char *name;
    const char *text;
};

#define VU_ERROR_ENUM(name, value, kind, text) name = value,
#define VU_ERROR_INFO(name, value, kind, text) {value, VU_DETAIL_##kind, #name, text},

enum vu_error_code {
    VU_OK = 0,
    VU_ERRORS(VU_ERROR_ENUM)
};

/* Last error seen on a queue, for Python to log (rate limited there). */
struct vu_error {
    int32_t code;
    uint32_t head;
    uint64_t detail; /* address, index, errno or request type, depending on code */
    uint64_t count;  /* errors since the queue started */
};

struct vu_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;
    uint64_t mmap_offset;
    uint8_t *host;       /* our address of gpa */
    void *map_base;      /* what mmap returned */
    uint64_t map_size;
};

/*
 * The guest memory map, kept sorted so that a translation is a binary search (memory.c):
 * regions[] in guest-physical order, by_uva[] their indexes in front-end-virtual order.
 * No two regions overlap in either space. Nothing here changes while a queue runs (the
 * session stops every queue around a change), so workers read it without locks.
 */
struct vu_mem {
    uint32_t nregions;
    struct vu_region regions[VU_MAX_REGIONS]; /* sorted by gpa */
    uint16_t by_uva[VU_MAX_REGIONS];          /* indexes into regions[], sorted by uva */
};

/* One validated chain: n_out device-readable iovecs, then n_in writable. */
struct vu_chain {
    uint32_t head;
    uint32_t n_out;
    uint32_t n_in;
    uint64_t out_bytes;
    uint64_t in_bytes;
    struct iovec iov[VU_MAX_CHAIN_IOV];
};

/*
 * Inflight I/O tracking, split ring layout of vhost-user.rst "Inflight I/O
 * tracking": one region per queue in a memfd the front end keeps across our
 * restarts. Written only by the worker serving the queue (see ring.c for the
 * store order that keeps it trustworthy after a crash between any two stores).
 */
struct vu_inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct vu_inflight_split {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct vu_inflight_desc desc[];
};

#define VU_INFLIGHT_VERSION 1

/*
 * Dirty-page log for live migration (vhost-user.rst "Migration"): a bitmap the front end
 * shares (SET_LOG_BASE), one bit per VU_LOG_PAGE of guest-physical memory, bit p%8 of byte
 * p/8 for page p. The front end clears bits with atomic exchanges while we set them, so
 * every update is an atomic OR. Shared by the queues of one session; each queue gathers
 * its bits in a small cache (struct vu_log_cache) and ORs them in once per burst.
 */
#define VU_LOG_PAGE 4096
#define VU_LOG_CACHE 32         /* distinct 64-page words a queue gathers before a flush */
#define VHOST_VRING_F_LOG 1     /* SET_VRING_ADDR flag: log writes to the used ring */

struct vu_log {
    uint8_t *base;  /* the bitmap */
    uint64_t size;  /* bytes: covers guest-physical [0, size * 8 * VU_LOG_PAGE) */
    int call_fd;    /* SET_LOG_FD's eventfd, written after a flush that set bits; -1: none */
};

struct vu_log_cache {
    uint32_t n;
    uint64_t word[VU_LOG_CACHE]; /* 64-page word index in the bitmap */
    uint64_t bits[VU_LOG_CACHE];
};

/*
 * A queue's counters. Each is written by the one thread serving the queue and read by
 * anyone (the metrics scrape, log lines) without a lock: plain aligned 64-bit stores
 * and loads, which x86-64 never tears; a reader may see a value one batch old.
 * vu_vq_setup keeps them: they count over the life of the struct (one connection's
 * queue; vhost/virtqueue.py's QueueCounterBook adds connections up). Only chains goes
 * back, by the chains vu_vq_discard gives back (net takes rx chains for the largest
 * frame and returns those a frame did not need): a scrape counts pushed, which never
 * does.
 */
#define VU_BATCH_BUCKETS 12     /* chains per batch: <= 1, <= 2, <= 4, ... <= 1024, more */
#define VU_ERROR_SLOTS 64       /* errors counted by code: slot -code, codes -1 .. -63 */

struct vu_stats {
    uint64_t chains;     /* chains taken from the avail ring */
    uint64_t bad_chains; /* chains rejected by validation */
    uint64_t kicks;      /* wake-ups by the kick eventfd */
    uint64_t signals;    /* writes to the call eventfd */
    uint64_t batches;    /* passes over the avail ring that found work */
    uint64_t log_words;  /* 64-page words of the dirty log updated (one per word per burst) */
    uint64_t log_beyond; /* writes to pages past the end of the dirty log (not logged) */
    uint64_t resubmitted; /* chains run again from the inflight region (after a restart) */
    uint64_t pushed;     /* used entries written: chains given back, done or refused */
    uint64_t batch_chains; /* chains in all the batches counted in batch_hist */
    uint64_t batch_hist[VU_BATCH_BUCKETS]; /* batches by chains: bucket b holds 2^(b-1) < n <= 2^b */
    uint64_t errors[VU_ERROR_SLOTS];       /* vu_vq_record_error calls by -code (0: other) */
};

struct vu_vq {
    const struct vu_mem *mem;
    uint32_t num;
    int event_idx;
    int indirect;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t last_avail_idx;
    uint16_t used_idx;          /* our shadow of used->idx */
    uint16_t signalled_used;    /* used idx at the last call */
    int signalled_used_valid;
    int broken;                 /* ring state unusable until the queue is set up again */
    int kick_fd;
    int call_fd;                /* -1: never signal */
    int err_fd;                 /* -1: none */
    int stop_fd;                /* eventfd written by vu_vq_request_stop */
    int stop;                   /* read and written atomically */
    struct vu_error err;
    struct vu_stats stats;
    struct vu_chain chain;      /* scratch for the chain being handled */
    /* inflight tracking (NULL: off) */
    struct vu_inflight_split *inflight;
    uint64_t inflight_counter;  /* next counter value to hand out */
    uint32_t batch_n;           /* heads pushed since the last flush */
    uint32_t resubmit_n;        /* heads to run again before new ones ... */
    uint32_t resubmit_pos;      /* ... and how many of them are done */
    uint16_t batch[VU_MAX_QUEUE_SIZE];
    uint16_t resubmit[VU_MAX_QUEUE_SIZE];
    /* dirty logging (NULL: off): everything the device writes into guest memory is
     * marked by vu_vq_push and vu_vq_flush_used (see ring.c) */
    const struct vu_log *log;
    uint64_t log_used_gpa;      /* guest-physical address of the used ring ... */
    int log_used;               /* ... and whether its writes are logged (VHOST_VRING_F_LOG) */
    struct vu_log_cache log_cache;
};

/* One validated chain handed to Python by vu_vq_pop_batch: its iovecs are
 * iov[iov_start .. iov_start + n_out + n_in) of the batch, readable ones first. */
struct vu_chain_ref {
    uint32_t head;
    uint16_t slot;       /* last_avail_idx when it was taken (for vu_vq_discard checks) */
    uint32_t iov_start;
    uint32_t n_out;
    uint32_t n_in;
    uint64_t out_bytes;
    uint64_t in_bytes;
};

/* Returns the used length for the chain (bytes the device wrote). A device finishes
 * every write into a chain before the chain is pushed (vu_vq_push): the push marks its
 * pages in the dirty log, and a mark may reach the log before the burst ends. */
typedef uint32_t (*vu_chain_handler)(void *ctx, struct vu_vq *vq, struct vu_chain *chain);

/* memory.c */
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

/* ring.c */
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
void vu_vq_request_kick_at(struct vu_vq *vq, uint16_t idx);
void vu_vq_ring_state(struct vu_vq *vq, uint16_t *out);
int vu_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx);
int vu_vq_process(struct vu_vq *vq, vu_chain_handler handler, void *ctx);
int vu_vq_run(struct vu_vq *vq, vu_chain_handler handler, void *ctx);
void vu_vq_request_stop(struct vu_vq *vq);
void vu_vq_record_error(struct vu_vq *vq, int code, uint32_t head, uint64_t detail);
void vu_vq_discard_inflight(struct vu_vq *vq, uint32_t n);
void vu_log_write(struct vu_vq *vq, uint64_t gpa, uint64_t len);
void vu_log_flush(struct vu_vq *vq);

/*
 * One batch of n > 0 chains handled (a pass that found work, one publication of used
 * entries): counted in batches and in its power-of-two bucket. Inline: once per batch.
 */
static inline void vu_vq_count_batch(struct vu_vq *vq, uint32_t n)
{
    uint32_t b = n <= 1 ? 0 : 32 - (uint32_t)__builtin_clz(n - 1); /* ceil(log2(n)) */
    if (b >= VU_BATCH_BUCKETS)
        b = VU_BATCH_BUCKETS - 1;
    vq->stats.batches++;
    vq->stats.batch_chains += n;
    vq->stats.batch_hist[b]++;
}

/*
 * Give back the last n chains taken, as if they had not been (Linux's
 * vhost_discard_vq_desc, libvhost-user's vu_queue_rewind): the driver's buffers stay
 * where they are and the next pop takes them again. The caller guarantees that those
 * n chains are still outstanding (none was pushed), so their slots may be read again.
 * Inline: net gives back the chains a frame did not need once per frame, mostly none.
 */
static inline void vu_vq_discard(struct vu_vq *vq, uint32_t n)
{
    if (n == 0)
        return;
    if (vq->inflight) {
        vu_vq_discard_inflight(vq, n);
        return;
    }
    vq->last_avail_idx = (uint16_t)(vq->last_avail_idx - n);
    vq->stats.chains -= n;
}
int vu_vq_pop_batch(struct vu_vq *vq, struct vu_chain_ref *out, uint32_t max_chains,
                    struct iovec *iov, uint32_t max_iov);
int vu_vq_push_batch(struct vu_vq *vq, const uint32_t *heads, const uint32_t *lens, uint32_t n);
int vu_vq_wait(struct vu_vq *vq, int timeout_ms);

/* errors.c */
const struct vu_error_info *vu_error_table(uint32_t *n);

/* helpers for devices */
size_t vu_iov_copy_from(const struct iovec *iov, uint32_t niov, size_t skip, void *dst, size_t len);
size_t vu_iov_copy_to(const struct iovec *iov, uint32_t niov, size_t skip, const void *src, size_t len);

/* vu_vq_run return values */
#define VU_RUN_STOPPED 0   /* stop requested */
#define VU_RUN_ERRORS 1    /* errors recorded; call again after logging */
#define VU_RUN_BROKEN 2    /* ring unusable; the queue stays stopped */
#define VU_RUN_FD_ERROR 3  /* poll/read on the kick fd failed (VU_ERR_KICK_*) */

/* vu_vq_wait return values (or a negative error code) */
#define VU_WAIT_IDLE 0     /* timed out */
#define VU_WAIT_WORK 1     /* chains are available (or a kick came) */
#define VU_WAIT_STOP 2     /* stop requested */

#endif
