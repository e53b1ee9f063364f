/*
 * ring.c - split virtqueue, device side: take available chains, validate and
 * translate them, publish used entries and decide about signalling.
 *
 * The rules follow the virtio 1.x split ring section. The guest may change
 * ring memory at any time, so every descriptor is copied once into a local
 * and only the copy is checked and used. Each loop over guest data is bounded
 * by the queue size or the indirect table length (the ttl below).
 *
 * Barriers (x86 needs only compiler barriers, but the intent is written as
 * C11 fences so the code stays right elsewhere):
 *  - avail->idx is loaded with acquire before ring entries and descriptors;
 *  - used entries are written before used->idx (release store);
 *  - a full fence sits between publishing used->idx (or avail_event) and
 *    reading the driver's used_event/flags (or avail->idx again), so that
 *    neither side can miss the other's update.
 *
 * Inflight tracking (vhost-user.rst, "Inflight I/O tracking", split ring), when
 * the front end gave us a region: the stores happen in this order, each one a
 * compiler-ordered store to shared memory (a killed process loses no store it
 * executed; only program order matters):
 *   pop:   desc[h].counter = counter++; desc[h].inflight = 1
 *   push:  desc[h].next = last_batch_head; last_batch_head = h; used ring entry
 *   flush: used->idx = new; desc[h].inflight = 0 for the batch; used_idx = new
 * Dying anywhere leaves one of: a head not yet marked (its avail slot is read
 * again, because last_avail_idx is rebuilt as used->idx + heads in flight); a
 * head marked and not yet visible in used->idx (it is run again -- requests are
 * idempotent: the same read, the same write of the same bytes); or used->idx
 * ahead of the region's used_idx, in which case the last batch, found through
 * last_batch_head and next, is the difference and gets cleared, never replayed.
 *
 * Dirty logging (vhost-user.rst "Migration"), when vq->log is set: every write the
 * device makes into guest memory is marked here, so no device can forget one.
 *   - vu_vq_push marks the device-writable buffers of the chain it publishes (when the
 *     used length is not 0), and the used element it wrote. The buffers are found by
 *     walking the chain's descriptors again. They are marked whole: a used length
 *     counts bytes, not where they are (blk's status byte is the last writable byte,
 *     after data it may not have written), so the whole writable area is the only
 *     position-safe rule; it costs at most the pages the driver offered.
 *   - vu_vq_flush_used marks used->idx, and avail_event writes are marked where made.
 * Marks gather per queue in vq->log_cache (one entry per 64-page word) and are ORed
 * into the shared bitmap, atomically, once per burst: in vu_vq_flush_used, after the
 * data and used entries are written (so the front end never clears a bit for a write
 * that is still to come), and before a stop returns (a queue stops after a pass).
 */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "vu.h"

