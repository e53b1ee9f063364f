/*
 * blk.c - virtio-blk requests: header, data, status (virtio 1.x, 5.2.6).
 *
 * The chain is already validated and translated by ring.c. The layout is not
 * assumed to follow descriptor boundaries: the 16-byte header is gathered from
 * the readable bytes and the status is the last writable byte. Every request
 * that has a status byte gets an answer: OK, IOERR (bad layout, range, host
 * error, read-only) or UNSUPP (unknown type). Data moves with preadv/pwritev
 * straight between the image and guest memory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include "blk.h"

struct blk_req_header {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

struct blk_discard_segment {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

#define BLK_WZ_FLAG_UNMAP 1u

/* Drop the first `skip` bytes of an iovec array in place. */
static struct iovec *iov_advance(struct iovec *iov, uint32_t *niov, uint64_t skip)
{
    while (*niov > 0 && skip > 0) {
        if (skip >= iov->iov_len) {
            skip -= iov->iov_len;
            iov++;
            (*niov)--;
        } else {
            iov->iov_base = (uint8_t *)iov->iov_base + skip;
            iov->iov_len -= skip;
            skip = 0;
        }
    }
    return iov;
}

/* preadv/pwritev until every byte moved; chunks of IOV_MAX, short I/O resumed. */
static int rw_full(int fd, struct iovec *iov, uint32_t niov, uint64_t off, int writing)
{
    while (niov > 0) {
        if (iov->iov_len == 0) {
            iov++;
            niov--;
            continue;
        }
        int cnt = niov > IOV_MAX ? IOV_MAX : (int)niov;
        ssize_t r = writing ? pwritev(fd, iov, cnt, (off_t)off) : preadv(fd, iov, cnt, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO; /* the image is shorter than its capacity */
        off += (uint64_t)r;
        iov = iov_advance(iov, &niov, (uint64_t)r);
    }
    return 0;
}

static int range_ok(const struct blk_dev *dev, uint64_t sector, uint64_t nsectors)
{
    return sector <= dev->capacity && nsectors <= dev->capacity - sector;
}

static uint8_t fail(struct vu_vq *vq, struct blk_queue *q, int code, uint64_t detail)
{
    vu_vq_record_error(vq, code, vq->chain.head, detail);
    q->stats.ioerr++;
    return VIRTIO_BLK_S_IOERR;
}

static uint8_t do_rw(struct vu_vq *vq, struct blk_queue *q, const struct blk_req_header *h,
                     struct iovec *iov, uint32_t niov, uint64_t len, int writing)
{
    const struct blk_dev *dev = q->dev;
    if (writing && dev->read_only)
        return fail(vq, q, BLK_ERR_READ_ONLY, h->sector);
    if (len % BLK_SECTOR_SIZE || !range_ok(dev, h->sector, len / BLK_SECTOR_SIZE))
        return fail(vq, q, BLK_ERR_RANGE, h->sector);
    if (len > dev->max_request_bytes) /* bounds the time one request holds the queue */
        return fail(vq, q, BLK_ERR_TOO_BIG, len);
    int r = rw_full(dev->fd, iov, niov, h->sector * BLK_SECTOR_SIZE, writing);
    if (r < 0)
        return fail(vq, q, BLK_ERR_IO, (uint64_t)-r);
    if (writing) {
        q->stats.writes++;
        q->stats.bytes_written += len;
    } else {
        q->stats.reads++;
        q->stats.bytes_read += len;
    }
    return VIRTIO_BLK_S_OK;
}

static int write_zeros_slow(int fd, uint64_t off, uint64_t len)
{
    static const uint8_t zeros[65536];
    while (len > 0) {
        size_t n = len > sizeof(zeros) ? sizeof(zeros) : (size_t)len;
        ssize_t r = pwrite(fd, zeros, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        off += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return 0;
}

static int discard_range(const struct blk_dev *dev, uint64_t off, uint64_t len)
{
    if (dev->is_blockdev) {
        uint64_t range[2] = {off, len};
        if (ioctl(dev->fd, BLKDISCARD, range) == 0)
            return 0;
    } else if (fallocate(dev->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                         (off_t)off, (off_t)len) == 0) {
        return 0;
    }
    /* Discard is a hint: where the host cannot deallocate, doing nothing is correct. */
    if (errno == EOPNOTSUPP || errno == ENOTTY || errno == EINVAL)
        return 0;
    return -errno;
}

static int zero_range(const struct blk_dev *dev, uint64_t off, uint64_t len, int may_unmap)
{
    if (dev->is_blockdev) {
        uint64_t range[2] = {off, len};
        if (ioctl(dev->fd, BLKZEROOUT, range) == 0)
            return 0;
        return write_zeros_slow(dev->fd, off, len);
    }
    if (fallocate(dev->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    if (may_unmap && fallocate(dev->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               (off_t)off, (off_t)len) == 0)
        return 0;
    return write_zeros_slow(dev->fd, off, len);
}

static uint8_t do_ranges(struct vu_vq *vq, struct blk_queue *q, struct iovec *iov, uint32_t niov,
                         uint64_t len, int zeroes)
{
    const struct blk_dev *dev = q->dev;
    uint32_t max_seg = zeroes ? dev->max_write_zeroes_seg : dev->max_discard_seg;
    uint32_t max_sectors = zeroes ? dev->max_write_zeroes_sectors : dev->max_discard_sectors;
    uint64_t nseg = len / sizeof(struct blk_discard_segment);

    if (dev->read_only)
        return fail(vq, q, BLK_ERR_READ_ONLY, 0);
    if (len % sizeof(struct blk_discard_segment) || nseg == 0 || nseg > max_seg)
        return fail(vq, q, BLK_ERR_SEGMENTS, nseg);
    for (uint64_t i = 0; i < nseg; i++) {
        struct blk_discard_segment s;
        vu_iov_copy_from(iov, niov, i * sizeof(s), &s, sizeof(s));
        uint32_t allowed = zeroes ? BLK_WZ_FLAG_UNMAP : 0;
        if (s.flags & ~allowed) {
            q->stats.unsupp++;
            vu_vq_record_error(vq, BLK_ERR_SEGMENTS, vq->chain.head, s.flags);
            return VIRTIO_BLK_S_UNSUPP;
        }
        if (s.num_sectors > max_sectors || !range_ok(dev, s.sector, s.num_sectors))
            return fail(vq, q, BLK_ERR_RANGE, s.sector);
        uint64_t off = s.sector * BLK_SECTOR_SIZE;
        uint64_t n = (uint64_t)s.num_sectors * BLK_SECTOR_SIZE;
        int r = zeroes ? zero_range(dev, off, n, s.flags & BLK_WZ_FLAG_UNMAP)
                       : discard_range(dev, off, n);
        if (r < 0)
            return fail(vq, q, BLK_ERR_IO, (uint64_t)-r);
    }
    if (zeroes)
        q->stats.write_zeroes++;
    else
        q->stats.discards++;
    return VIRTIO_BLK_S_OK;
}

static uint32_t blk_handle_chain(void *ctx, struct vu_vq *vq, struct vu_chain *c)
{
    struct blk_queue *q = ctx;
    if (c->n_in == 0) {
        /* Nowhere to put a status: the request can only be returned unanswered. */
        vu_vq_record_error(vq, BLK_ERR_NO_STATUS, c->head, 0);
        q->stats.ioerr++;
        return 0;
    }

    /* The status is the last writable byte; the writable data is what precedes it. */
    struct iovec *last = &c->iov[c->n_out + c->n_in - 1];
    uint8_t *status = (uint8_t *)last->iov_base + last->iov_len - 1;
    uint32_t n_in = c->n_in;
    last->iov_len--;
    if (last->iov_len == 0)
        n_in--;
    uint64_t in_len = c->in_bytes - 1;
    struct iovec *in_iov = &c->iov[c->n_out];

    struct blk_req_header h;
    if (c->out_bytes < sizeof(h)) {
        *status = fail(vq, q, BLK_ERR_HEADER, c->out_bytes);
        return 1;
    }
    vu_iov_copy_from(c->iov, c->n_out, 0, &h, sizeof(h));
    uint32_t n_out = c->n_out;
    struct iovec *out_iov = iov_advance(c->iov, &n_out, sizeof(h));
    uint64_t out_len = c->out_bytes - sizeof(h);

    uint8_t st;
    uint32_t written = 0;
    switch (h.type) {
    case VIRTIO_BLK_T_IN:
        if (out_len != 0) {
            st = fail(vq, q, BLK_ERR_LAYOUT, out_len);
            break;
        }
        st = do_rw(vq, q, &h, in_iov, n_in, in_len, 0);
        if (st == VIRTIO_BLK_S_OK)
            written = (uint32_t)in_len;
        break;
    case VIRTIO_BLK_T_OUT:
        st = in_len ? fail(vq, q, BLK_ERR_LAYOUT, in_len)
                    : do_rw(vq, q, &h, out_iov, n_out, out_len, 1);
        break;
    case VIRTIO_BLK_T_FLUSH:
        if (fdatasync(q->dev->fd) < 0) {
            st = fail(vq, q, BLK_ERR_IO, (uint64_t)errno);
        } else {
            q->stats.flushes++;
            st = VIRTIO_BLK_S_OK;
        }
        break;
    case VIRTIO_BLK_T_GET_ID: {
        size_t n = in_len < VIRTIO_BLK_ID_BYTES ? (size_t)in_len : VIRTIO_BLK_ID_BYTES;
        written = (uint32_t)vu_iov_copy_to(in_iov, n_in, 0, q->dev->serial, n);
        q->stats.get_ids++;
        st = VIRTIO_BLK_S_OK;
        break;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        st = in_len ? fail(vq, q, BLK_ERR_LAYOUT, in_len)
                    : do_ranges(vq, q, out_iov, n_out, out_len, h.type == VIRTIO_BLK_T_WRITE_ZEROES);
        break;
    default:
        q->stats.unsupp++;
        vu_vq_record_error(vq, BLK_ERR_UNSUPPORTED, c->head, h.type);
        st = VIRTIO_BLK_S_UNSUPP;
        break;
    }
    *status = st;
    return written + 1;
}

int blk_run_queue(struct vu_vq *vq, struct blk_queue *q)
{
    return vu_vq_run(vq, blk_handle_chain, q);
}

static const struct vu_error_info blk_errors[] = {BLK_ERRORS(VU_ERROR_INFO)};

const struct vu_error_info *blk_error_table(uint32_t *n)
{
    *n = sizeof(blk_errors) / sizeof(blk_errors[0]);
    return blk_errors;
}
