/*
 * memory.c - guest memory regions: mmap of the front end's fds and bounds-checked
 * translation of guest-physical (descriptor) and front-end-virtual (ring)
 * addresses to our own. A range is only returned when every byte of it lies in
 * mapped guest memory; arithmetic is done so that no sum can wrap.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

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

int vu_mem_add(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva,
               uint64_t mmap_offset, int fd)
{
    if (!range_ok(gpa, size) || !range_ok(uva, size) || !range_ok(mmap_offset, size))
        return VU_ERR_REGION_BAD;
    if (mem->nregions >= VU_MAX_REGIONS)
        return VU_ERR_REGION_FULL;
    /* Either kind of overlap would make a translation ambiguous. */
    for (uint32_t i = 0; i < mem->nregions; i++)
        if (overlaps(gpa, size, mem->regions[i].gpa, mem->regions[i].size) ||
            overlaps(uva, size, mem->regions[i].uva, mem->regions[i].size))
            return VU_ERR_REGION_OVERLAP;
    if (mmap_offset + size > (uint64_t)SIZE_MAX)
        return VU_ERR_REGION_BAD;
    /* Touching a mapping past the end of its file is SIGBUS: refuse such a region
     * (memfd, /dev/shm and hugetlbfs files are regular files with a size). */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return VU_ERR_MMAP;
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < mmap_offset + size)
        return VU_ERR_REGION_FILE;

    /* Map from file offset 0 so the offset needs no page (or huge page)
     * alignment; the part before mmap_offset is address space only. */
    uint64_t map_size = mmap_offset + size;
    void *base = mmap(NULL, (size_t)map_size, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (base == MAP_FAILED)
        return VU_ERR_MMAP;

    struct vu_region *r = &mem->regions[mem->nregions];
    r->gpa = gpa;
    r->size = size;
    r->uva = uva;
    r->mmap_offset = mmap_offset;
    r->map_base = base;
    r->map_size = map_size;
    r->host = (uint8_t *)base + mmap_offset;
    mem->nregions++;
    return 0;
}

static void unmap_region(struct vu_region *r)
{
    if (r->map_base)
        munmap(r->map_base, (size_t)r->map_size);
    memset(r, 0, sizeof(*r));
}

int vu_mem_remove(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct vu_region *r = &mem->regions[i];
        if (r->gpa == gpa && r->size == size && r->uva == uva) {
            unmap_region(r);
            mem->regions[i] = mem->regions[mem->nregions - 1];
            memset(&mem->regions[mem->nregions - 1], 0, sizeof(*r));
            mem->nregions--;
            return 0;
        }
    }
    return VU_ERR_REGION_NOT_FOUND;
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
    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct vu_region *r = &mem->regions[i];
        if (r->gpa == gpa && r->size == size && r->uva == uva) {
            void *p = mmap(r->map_base, (size_t)r->map_size, PROT_READ | PROT_WRITE,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED)
                return VU_ERR_MMAP;
            *base = r->map_base;
            *map_size = r->map_size;
            memset(r, 0, sizeof(*r)); /* forgotten, not unmapped */
            mem->regions[i] = mem->regions[mem->nregions - 1];
            memset(&mem->regions[mem->nregions - 1], 0, sizeof(*r));
            mem->nregions--;
            return 0;
        }
    }
    return VU_ERR_REGION_NOT_FOUND;
}

void vu_unmap(void *base, uint64_t size)
{
    munmap(base, (size_t)size);
}

void vu_mem_clear(struct vu_mem *mem)
{
    for (uint32_t i = 0; i < mem->nregions; i++)
        unmap_region(&mem->regions[i]);
    mem->nregions = 0;
}

/* The region holding addr (by gpa or uva), or NULL. */
static const struct vu_region *find_region(const struct vu_mem *mem, uint64_t addr, int by_uva)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vu_region *r = &mem->regions[i];
        uint64_t start = by_uva ? r->uva : r->gpa;
        if (addr >= start && addr - start < r->size)
            return r;
    }
    return NULL;
}

static void *to_host(const struct vu_mem *mem, uint64_t addr, uint64_t len, int by_uva)
{
    if (len == 0)
        len = 1; /* an empty range still needs a valid start */
    const struct vu_region *r = find_region(mem, addr, by_uva);
    if (!r)
        return NULL;
    uint64_t off = addr - (by_uva ? r->uva : r->gpa);
    if (len > r->size - off)
        return NULL;
    return r->host + off;
}

void *vu_gpa_to_host(const struct vu_mem *mem, uint64_t gpa, uint64_t len)
{
    return to_host(mem, gpa, len, 0);
}

void *vu_uva_to_host(const struct vu_mem *mem, uint64_t uva, uint64_t len)
{
    return to_host(mem, uva, len, 1);
}

/*
 * Translate [gpa, gpa+len) into iovecs, splitting where the range runs from
 * one region into a gpa-adjacent one. Returns the iovec count, or an error if
 * any byte is outside guest memory or more than max_iov pieces are needed.
 */
int vu_gpa_to_iov(const struct vu_mem *mem, uint64_t gpa, uint64_t len,
                  struct iovec *iov, uint32_t max_iov)
{
    uint32_t n = 0;
    if (len != 0 && gpa + len - 1 < gpa)
        return VU_ERR_ADDR;
    while (len > 0) {
        const struct vu_region *r = find_region(mem, gpa, 0);
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
    }
    return (int)n;
}
