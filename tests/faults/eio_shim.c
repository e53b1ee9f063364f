/*
 * eio_shim.c - an LD_PRELOAD fault injector for one file, for tests.
 *
 * It interposes the positioned I/O calls (pread/pwrite, preadv/pwritev, their *64 and
 * *v2 variants) and fdatasync/fsync. A call on a file descriptor that refers to the file
 * named by EIO_SHIM_PATH (same device and inode; fstat per call, so fd reuse and a file
 * created after start-up are both handled) can be made to fail or to come up short;
 * every other call goes straight to libc. Extension modules (cffi, API mode) call libc
 * through the dynamic linker like everything else, so they see these definitions first.
 *
 * Environment (read once, at the first intercepted call):
 *   EIO_SHIM_PATH    the file; unset or empty: the shim does nothing
 *   EIO_SHIM_START   first byte of the bad range (decimal or 0x hex)
 *   EIO_SHIM_LEN     its length in bytes; 0 (default): no bad range
 *   EIO_SHIM_OPS     which I/O the bad range fails: "rw" (default), "r" or "w"
 *   EIO_SHIM_ERRNO   the errno a failed call sets (default EIO)
 *   EIO_SHIM_SHORT   if > 0: every read or write of the file moves at most this many
 *                    bytes (short transfers, as a signal or a full disk can cause)
 *   EIO_SHIM_SYNC    if "1": fdatasync/fsync of the file fail with EIO_SHIM_ERRNO
 *
 * A call whose range [offset, offset + total length) overlaps the bad range fails as a
 * whole, with nothing transferred: what the kernel does for a bad sector.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define SHIM_MAX_IOV 1024

enum { OP_READ = 1, OP_WRITE = 2 };

static pthread_once_t cfg_once = PTHREAD_ONCE_INIT;
static struct {
    const char *path;
    uint64_t start, len;
    int ops;
    int err;
    uint64_t short_max;
    int fail_sync;
} cfg;

static uint64_t env_u64(const char *name, uint64_t dflt)
{
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 0) : dflt;
}

static void read_config(void)
{
    const char *path = getenv("EIO_SHIM_PATH");
    cfg.path = path && *path ? path : NULL;
    cfg.start = env_u64("EIO_SHIM_START", 0);
    cfg.len = env_u64("EIO_SHIM_LEN", 0);
    const char *ops = getenv("EIO_SHIM_OPS");
    if (!ops || !*ops)
        ops = "rw";
    cfg.ops = (strchr(ops, 'r') ? OP_READ : 0) | (strchr(ops, 'w') ? OP_WRITE : 0);
    cfg.err = (int)env_u64("EIO_SHIM_ERRNO", EIO);
    cfg.short_max = env_u64("EIO_SHIM_SHORT", 0);
    const char *sync = getenv("EIO_SHIM_SYNC");
    cfg.fail_sync = sync && strcmp(sync, "1") == 0;
}

static void load_config(void)
{
    pthread_once(&cfg_once, read_config);
}

/* Is fd the configured file? Compared by device and inode on every call. */
static int is_target(int fd)
{
    load_config();
    if (!cfg.path)
        return 0;
    struct stat want, got;
    int saved = errno;
    int match = stat(cfg.path, &want) == 0 && fstat(fd, &got) == 0 &&
                want.st_dev == got.st_dev && want.st_ino == got.st_ino;
    errno = saved;
    return match;
}

static int hits_bad_range(int op, uint64_t off, uint64_t n)
{
    return (cfg.ops & op) && cfg.len > 0 && n > 0 && off < cfg.start + cfg.len &&
           off + n > cfg.start;
}

static uint64_t iov_total(const struct iovec *iov, int cnt)
{
    uint64_t t = 0;
    for (int i = 0; i < cnt; i++)
        t += iov[i].iov_len;
    return t;
}

/* The first `max` bytes of iov, in `out`; returns the new count. */
static int iov_clip(const struct iovec *iov, int cnt, uint64_t max, struct iovec *out)
{
    int n = 0;
    for (int i = 0; i < cnt && max > 0 && n < SHIM_MAX_IOV; i++) {
        out[n] = iov[i];
        if (out[n].iov_len > max)
            out[n].iov_len = max;
        max -= out[n].iov_len;
        n++;
    }
    return n;
}

