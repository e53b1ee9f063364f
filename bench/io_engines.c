/*
 * io_engines.c - the blk data path's two candidate I/O engines, measured on the
 * request pattern the daemon sees: batches of QD random 4 KiB reads from an
 * image into separate buffers.
 *
 *   sync:    one preadv per request, in the queue's worker thread (what
 *            c_ext/blk.c does);
 *   uring:   the whole batch as QD READV SQEs, one io_uring_enter that submits
 *            and waits for all completions.
 *
 * Prints "engine qd ns_per_read cpu_ns_per_read" lines. Built and run by
 * bench/test_io_engines.py; needs liburing (Debian: liburing-dev).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

static double now_ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static unsigned long long rng = 88172645463325252ull;
static unsigned long long next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s IMAGE QD TOTAL\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    struct stat st;
    fstat(fd, &st);
    unsigned long long blocks = (unsigned long long)st.st_size / BLOCK;
    int qd = atoi(argv[2]);
    long total = atol(argv[3]);
    struct iovec *iov = calloc((size_t)qd, sizeof(*iov));
    for (int i = 0; i < qd; i++) {
        iov[i].iov_base = aligned_alloc(BLOCK, BLOCK);
        iov[i].iov_len = BLOCK;
    }

    /* sync */
    double t0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    for (long done = 0; done < total; done += qd)
        for (int i = 0; i < qd; i++)
            if (preadv(fd, &iov[i], 1, (off_t)(next_rand() % blocks) * BLOCK) != BLOCK)
                return 1;
    double t1 = now_ns(CLOCK_MONOTONIC), c1 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    printf("sync %d %.0f %.0f\n", qd, (t1 - t0) / total, (c1 - c0) / total);

    /* uring */
    struct io_uring ring;
    if (io_uring_queue_init((unsigned)qd, &ring, 0) < 0) {
        printf("uring %d unavailable unavailable\n", qd);
        return 0;
    }
    t0 = now_ns(CLOCK_MONOTONIC);
    c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    for (long done = 0; done < total; done += qd) {
        for (int i = 0; i < qd; i++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            io_uring_prep_readv(sqe, fd, &iov[i], 1, (next_rand() % blocks) * BLOCK);
        }
        io_uring_submit_and_wait(&ring, (unsigned)qd);
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            if (cqe->res != BLOCK)
                return 1;
            n++;
        }
        io_uring_cq_advance(&ring, n);
    }
    t1 = now_ns(CLOCK_MONOTONIC);
    c1 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    printf("uring %d %.0f %.0f\n", qd, (t1 - t0) / total, (c1 - c0) / total);
    io_uring_queue_exit(&ring);
    return 0;
}
