/*
 * vu.h - the C data path of the vhost-user back end: guest memory map, split
 * virtqueue walk with full validation, used ring and event-idx signalling.
 *
 * Boundary: nothing here parses vhost-user messages or knows a device. Python
 * (vhost/memory.py, vhost/virtqueue.py) owns these structs and fills them from
 * the session; devices (blk.c, ...) plug a per-chain handler into vu_vq_run().
 * Everything the guest wrote is treated as hostile: each descriptor is copied
 * once, then checked before use.
 */
#ifndef VU_H
#define VU_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* Named bounds: each guest- or front-end-controlled quantity has one here. */
#define VU_MAX_REGIONS 32       /* memory slots advertised (GET_MAX_MEM_SLOTS) */
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

/* Error codes: negative, stable, mapped to exceptions/log text in Python. */
enum vu_error_code {
    VU_OK = 0,
    VU_ERR_AVAIL_IDX = -1,        /* avail->idx moved further than the queue size */
    VU_ERR_HEAD = -2,             /* head index >= queue size */
    VU_ERR_NEXT = -3,             /* next index outside its descriptor table */
    VU_ERR_ADDR = -4,             /* buffer not inside guest memory */
    VU_ERR_LOOP = -5,             /* a descriptor was visited twice */
    VU_ERR_CHAIN_TOO_LONG = -6,   /* more descriptors than the queue size */
    VU_ERR_INDIRECT_NESTED = -7,  /* indirect descriptor inside an indirect table */
    VU_ERR_INDIRECT_LEN = -8,     /* indirect table length 0 or not a multiple of 16 */
    VU_ERR_INDIRECT_ADDR = -9,    /* indirect table not inside one guest region */
    VU_ERR_DIRECTION = -10,       /* device-readable descriptor after a writable one */
    VU_ERR_TOO_MANY_IOV = -11,    /* chain needs more than VU_MAX_CHAIN_IOV iovecs */
    VU_ERR_INDIRECT_NEXT = -12,   /* INDIRECT and NEXT both set */
    VU_ERR_INDIRECT_FEATURE = -13,/* INDIRECT used but not negotiated */
    VU_ERR_RING_ADDR = -14,       /* ring address not mapped / misaligned */
    VU_ERR_QUEUE_SIZE = -15,      /* queue size 0, > max, or not a power of 2 */
    VU_ERR_REGION_OVERLAP = -16,
    VU_ERR_REGION_FULL = -17,
    VU_ERR_REGION_BAD = -18,      /* zero size or wrapping range */
    VU_ERR_REGION_NOT_FOUND = -19,
    VU_ERR_MMAP = -20,            /* mmap failed; errno in detail */
    VU_ERR_REGION_FILE = -22,     /* region runs past the end of its file */
    VU_ERR_INFLIGHT = -21,        /* inflight region unusable (size, version, desc_num, batch) */
    /* device-level request errors (the request fails, the queue goes on) */
    VU_ERR_DEV_NO_STATUS = -30,   /* no device-writable byte for the status */
    VU_ERR_DEV_HEADER = -31,      /* request header short or misplaced */
    VU_ERR_DEV_LAYOUT = -32,      /* buffers in the wrong direction or size */
    VU_ERR_DEV_RANGE = -33,       /* sector range beyond capacity / misaligned */
    VU_ERR_DEV_IO = -34,          /* host I/O failed; errno in detail */
    VU_ERR_DEV_UNSUPPORTED = -35, /* unknown request type */
    VU_ERR_DEV_READ_ONLY = -36,
    VU_ERR_DEV_SEGMENTS = -37,    /* discard/write-zeroes segment count or flags */
    VU_ERR_DEV_TOO_BIG = -38,     /* read/write longer than seg_max x size_max */
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

struct vu_mem {
    uint32_t nregions;
    struct vu_region regions[VU_MAX_REGIONS];
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

struct vu_stats {
    uint64_t chains;     /* chains taken from the avail ring */
    uint64_t bad_chains; /* chains rejected by validation */
    uint64_t kicks;      /* wake-ups by the kick eventfd */
    uint64_t signals;    /* writes to the call eventfd */
    uint64_t batches;    /* passes over the avail ring that found work */
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
};

/* Returns the used length for the chain (bytes the device wrote). */
typedef uint32_t (*vu_chain_handler)(void *ctx, struct vu_vq *vq, struct vu_chain *chain);

/* memory.c */
int vu_mem_add(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva,
               uint64_t mmap_offset, int fd);
int vu_mem_remove(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva);
void vu_mem_clear(struct vu_mem *mem);
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

/* helpers for devices */
size_t vu_iov_copy_from(const struct iovec *iov, uint32_t niov, size_t skip, void *dst, size_t len);
size_t vu_iov_copy_to(const struct iovec *iov, uint32_t niov, size_t skip, const void *src, size_t len);

/* vu_vq_run return values */
#define VU_RUN_STOPPED 0   /* stop requested */
#define VU_RUN_ERRORS 1    /* errors recorded; call again after logging */
#define VU_RUN_BROKEN 2    /* ring unusable; the queue stays stopped */
#define VU_RUN_FD_ERROR 3  /* poll/read on the kick fd failed; errno in err.detail */

#endif