static off_t offset_of(int fd, off_t off)
{
    return off == -1 ? lseek(fd, 0, SEEK_CUR) : off;
}

/* libc's own definition, looked up once (threads racing store the same pointer). */
#define REAL(name, type)                                                       \
    static type cached_##name;                                                 \
    type real_##name = __atomic_load_n(&cached_##name, __ATOMIC_ACQUIRE);      \
    if (!real_##name) {                                                        \
        real_##name = (type)dlsym(RTLD_NEXT, #name);                           \
        __atomic_store_n(&cached_##name, real_##name, __ATOMIC_RELEASE);       \
    }

typedef ssize_t (*prw_fn)(int, void *, size_t, off_t);
typedef ssize_t (*pwr_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*prwv_fn)(int, const struct iovec *, int, off_t);
typedef ssize_t (*prwv2_fn)(int, const struct iovec *, int, off_t, int);
typedef int (*sync_fn)(int);

/* One check for every flavour: -1 (errno set) to fail, else how many bytes to allow. */
static int64_t check(int fd, int op, off_t off, uint64_t n)
{
    if (!is_target(fd))
        return (int64_t)n;
    if (hits_bad_range(op, (uint64_t)offset_of(fd, off), n)) {
        errno = cfg.err;
        return -1;
    }
    if (cfg.short_max > 0 && n > cfg.short_max)
        return (int64_t)cfg.short_max;
    return (int64_t)n;
}

#define SCALAR(name, fn_t, buf_t, op)                                          \
    ssize_t name(int fd, buf_t buf, size_t n, off_t off)                       \
    {                                                                          \
        REAL(name, fn_t)                                                       \
        int64_t allow = check(fd, op, off, n);                                 \
        if (allow < 0)                                                         \
            return -1;                                                         \
        return real_##name(fd, buf, (size_t)allow, off);                       \
    }

SCALAR(pread, prw_fn, void *, OP_READ)
SCALAR(pread64, prw_fn, void *, OP_READ)
SCALAR(pwrite, pwr_fn, const void *, OP_WRITE)
SCALAR(pwrite64, pwr_fn, const void *, OP_WRITE)

#define VECTOR(name, op)                                                       \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_t off)          \
    {                                                                          \
        REAL(name, prwv_fn)                                                    \
        uint64_t total = cnt > 0 ? iov_total(iov, cnt) : 0;                    \
        int64_t allow = check(fd, op, off, total);                             \
        if (allow < 0)                                                         \
            return -1;                                                         \
        if ((uint64_t)allow < total) {                                         \
            struct iovec clipped[SHIM_MAX_IOV];                                \
            int k = iov_clip(iov, cnt, (uint64_t)allow, clipped);              \
            return real_##name(fd, clipped, k, off);                           \
        }                                                                      \
        return real_##name(fd, iov, cnt, off);                                 \
    }

VECTOR(preadv, OP_READ)
VECTOR(preadv64, OP_READ)
VECTOR(pwritev, OP_WRITE)
VECTOR(pwritev64, OP_WRITE)

#define VECTOR2(name, op)                                                      \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_t off, int fl)  \
    {                                                                          \
        REAL(name, prwv2_fn)                                                   \
        uint64_t total = cnt > 0 ? iov_total(iov, cnt) : 0;                    \
        int64_t allow = check(fd, op, off, total);                             \
        if (allow < 0)                                                         \
            return -1;                                                         \
        if ((uint64_t)allow < total) {                                         \
            struct iovec clipped[SHIM_MAX_IOV];                                \
            int k = iov_clip(iov, cnt, (uint64_t)allow, clipped);              \
            return real_##name(fd, clipped, k, off, fl);                       \
        }                                                                      \
        return real_##name(fd, iov, cnt, off, fl);                             \
    }

VECTOR2(preadv2, OP_READ)
VECTOR2(preadv64v2, OP_READ)
VECTOR2(pwritev2, OP_WRITE)
VECTOR2(pwritev64v2, OP_WRITE)

#define SYNC(name)                                                             \
    int name(int fd)                                                           \
    {                                                                          \
        REAL(name, sync_fn)                                                    \
        if (is_target(fd) && cfg.fail_sync) {                                  \
            errno = cfg.err;                                                   \
            return -1;                                                         \
        }                                                                      \
        return real_##name(fd);                                                \
    }

SYNC(fdatasync)
SYNC(fsync)