static inline uint16_t load16(const uint16_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void full_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Keep the compiler from reordering inflight stores (see the header comment). */
static inline void store_order(void)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static uint16_t *used_event_ptr(struct vu_vq *vq)
{
    return &vq->avail->ring[vq->num];
}

static uint16_t *avail_event_ptr(struct vu_vq *vq)
{
    return (uint16_t *)&vq->used->ring[vq->num];
}

void vu_vq_record_error(struct vu_vq *vq, int code, uint32_t head, uint64_t detail)
{
    vq->err.code = code;
    vq->err.head = head;
    vq->err.detail = detail;
    vq->err.count++;
    uint32_t slot = code < 0 && code > -VU_ERROR_SLOTS ? (uint32_t)-code : 0;
    vq->stats.errors[slot]++;
}

int vu_vq_setup(struct vu_vq *vq, const struct vu_mem *mem, uint32_t num,
                uint64_t desc_uva, uint64_t avail_uva, uint64_t used_uva,
                uint16_t last_avail_idx, int event_idx, int indirect)
{
    /* Ring positions are idx % num over a 16-bit idx: only powers of 2 wrap right. */
    if (num == 0 || num > VU_MAX_QUEUE_SIZE || (num & (num - 1)) != 0)
        return VU_ERR_QUEUE_SIZE;
    if (desc_uva % 16 || avail_uva % 2 || used_uva % 4)
        return VU_ERR_RING_ADDR;
    uint64_t desc_size = 16ull * num;
    uint64_t avail_size = 4 + 2ull * num + 2; /* + used_event */
    uint64_t used_size = 4 + 8ull * num + 2;  /* + avail_event */
    void *desc = vu_uva_to_host(mem, desc_uva, desc_size);
    void *avail = vu_uva_to_host(mem, avail_uva, avail_size);
    void *used = vu_uva_to_host(mem, used_uva, used_size);
    if (!desc || !avail || !used)
        return VU_ERR_RING_ADDR;

    vq->mem = mem;
    vq->num = num;
    vq->event_idx = event_idx;
    vq->indirect = indirect;
    vq->desc = desc;
    vq->avail = avail;
    vq->used = used;
    vq->last_avail_idx = last_avail_idx;
    vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    vq->signalled_used = 0;
    vq->signalled_used_valid = 0;
    vq->broken = 0;
    vq->inflight = NULL;
    vq->inflight_counter = 0;
    vq->batch_n = 0;
    vq->resubmit_n = vq->resubmit_pos = 0;
    vq->log_cache.n = 0; /* vq->log and the used ring's address are the caller's to set */
    __atomic_store_n(&vq->stop, 0, __ATOMIC_SEQ_CST);
    memset(&vq->err, 0, sizeof(vq->err));
    return 0;
}

/* Chains the driver made available and we have not taken yet. */
int vu_vq_avail_count(struct vu_vq *vq)
{
    uint16_t idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(idx - vq->last_avail_idx);
    if (n > vq->num) {
        /* The driver claims more buffers than the ring holds: the ring state is
         * garbage and no later position can be trusted. */
        vq->broken = 1;
        vu_vq_record_error(vq, VU_ERR_AVAIL_IDX, 0, idx);
        return VU_ERR_AVAIL_IDX;
    }
    return n;
}

static int add_buffer(struct vu_vq *vq, struct vu_chain *c, const struct vring_desc *d,
                      uint32_t *niov, uint64_t *detail)
{
    if (d->len == 0)
        return 0;
    int r = vu_gpa_to_iov(vq->mem, d->addr, d->len, &c->iov[*niov], VU_MAX_CHAIN_IOV - *niov);
    if (r < 0) {
        *detail = d->addr;
        return r;
    }
    *niov += (uint32_t)r;
    if (d->flags & VRING_DESC_F_WRITE) {
        c->n_in += (uint32_t)r;
        c->in_bytes += d->len;
    } else {
        c->n_out += (uint32_t)r;
        c->out_bytes += d->len;
    }
    return 0;
}

/*
 * Walk the chain starting at head (already < num). In a table of n entries a
 * walk that visits more than n descriptors must have revisited one: that is
 * the loop check. Separately the chain may hold at most num buffers in all,
 * and an indirect table may have at most num entries.
 */
static int walk_chain(struct vu_vq *vq, uint32_t head, struct vu_chain *c, uint64_t *detail)
{
    const uint8_t *table = (const uint8_t *)vq->desc;
    uint32_t table_len = vq->num;
    uint32_t ttl = vq->num;
    uint32_t idx = head;
    uint32_t total = 0;
    uint32_t niov = 0;
    int in_indirect = 0;
    int seen_writable = 0;

    c->n_out = c->n_in = 0;
    c->out_bytes = c->in_bytes = 0;
    for (;;) {
        struct vring_desc d;
        if (ttl == 0) {
            *detail = idx;
            return VU_ERR_LOOP;
        }
        ttl--;
        memcpy(&d, table + (size_t)idx * sizeof(d), sizeof(d));

        if (d.flags & VRING_DESC_F_INDIRECT) {
            *detail = idx;
            if (!vq->indirect)
                return VU_ERR_INDIRECT_FEATURE;
            if (in_indirect)
                return VU_ERR_INDIRECT_NESTED;
            if (d.flags & VRING_DESC_F_NEXT)
                return VU_ERR_INDIRECT_NEXT;
            *detail = d.len;
            if (d.len == 0 || d.len % sizeof(struct vring_desc))
                return VU_ERR_INDIRECT_LEN;
            table_len = d.len / sizeof(struct vring_desc);
            if (table_len > vq->num)
                return VU_ERR_CHAIN_TOO_LONG;
            table = vu_gpa_to_host(vq->mem, d.addr, d.len);
            if (!table) {
                *detail = d.addr;
                return VU_ERR_INDIRECT_ADDR;
            }
            idx = 0;
            ttl = table_len;
            in_indirect = 1;
            continue;
        }

        if (++total > vq->num) {
            *detail = total;
            return VU_ERR_CHAIN_TOO_LONG;
        }
        if (d.flags & VRING_DESC_F_WRITE) {
            seen_writable = 1;
        } else if (seen_writable) {
            *detail = idx;
            return VU_ERR_DIRECTION; /* spec: readable buffers precede writable ones */
        }
        int r = add_buffer(vq, c, &d, &niov, detail);
        if (r < 0)
            return r;
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        idx = d.next;
        if (idx >= table_len) {
            *detail = idx;
            return VU_ERR_NEXT;
        }
    }
}

/* Take the next available chain (caller checked one is there). The avail slot
 * is consumed even when the chain is bad, so one bad chain cannot wedge the
 * queue; c->head says which head to return. */
static int pop_chain(struct vu_vq *vq, struct vu_chain *c, uint64_t *detail)
{
    uint16_t slot = vq->last_avail_idx & (uint16_t)(vq->num - 1);
    uint16_t head = load16(&vq->avail->ring[slot]);
    vq->last_avail_idx++;
    vq->stats.chains++;
    c->head = head;
    if (head >= vq->num) {
        /* The avail ring is garbage: nothing later in it can be trusted, and the
         * slot could not be given back anyway (no valid id to use). */
        vq->broken = 1;
        *detail = head;
        return VU_ERR_HEAD;
    }
    if (vq->inflight) {
        struct vu_inflight_desc *d = &vq->inflight->desc[head];
        d->counter = vq->inflight_counter++;
        store_order();
        d->inflight = 1;
        store_order();
    }
    return walk_chain(vq, head, c, detail);
}

int vu_vq_pop(struct vu_vq *vq, struct vu_chain *chain)
{
    uint64_t detail = 0;
    int r = pop_chain(vq, chain, &detail);
    if (r < 0)
        vu_vq_record_error(vq, r, chain->head, detail);
    return r;
}

/* --- dirty log --- */

/* OR 64 pages' bits into the bitmap: one atomic on an aligned word inside the log,
 * bytes otherwise (the log's size and offset are the front end's, any alignment). */
static void log_or(struct vu_vq *vq, uint64_t word, uint64_t bits)
{
    const struct vu_log *log = vq->log;
    uint64_t off = word * 8; /* word < 2^46: gpa / 4096 / 64 */
    uint8_t *p = log->base + off;
    if (off + 8 <= log->size && ((uintptr_t)p & 7) == 0) {
        __atomic_fetch_or((uint64_t *)p, bits, __ATOMIC_RELAXED);
    } else {
        for (uint64_t b = 0; b < 8; b++) {
            uint8_t v = (uint8_t)(bits >> (8 * b));
            if (v == 0)
                continue;
            if (off + b >= log->size) {
                vq->stats.log_beyond++;
                continue;
            }
            __atomic_fetch_or(p + b, v, __ATOMIC_RELAXED);
        }
    }
    vq->stats.log_words++;
}

static void log_cache_drain(struct vu_vq *vq)
{
    struct vu_log_cache *c = &vq->log_cache;
    /* the data and ring writes the bits stand for come first */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (uint32_t i = 0; i < c->n; i++)
        log_or(vq, c->word[i], c->bits[i]);
    c->n = 0;
}

static void log_cache_add(struct vu_vq *vq, uint64_t word, uint64_t bits)
{
    struct vu_log_cache *c = &vq->log_cache;
    if (word >= (vq->log->size + 7) / 8) {
        vq->stats.log_beyond++;
        return;
    }
    for (uint32_t i = c->n; i-- > 0;) {
        if (c->word[i] == word) {
            c->bits[i] |= bits;
            return;
        }
    }
    if (c->n == VU_LOG_CACHE)
        log_cache_drain(vq);
    c->word[c->n] = word;
    c->bits[c->n] = bits;
    c->n++;
}

/* Mark guest-physical [gpa, gpa+len) dirty (gathered; vu_log_flush publishes). */
void vu_log_write(struct vu_vq *vq, uint64_t gpa, uint64_t len)
{
    if (!vq->log || len == 0)
        return;
    uint64_t page = gpa / VU_LOG_PAGE;
    uint64_t last = (len - 1 > UINT64_MAX - gpa ? UINT64_MAX : gpa + len - 1) / VU_LOG_PAGE;
    for (;;) {
        uint64_t bit = page % 64;
        uint64_t n = 64 - bit;
        if (n > last - page + 1)
            n = last - page + 1;
        log_cache_add(vq, page / 64, n == 64 ? ~0ull : ((1ull << n) - 1) << bit);
        if (last - page < n)
            return;
        page += n;
    }
}

/* Publish the gathered marks; tell SET_LOG_FD's eventfd, if there is one. */
void vu_log_flush(struct vu_vq *vq)
{
    if (!vq->log || vq->log_cache.n == 0)
        return;
    log_cache_drain(vq);
    if (vq->log->call_fd >= 0) {
        uint64_t one = 1;
        if (write(vq->log->call_fd, &one, sizeof(one)) < 0) {
            /* a saturated or closed eventfd: the bits are set all the same */
        }
    }
}

/*
 * Mark the device-writable buffers of the chain at head. The descriptors were checked
 * when the chain was taken, but the driver may have rewritten them since: each step is
 * bounded again, and whatever it wrote, only bits of the log change.
 */
static void log_chain(struct vu_vq *vq, uint32_t head)
{
    const uint8_t *table = (const uint8_t *)vq->desc;
    uint32_t table_len = vq->num;
    uint32_t ttl = vq->num;
    uint32_t idx = head;
    int in_indirect = 0;
    while (idx < table_len && ttl > 0) {
        struct vring_desc d;
        ttl--;
        memcpy(&d, table + (size_t)idx * sizeof(d), sizeof(d));
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (in_indirect || d.len == 0 || d.len % sizeof(d) || d.len / sizeof(d) > vq->num)
                return;
            table = vu_gpa_to_host(vq->mem, d.addr, d.len);
            if (!table)
                return;
            table_len = ttl = d.len / sizeof(d);
            idx = 0;
            in_indirect = 1;
            continue;
        }
        if (d.flags & VRING_DESC_F_WRITE)
            vu_log_write(vq, d.addr, d.len);
        if (!(d.flags & VRING_DESC_F_NEXT))
            return;
        idx = d.next;
    }
}

