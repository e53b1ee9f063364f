/*
 * blk.h - virtio-blk request handling on top of the ring walker. One worker
 * thread per queue calls blk_run_queue(); the image I/O (preadv/pwritev into
 * guest memory, fdatasync, fallocate) happens there, never on the event loop.
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
int blk_process_queue(struct vu_vq *vq, struct blk_queue *q);

#endif
