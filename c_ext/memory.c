/*
 * memory.c - guest memory regions: mmap of the front end's fds and bounds-checked
 * translation of guest-physical (descriptor) and front-end-virtual (ring)
 * addresses to our own. A range is only returned when every byte of it lies in
 * mapped guest memory; arithmetic is done so that no sum can wrap.
 *
 * The map is kept sorted (regions[] by gpa, by_uva[] by uva; see struct vu_mem), so a
 * translation is a binary search: with all VU_MAX_REGIONS slots used (one per
 * hot-plugged DIMM) a linear scan per descriptor would cost more than the walk itself.
 * Since no two regions overlap, the only region that can hold an address is the last
 * one starting at or below it, and a new region can only collide with its neighbours
 * in either order: the overlap check is two comparisons per address space.
 * Changes (add, remove, retire, clear) are O(n) memmoves, on the control plane only.
 */
#include <errno.h>
#include <linux/magic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>

#include "vu.h"

static int range_ok(uint64_t start, uint64_t size)
{
    return size != 0 && start + size - 1 >= start;
}

/* [a, a+alen) and [b, b+blen) overlap; both ranges already known not to wrap. */
static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a <= b + (blen - 1) && b <= a + (alen - 1);
}

static const struct vu_region *uva_at(const struct vu_mem *mem, uint32_t k)
{
    return &mem->regions[mem->by_uva[k]];
}