/* Used ring offsets (split ring): flags, idx, ring[num], avail_event. */
#define USED_IDX_OFFSET 2
#define USED_RING_OFFSET 4

static void log_used(struct vu_vq *vq, uint64_t offset, uint64_t len)
{
    if (vq->log_used)
        vu_log_write(vq, vq->log_used_gpa + offset, len);
}

void vu_vq_push(struct vu_vq *vq, uint32_t head, uint32_t len)
{
    struct vu_inflight_split *inf = vq->inflight;
    if (inf && head < vq->num && vq->batch_n < VU_MAX_QUEUE_SIZE) {
        inf->desc[head].next = inf->last_batch_head;
        store_order();
        inf->last_batch_head = (uint16_t)head;
        vq->batch[vq->batch_n++] = (uint16_t)head;
        store_order();
    }
    uint16_t slot = vq->used_idx & (uint16_t)(vq->num - 1);
    struct vring_used_elem *e = &vq->used->ring[slot];
    e->id = head;
    e->len = len;
    vq->used_idx++;
    vq->stats.pushed++;
    if (vq->log) {
        if (len)
            log_chain(vq, head);
        log_used(vq, USED_RING_OFFSET + (uint64_t)slot * sizeof(*e), sizeof(*e));
    }
}

void vu_vq_flush_used(struct vu_vq *vq)
{
    /* Entries (and the data the device wrote) become visible before the index. */
    __atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
    if (vq->log) {
        log_used(vq, USED_IDX_OFFSET, sizeof(uint16_t));
        vu_log_flush(vq);
    }
    struct vu_inflight_split *inf = vq->inflight;
    if (inf) {
        store_order();
        for (uint32_t i = 0; i < vq->batch_n; i++)
            inf->desc[vq->batch[i]].inflight = 0;
        store_order();
        inf->used_idx = vq->used_idx;
        store_order();
        vq->batch_n = 0;
    }
}

