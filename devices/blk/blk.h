/*
 * blk.h - virtio-blk request handling on top of the core's ring walker (c_ext/vu.h).
 * One worker thread per queue calls blk_run_queue(); the image I/O (preadv/pwritev
 * into guest memory, fdatasync, fallocate) happens there, never on the event loop.
 */
#ifndef VU_BLK_H
#define VU_BLK_H

#include <stdint.h>

#include "vu.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_ID_BYTES 20

/* Request errors (the request fails, the queue goes on): rows as in vu.h. */
#define BLK_ERRORS(X) \
    X(BLK_ERR_NO_STATUS, -30, VALUE, "request has no device-writable status byte") \
    X(BLK_ERR_HEADER, -31, VALUE, "request header shorter than 16 bytes") \
    X(BLK_ERR_LAYOUT, -32, VALUE, "request buffers in the wrong direction or size") \
    X(BLK_ERR_RANGE, -33, VALUE, "sector range beyond capacity or not sector aligned") \
    X(BLK_ERR_IO, -34, ERRNO, "host I/O error") \
    X(BLK_ERR_UNSUPPORTED, -35, VALUE, "unsupported request type") \
    X(BLK_ERR_READ_ONLY, -36, VALUE, "write to a read-only device") \
    X(BLK_ERR_SEGMENTS, -37, VALUE, "bad discard/write-zeroes segments") \
    X(BLK_ERR_TOO_BIG, -38, VALUE, "read/write longer than seg_max x size_max")

enum blk_error_code { BLK_ERRORS(VU_ERROR_ENUM) };
#define BLK_SECTOR_SIZE 512

struct blk_dev {
    int fd;
    int read_only;
    int is_blockdev;
    uint64_t capacity; /* in 512-byte sectors */
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    uint64_t max_request_bytes; /* data bytes per read/write (seg_max x size_max) */
    uint8_t serial[VIRTIO_BLK_ID_BYTES];
};

struct blk_stats {
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;
    uint64_t discards;
    uint64_t write_zeroes;
    uint64_t get_ids;
    uint64_t ioerr;
    uint64_t unsupp;
    uint64_t bytes_read;
    uint64_t bytes_written;
};

/* Per-queue context: the shared device plus this queue's counters. */
struct blk_queue {
    const struct blk_dev *dev;
    struct blk_stats stats;
};

int blk_run_queue(struct vu_vq *vq, struct blk_queue *q);
const struct vu_error_info *blk_error_table(uint32_t *n);

#endif