/* How many regions start at or below addr in guest-physical order. */
static uint32_t gpa_rank(const struct vu_mem *mem, uint64_t addr)
{
    uint32_t lo = 0, hi = mem->nregions;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (mem->regions[mid].gpa <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* How many regions start at or below addr in front-end-virtual order. */
static uint32_t uva_rank(const struct vu_mem *mem, uint64_t addr)
{
    uint32_t lo = 0, hi = mem->nregions;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (uva_at(mem, mid)->uva <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/*
 * The index of the region each thread last found by gpa. A queue's buffers mostly come
 * from one region (a guest's RAM is one or two big ones), so this skips most searches.
 * It is only a guess, checked against the map in hand before use: whatever map it came
 * from, a region of this map that holds the address is the one region that does (no
 * two overlap), so a stale guess costs one comparison, never a wrong answer. Per
 * thread, so that workers sharing a map never write to shared memory on the data path
 * (initial-exec: a plain %fs-relative load, not a __tls_get_addr call per lookup).
 */
static __thread uint32_t last_gpa_hit __attribute__((tls_model("initial-exec")));

/*
 * The region holding guest-physical addr, or NULL: the data path's lookup, once per
 * descriptor. Branch-free halving (the compiler turns the step into a cmov), so the
 * cost depends on log2(nregions) only, not on how well the branches are predicted.
 */
static const struct vu_region *find_by_gpa(const struct vu_mem *mem, uint64_t addr)
{
    uint32_t n = mem->nregions;
    uint32_t hit = last_gpa_hit;
    /* addr - gpa wraps to a huge value when addr < gpa, so one compare covers both ends */
    if (hit < n && addr - mem->regions[hit].gpa < mem->regions[hit].size)
        return &mem->regions[hit];
    if (n == 0)
        return NULL;
    const struct vu_region *r = mem->regions;
    while (n > 1) {
        uint32_t half = n / 2;
        r = r[half].gpa <= addr ? r + half : r;
        n -= half;
    }
    /* r is the last region starting at or below addr, or regions[0] if none does */
    if (addr < r->gpa || addr - r->gpa >= r->size)
        return NULL;
    last_gpa_hit = (uint32_t)(r - mem->regions);
    return r;
}

/* The region holding front-end-virtual addr, or NULL (ring setup: control plane). */
static const struct vu_region *find_by_uva(const struct vu_mem *mem, uint64_t addr)
{
    uint32_t k = uva_rank(mem, addr);
    if (k == 0)
        return NULL;
    const struct vu_region *r = uva_at(mem, k - 1);
    return addr - r->uva < r->size ? r : NULL;
}

/* Index in regions[] of the region (gpa, size, uva) exactly, or -1. */
static int find_exact(const struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva)
{
    uint32_t k = gpa_rank(mem, gpa);
    if (k == 0)
        return -1;
    const struct vu_region *r = &mem->regions[k - 1];
    if (r->gpa != gpa || r->size != size || r->uva != uva)
        return -1;
    return (int)(k - 1);
}

/* Whether [start, start+size) overlaps r in guest-physical (or front-end-virtual) space. */
static int collides(const struct vu_region *r, uint64_t start, uint64_t size, int by_uva)
{
    return overlaps(start, size, by_uva ? r->uva : r->gpa, r->size);
}

/*
 * The huge page size of fd's file system if it is hugetlbfs (a mem-path=/dev/hugepages
 * file or an MFD_HUGETLB memfd), else 0. The kernel refuses a hugetlbfs mmap whose offset
 * is not huge-page aligned and rounds its length up, and munmap of an unaligned length
 * fails (EINVAL: a huge page cannot be split), which would leak the mapping.
 */
static uint64_t huge_page_size(int fd)
{
    struct statfs sfs;
    if (fstatfs(fd, &sfs) < 0 || (unsigned long)sfs.f_type != HUGETLBFS_MAGIC)
        return 0;
    return (uint64_t)sfs.f_bsize;
}

int vu_mem_add(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva,
               uint64_t mmap_offset, int fd)
{
    if (!range_ok(gpa, size) || !range_ok(uva, size) || !range_ok(mmap_offset, size))
        return VU_ERR_REGION_BAD;
    if (mem->nregions >= VU_MAX_REGIONS)
        return VU_ERR_REGION_FULL;
    /* Either kind of overlap would make a translation ambiguous. In each order only the
     * last region starting at or below the new one and the next after it can collide. */
    uint32_t at = gpa_rank(mem, gpa);
    uint32_t uat = uva_rank(mem, uva);
    if ((at > 0 && collides(&mem->regions[at - 1], gpa, size, 0)) ||
        (at < mem->nregions && collides(&mem->regions[at], gpa, size, 0)) ||
        (uat > 0 && collides(uva_at(mem, uat - 1), uva, size, 1)) ||
        (uat < mem->nregions && collides(uva_at(mem, uat), uva, size, 1)))
        return VU_ERR_REGION_OVERLAP;
    if (mmap_offset + size > (uint64_t)SIZE_MAX)
        return VU_ERR_REGION_BAD;
    /* Touching a mapping past the end of its file is SIGBUS: refuse such a region
     * (memfd, /dev/shm and hugetlbfs files are regular files with a size). */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return VU_ERR_MMAP;
    uint64_t huge = huge_page_size(fd);
    if (huge != 0 && (mmap_offset % huge != 0 || size % huge != 0))
        return VU_ERR_REGION_ALIGN;
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < mmap_offset + size)
        return VU_ERR_REGION_FILE;

    /* Map from file offset 0 so the offset needs no page alignment; the part before
     * mmap_offset is address space only (on hugetlbfs both are huge-page multiples). */
    uint64_t map_size = mmap_offset + size;
    void *base = mmap(NULL, (size_t)map_size, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (base == MAP_FAILED)
        return VU_ERR_MMAP;

    /* Insert at position at (gpa order); by_uva's indexes at or past it move up by one. */
    uint32_t n = mem->nregions;
    memmove(&mem->regions[at + 1], &mem->regions[at], (n - at) * sizeof(mem->regions[0]));
    for (uint32_t k = 0; k < n; k++)
        if (mem->by_uva[k] >= at)
            mem->by_uva[k]++;
    memmove(&mem->by_uva[uat + 1], &mem->by_uva[uat], (n - uat) * sizeof(mem->by_uva[0]));
    mem->by_uva[uat] = (uint16_t)at;

    struct vu_region *r = &mem->regions[at];
    r->gpa = gpa;
    r->size = size;
    r->uva = uva;
    r->mmap_offset = mmap_offset;
    r->map_base = base;
    r->map_size = map_size;
    r->host = (uint8_t *)base + mmap_offset;
    mem->nregions = n + 1;
    return 0;
}

/* Drop regions[i] from both orders (not unmapping it). */
static void forget_region(struct vu_mem *mem, uint32_t i)
{
    uint32_t n = mem->nregions;
    uint32_t u = uva_rank(mem, mem->regions[i].uva) - 1; /* by_uva[u] == i */
    memmove(&mem->by_uva[u], &mem->by_uva[u + 1], (n - 1 - u) * sizeof(mem->by_uva[0]));
    for (uint32_t k = 0; k + 1 < n; k++)
        if (mem->by_uva[k] > i)
            mem->by_uva[k]--;
    memmove(&mem->regions[i], &mem->regions[i + 1], (n - 1 - i) * sizeof(mem->regions[0]));
    memset(&mem->regions[n - 1], 0, sizeof(mem->regions[0]));
    mem->by_uva[n - 1] = 0;
    mem->nregions = n - 1;
}

static void unmap_region(struct vu_region *r)
{
    if (r->map_base)
        munmap(r->map_base, (size_t)r->map_size);
    memset(r, 0, sizeof(*r));
}

int vu_mem_remove(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva)
{
    int i = find_exact(mem, gpa, size, uva);
    if (i < 0)
        return VU_ERR_REGION_NOT_FOUND;
    struct vu_region *r = &mem->regions[i];
    if (r->map_base)
        munmap(r->map_base, (size_t)r->map_size);
    forget_region(mem, (uint32_t)i);
    return 0;
}

/*
 * Remove a region like vu_mem_remove, but instead of unmapping it replace its pages with
 * private zero pages (MAP_FIXED over the same range) and hand the range to the caller,
 * who unmaps it later (vu_unmap). For memory that Python views may still point into:
 * they then read zeros and write nowhere, and the address range cannot be reused by a
 * new mapping of guest memory while they live.
 */
int vu_mem_retire(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva,
                  void **base, uint64_t *map_size)
{
    int i = find_exact(mem, gpa, size, uva);
    if (i < 0)
        return VU_ERR_REGION_NOT_FOUND;
    struct vu_region *r = &mem->regions[i];
    void *p = mmap(r->map_base, (size_t)r->map_size, PROT_READ | PROT_WRITE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return VU_ERR_MMAP;
    *base = r->map_base;
    *map_size = r->map_size;
    forget_region(mem, (uint32_t)i); /* forgotten, not unmapped */
    return 0;
}

void vu_unmap(void *base, uint64_t size)
{
    munmap(base, (size_t)size);
}

void vu_mem_clear(struct vu_mem *mem)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        unmap_region(&mem->regions[i]);
        mem->by_uva[i] = 0;
    }
    mem->nregions = 0;
}

static void *to_host(const struct vu_region *r, uint64_t start, uint64_t addr, uint64_t len)
{
    if (!r)
        return NULL;
    if (len == 0)
        len = 1; /* an empty range still needs a valid start */
    uint64_t off = addr - start;
    if (len > r->size - off)
        return NULL;
    return r->host + off;
}

void *vu_gpa_to_host(const struct vu_mem *mem, uint64_t gpa, uint64_t len)
{
    const struct vu_region *r = find_by_gpa(mem, gpa);
    return to_host(r, r ? r->gpa : 0, gpa, len);
}

void *vu_uva_to_host(const struct vu_mem *mem, uint64_t uva, uint64_t len)
{
    const struct vu_region *r = find_by_uva(mem, uva);
    return to_host(r, r ? r->uva : 0, uva, len);
}

/*
 * Translate [gpa, gpa+len) into iovecs, splitting where the range runs from
 * one region into a gpa-adjacent one. Returns the iovec count, or an error if
 * any byte is outside guest memory or more than max_iov pieces are needed.
 * Only the first piece needs a search: a range that goes on past the end of its
 * region can only go on in the next region in gpa order, starting right there.
 */
int vu_gpa_to_iov(const struct vu_mem *mem, uint64_t gpa, uint64_t len,
                  struct iovec *iov, uint32_t max_iov)
{
    uint32_t n = 0;
    if (len == 0)
        return 0;
    if (gpa + len - 1 < gpa)
        return VU_ERR_ADDR;
    const struct vu_region *r = find_by_gpa(mem, gpa);
    const struct vu_region *end = mem->regions + mem->nregions;
    for (;;) {
        if (!r)
            return VU_ERR_ADDR;
        if (n == max_iov)
            return VU_ERR_TOO_MANY_IOV;
        uint64_t off = gpa - r->gpa;
        uint64_t piece = r->size - off;
        if (piece > len)
            piece = len;
        iov[n].iov_base = r->host + off;
        iov[n].iov_len = (size_t)piece;
        n++;
        gpa += piece;
        len -= piece;
        if (len == 0)
            return (int)n;
        /* gpa is now r's end (no wrap: the whole range was checked above) */
        r = (r + 1 < end && r[1].gpa == gpa) ? r + 1 : NULL;
    }
}