uint64_t vu_inflight_queue_size(uint32_t num)
{
    uint64_t n = sizeof(struct vu_inflight_split) + (uint64_t)num * sizeof(struct vu_inflight_desc);
    return (n + VU_INFLIGHT_ALIGN - 1) / VU_INFLIGHT_ALIGN * VU_INFLIGHT_ALIGN;
}

/*
 * Attach this queue's inflight region (after vu_vq_setup) and recover from it,
 * as the spec's "When reconnecting" says. A fresh region (version 0) is
 * initialised. Otherwise: if used->idx is ahead of the region's used_idx the
 * process died inside a flush, and that many heads of the last batch list are
 * cleared; every head still marked is queued for resubmission, oldest counter
 * first, and last_avail_idx becomes used->idx plus their number (whatever
 * SET_VRING_BASE said: after a crash QEMU only knows the used index).
 * Everything in the region came from the front end and is checked before use.
 * Returns the number of heads to resubmit, or VU_ERR_INFLIGHT (detail in err).
 */
int vu_vq_set_inflight(struct vu_vq *vq, void *region, uint64_t size)
{
    struct vu_inflight_split *inf = region;
    uint32_t num = vq->num;
    vq->inflight = NULL;
    vq->batch_n = 0;
    vq->resubmit_n = vq->resubmit_pos = 0;
    if (!region || size < vu_inflight_queue_size(num)) {
        vu_vq_record_error(vq, VU_ERR_INFLIGHT, 0, size);
        return VU_ERR_INFLIGHT;
    }
    uint16_t used = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    if (inf->version == 0) {
        memset(inf, 0, vu_inflight_queue_size(num));
        inf->desc_num = (uint16_t)num;
        inf->used_idx = used;
        store_order();
        inf->version = VU_INFLIGHT_VERSION;
        vq->inflight = inf;
        vq->inflight_counter = 1;
        return 0;
    }
    if (inf->version != VU_INFLIGHT_VERSION || inf->desc_num != num) {
        vu_vq_record_error(vq, VU_ERR_INFLIGHT, inf->desc_num, inf->version);
        return VU_ERR_INFLIGHT;
    }
    uint16_t batch = (uint16_t)(used - inf->used_idx);
    if (batch > num) {
        /* Not a flush we died in. With nothing in flight the rings were simply set
         * up afresh (a guest driver reset): start the record over. */
        for (uint32_t i = 0; i < num; i++) {
            if (inf->desc[i].inflight) {
                vu_vq_record_error(vq, VU_ERR_INFLIGHT, batch, inf->used_idx);
                return VU_ERR_INFLIGHT;
            }
        }
        batch = 0;
    }
    uint16_t h = inf->last_batch_head;
    for (uint16_t i = 0; i < batch; i++) {
        if (h >= num) {
            vu_vq_record_error(vq, VU_ERR_INFLIGHT, h, i);
            return VU_ERR_INFLIGHT;
        }
        inf->desc[h].inflight = 0;
        h = inf->desc[h].next;
    }
    store_order();
    inf->used_idx = used;

    uint64_t max_counter = 0;
    uint32_t n = 0;
    for (uint32_t i = 0; i < num; i++) {
        if (!inf->desc[i].inflight)
            continue;
        inf->desc[i].inflight = 1; /* any non-zero byte means in flight */
        uint64_t c = inf->desc[i].counter;
        if (c > max_counter)
            max_counter = c;
        /* insertion by counter: at most num (<= 1024) entries, once per start */
        uint32_t j = n++;
        while (j > 0 && inf->desc[vq->resubmit[j - 1]].counter > c) {
            vq->resubmit[j] = vq->resubmit[j - 1];
            j--;
        }
        vq->resubmit[j] = (uint16_t)i;
    }
    vq->resubmit_n = n;
    vq->used_idx = used;
    vq->last_avail_idx = (uint16_t)(used + n);
    vq->inflight_counter = max_counter + 1;
    vq->inflight = inf;
    return (int)n;
}

/* virtio spec: signal when the used index crossed the driver's used_event. */
int vu_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

int vu_vq_should_signal(struct vu_vq *vq)
{
    full_fence(); /* used->idx store before reading the driver's suppression state */
    uint16_t new_idx = vq->used_idx;
    uint16_t old_idx = vq->signalled_used;
    int valid = vq->signalled_used_valid;
    vq->signalled_used = new_idx;
    vq->signalled_used_valid = 1;
    if (!vq->event_idx)
        return !(load16(&vq->avail->flags) & VRING_AVAIL_F_NO_INTERRUPT);
    uint16_t event = load16(used_event_ptr(vq));
    if (!valid)
        return 1;
    return vu_need_event(event, new_idx, old_idx);
}

int vu_vq_signal_if_needed(struct vu_vq *vq)
{
    if (!vu_vq_should_signal(vq) || vq->call_fd < 0)
        return 0;
    uint64_t one = 1;
    /* EAGAIN means the counter is saturated: the front end is signalled anyway. */
    if (write(vq->call_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        return -errno;
    vq->stats.signals++;
    return 1;
}

/* Ask the driver to kick for the next buffer; then look again, since it may
 * have added one before it could see the request. Returns the count now
 * available (> 0: do not sleep). */
static void log_avail_event(struct vu_vq *vq)
{
    if (vq->log) {
        log_used(vq, USED_RING_OFFSET + 8ull * vq->num, sizeof(uint16_t));
        vu_log_flush(vq);
    }
}

int vu_vq_enable_notification(struct vu_vq *vq)
{
    if (vq->event_idx) {
        __atomic_store_n(avail_event_ptr(vq), vq->last_avail_idx, __ATOMIC_RELAXED);
        log_avail_event(vq);
    }
    full_fence();
    return vu_vq_avail_count(vq);
}

/* Ask for a kick when the driver moves avail->idx past `idx` (event idx), then
 * fence so that a buffer added before the driver could see it is not missed. */
void vu_vq_request_kick_at(struct vu_vq *vq, uint16_t idx)
{
    if (vq->event_idx) {
        __atomic_store_n(avail_event_ptr(vq), idx, __ATOMIC_RELAXED);
        log_avail_event(vq);
    }
    full_fence();
}

/* Where both sides stand (for diagnostics): avail->idx, used->idx, the driver's
 * used_event and our avail_event. Only while the rings are mapped. */
void vu_vq_ring_state(struct vu_vq *vq, uint16_t *out)
{
    out[0] = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    out[1] = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    out[2] = load16(used_event_ptr(vq));
    out[3] = load16(avail_event_ptr(vq));
}

/* Run the requests that were in flight when the previous process died, oldest first
 * (their inflight marks and counters stay as they were until they are used). Returns
 * how many ran; a stop leaves the rest for the next start. */
static int resubmit(struct vu_vq *vq, vu_chain_handler handler, void *ctx)
{
    int done = 0;
    while (vq->resubmit_pos < vq->resubmit_n) {
        /* a stop leaves the rest marked: the next start finds them again */
        if (__atomic_load_n(&vq->stop, __ATOMIC_ACQUIRE))
            break;
        uint16_t head = vq->resubmit[vq->resubmit_pos++];
        uint64_t detail = 0;
        struct vu_chain *c = &vq->chain;
        c->head = head;
        vq->stats.chains++;
        vq->stats.resubmitted++;
        int r = walk_chain(vq, head, c, &detail);
        if (r < 0) {
            vq->stats.bad_chains++;
            vu_vq_record_error(vq, r, head, detail);
            vu_vq_push(vq, head, 0);
        } else {
            vu_vq_push(vq, head, handler(ctx, vq, c));
        }
        done++;
    }
    return done;
}

/* One pass: every chain available now, handled, published, one signal. */
int vu_vq_process(struct vu_vq *vq, vu_chain_handler handler, void *ctx)
{
    uint64_t chains_before = vq->stats.chains;
    int again = resubmit(vq, handler, ctx);
    if (again)
        vu_vq_flush_used(vq); /* its own batch: a batch never holds more than num heads */
    int n = vu_vq_avail_count(vq);
    int ret = n;
    for (int i = 0; i < n; i++) {
        if (__atomic_load_n(&vq->stop, __ATOMIC_ACQUIRE)) {
            /* A stop waits for one request, not a ring of them; the rest stay in
             * the avail ring (last_avail_idx counts only what was taken). */
            n = ret = i;
            break;
        }
        uint64_t detail = 0;
        int r = pop_chain(vq, &vq->chain, &detail);
        if (r < 0) {
            vq->stats.bad_chains++;
            vu_vq_record_error(vq, r, vq->chain.head, detail);
            if (vq->broken) { /* bad head: publish what is done, take nothing more */
                ret = r;
                break;
            }
            /* Give the buffer back with nothing written. */
            vu_vq_push(vq, vq->chain.head, 0);
            continue;
        }
        vu_vq_push(vq, vq->chain.head, handler(ctx, vq, &vq->chain));
    }
    if (again + (n > 0 ? n : 0) == 0)
        return n;
    vu_vq_flush_used(vq);
    /* every chain taken in the pass, a refused or unusable one included */
    vu_vq_count_batch(vq, (uint32_t)(vq->stats.chains - chains_before));
    vu_vq_signal_if_needed(vq);
    return ret < 0 ? ret : again + n;
}

static void notify_error_fd(struct vu_vq *vq)
{
    uint64_t one = 1;
    if (vq->err_fd >= 0 && write(vq->err_fd, &one, sizeof(one)) < 0) {
        /* nothing more to tell anyone */
    }
}

/* Sleep until the kick fd fires, a stop is requested or timeout_ms pass (-1: no
 * timeout). A failing kick fd is recorded as an error and returned as its code. */
static int wait_for_kick(struct vu_vq *vq, int timeout_ms)
{
    for (;;) {
        struct pollfd fds[2] = {
            {.fd = vq->kick_fd, .events = POLLIN},
            {.fd = vq->stop_fd, .events = POLLIN},
        };
        int r = poll(fds, 2, timeout_ms);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            vu_vq_record_error(vq, VU_ERR_KICK_FD, 0, (uint64_t)errno);
            return VU_ERR_KICK_FD;
        }
        if (fds[1].revents || __atomic_load_n(&vq->stop, __ATOMIC_ACQUIRE))
            return VU_WAIT_STOP;
        if (r == 0)
            return VU_WAIT_IDLE;
        if (fds[0].revents & POLLIN) {
            uint64_t v;
            ssize_t got = read(vq->kick_fd, &v, sizeof(v));
            if (got == 0) { /* end of file: readable forever, it would spin */
                vu_vq_record_error(vq, VU_ERR_KICK_HUP, 0, 0);
                return VU_ERR_KICK_HUP;
            }
            if (got < 0 && errno != EAGAIN && errno != EINTR) {
                vu_vq_record_error(vq, VU_ERR_KICK_FD, 0, (uint64_t)errno);
                return VU_ERR_KICK_FD;
            }
            vq->stats.kicks++;
            return VU_WAIT_WORK;
        }
        vu_vq_record_error(vq, VU_ERR_KICK_HUP, 0, (uint64_t)fds[0].revents);
        return VU_ERR_KICK_HUP;
    }
}

/*
 * Serve the queue until asked to stop: process, then sleep on the kick fd.
 * Returns to the caller (a worker thread, GIL released) only to stop, or
 * after a pass that recorded errors so they can be logged.
 */
int vu_vq_run(struct vu_vq *vq, vu_chain_handler handler, void *ctx)
{
    uint64_t errors_at_entry = vq->err.count;
    for (;;) {
        if (__atomic_load_n(&vq->stop, __ATOMIC_ACQUIRE))
            return VU_RUN_STOPPED;
        if (vq->broken)
            return VU_RUN_BROKEN;
        int n = vu_vq_process(vq, handler, ctx);
        if (n < 0) {
            notify_error_fd(vq);
            return VU_RUN_BROKEN;
        }
        if (vq->err.count != errors_at_entry)
            return VU_RUN_ERRORS;
        if (n > 0)
            continue;
        n = vu_vq_enable_notification(vq);
        if (n < 0) {
            notify_error_fd(vq);
            return VU_RUN_BROKEN;
        }
        if (n > 0)
            continue;

        int w = wait_for_kick(vq, -1);
        if (w == VU_WAIT_STOP)
            return VU_RUN_STOPPED;
        if (w < 0)
            return VU_RUN_FD_ERROR;
    }
}

/* vu_vq_discard (vu.h) with inflight tracking: the discarded heads never started, so
 * their marks are cleared. */
void vu_vq_discard_inflight(struct vu_vq *vq, uint32_t n)
{
    if (n > vq->num)
        n = vq->num;
    vq->stats.chains -= n;
    for (uint32_t i = 0; i < n; i++) {
        vq->last_avail_idx--;
        uint16_t head = load16(&vq->avail->ring[vq->last_avail_idx & (uint16_t)(vq->num - 1)]);
        if (head < vq->num) { /* it was < num when taken; the driver may have rewritten it */
            vq->inflight->desc[head].inflight = 0;
            store_order();
        }
    }
}

/*
 * The chain API for devices written in Python: take up to max_chains valid chains at
 * once, their iovecs packed into iov[] (max_iov entries, at least VU_MAX_CHAIN_IOV so
 * that any chain fits). A chain that fails validation never reaches the caller: it is
 * recorded and returned to the driver with nothing written, as in vu_vq_process, and
 * ends the batch (the queue keeps one error, so the caller reports each before the
 * next is recorded). A chain that does not fit in what is left of iov[] is given back
 * for the next call.
 * Returns the number of chains in out[] (those taken before a bad head are still
 * handed out; the call after returns VU_ERR_BROKEN), or a negative code when the ring
 * is broken (the error is recorded; the queue's worker should stop).
 * Queues with inflight tracking are served by vu_vq_process (it resubmits); this
 * batch API leaves resubmission alone.
 */
int vu_vq_pop_batch(struct vu_vq *vq, struct vu_chain_ref *out, uint32_t max_chains,
                    struct iovec *iov, uint32_t max_iov)
{
    if (vq->broken)
        return VU_ERR_BROKEN;
    int avail = vu_vq_avail_count(vq);
    if (avail < 0)
        return avail;
    uint32_t n = 0, used_iov = 0, bad = 0;
    struct vu_chain *c = &vq->chain;
    while (n < max_chains && (int)(n + bad) < avail) {
        if (__atomic_load_n(&vq->stop, __ATOMIC_ACQUIRE))
            break;
        uint16_t slot = vq->last_avail_idx;
        uint64_t detail = 0;
        int r = pop_chain(vq, c, &detail);
        if (r < 0) {
            vq->stats.bad_chains++;
            vu_vq_record_error(vq, r, c->head, detail);
            if (vq->broken)
                break;
            vu_vq_push(vq, c->head, 0);
            bad++;
            break; /* a queue records one error: let the caller report it before the next */
        }
        uint32_t niov = c->n_out + c->n_in;
        if (used_iov + niov > max_iov) {
            vu_vq_discard(vq, 1);
            break;
        }
        memcpy(&iov[used_iov], c->iov, niov * sizeof(struct iovec));
        out[n] = (struct vu_chain_ref){
            .head = c->head, .slot = slot, .iov_start = used_iov, .n_out = c->n_out,
            .n_in = c->n_in, .out_bytes = c->out_bytes, .in_bytes = c->in_bytes,
        };
        used_iov += niov;
        n++;
    }
    if (bad) {
        /* the refused chains go back to the driver now, whatever the caller does next */
        vu_vq_flush_used(vq);
        vu_vq_signal_if_needed(vq);
    }
    if (vq->broken && n == 0)
        return VU_ERR_BROKEN;
    return (int)n;
}

/* Publish n used entries (head, bytes written) at once, then decide about one signal. */
int vu_vq_push_batch(struct vu_vq *vq, const uint32_t *heads, const uint32_t *lens, uint32_t n)
{
    if (n == 0)
        return 0;
    for (uint32_t i = 0; i < n; i++)
        vu_vq_push(vq, heads[i], lens[i]);
    vu_vq_flush_used(vq);
    vu_vq_count_batch(vq, n);
    return vu_vq_signal_if_needed(vq);
}

/*
 * For a Python worker thread (called with the GIL released): ask the driver for a
 * kick, and unless chains are already waiting, sleep until one comes, a stop is
 * requested or timeout_ms pass (-1: no timeout). Returns VU_WAIT_WORK, VU_WAIT_IDLE
 * (timed out), VU_WAIT_STOP, or a negative code (broken ring, failing kick fd).
 */
int vu_vq_wait(struct vu_vq *vq, int timeout_ms)
{
    if (__atomic_load_n(&vq->stop, __ATOMIC_ACQUIRE))
        return VU_WAIT_STOP;
    int n = vu_vq_enable_notification(vq);
    if (n != 0)
        return n > 0 ? VU_WAIT_WORK : n;
    return wait_for_kick(vq, timeout_ms);
}

void vu_vq_request_stop(struct vu_vq *vq)
{
    uint64_t one = 1;
    __atomic_store_n(&vq->stop, 1, __ATOMIC_RELEASE);
    if (vq->stop_fd >= 0 && write(vq->stop_fd, &one, sizeof(one)) < 0) {
        /* the flag alone stops it at the next pass */
    }
}

size_t vu_iov_copy_from(const struct iovec *iov, uint32_t niov, size_t skip, void *dst, size_t len)
{
    if (niov > 0 && skip + len <= iov[0].iov_len) { /* the common case: one buffer */
        memcpy(dst, (const uint8_t *)iov[0].iov_base + skip, len);
        return len;
    }
    size_t done = 0;
    for (uint32_t i = 0; i < niov && done < len; i++) {
        size_t l = iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        size_t n = l - skip;
        if (n > len - done)
            n = len - done;
        memcpy((uint8_t *)dst + done, (const uint8_t *)iov[i].iov_base + skip, n);
        done += n;
        skip = 0;
    }
    return done;
}

size_t vu_iov_copy_to(const struct iovec *iov, uint32_t niov, size_t skip, const void *src, size_t len)
{
    if (niov > 0 && skip + len <= iov[0].iov_len) {
        memcpy((uint8_t *)iov[0].iov_base + skip, src, len);
        return len;
    }
    size_t done = 0;
    for (uint32_t i = 0; i < niov && done < len; i++) {
        size_t l = iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        size_t n = l - skip;
        if (n > len - done)
            n = len - done;
        memcpy((uint8_t *)iov[i].iov_base + skip, (const uint8_t *)src + done, n);
        done += n;
        skip = 0;
    }
    return done;
}
