/*
 * net.c - virtio-net frames between rings and TAP queues or switch ports
 * (virtio 1.x, 5.1.6).
 *
 * tx: each chain is header + frame, device-readable only. It is checked (no
 * writable buffer, at least a header, not longer than the MTU or the GSO
 * limit) and written to the TAP with one writev: the TAP was opened with
 * IFF_VNET_HDR and the same header size, so checksum and segmentation
 * offloads pass through untouched. In switch mode the frame is copied once,
 * straight into the destination port's rx buffers.
 *
 * rx: buffers are device-writable chains. With MRG_RXBUF a frame may fill
 * several chains; num_buffers in the header says how many. From a TAP we do
 * not know a frame's size before reading it, so enough chains for the largest
 * possible frame are taken, the frame is read into them with one readv, and
 * the chains it did not need are given back (vu_vq_discard).
 *
 * When a guest has no rx buffers, TAP frames wait in the TAP (we stop polling
 * it until the guest kicks the rx queue) and switch frames are dropped; both
 * are counted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "net.h"

#define ETH_HLEN 14
#define VNET_HDR_GSO_NONE 0
#define NUM_BUFFERS_OFFSET 10

static void iov_to_iov(const struct iovec *dst, uint32_t ndst, uint64_t dst_skip,
                       const struct iovec *src, uint32_t nsrc, uint64_t src_skip, uint64_t len);

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec;
}

/* --- switch MAC table (bounded: buckets x ways, oldest entry evicted) --- */

static uint32_t mac_bucket(const uint8_t *mac)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < 6; i++)
        h = (h ^ mac[i]) * 16777619u;
    return h % NET_MAC_BUCKETS;
}

static void mac_learn(struct net_engine *e, const uint8_t *mac, uint32_t pair, uint64_t now)
{
    if (mac[0] & 1)
        return; /* a group address is never a source */
    struct net_mac_entry *b = &e->macs[mac_bucket(mac) * NET_MAC_WAYS];
    struct net_mac_entry *victim = &b[0];
    for (int i = 0; i < NET_MAC_WAYS; i++) {
        if (b[i].valid && memcmp(b[i].mac, mac, 6) == 0) {
            if (b[i].pair != pair || b[i].seen != now) { /* keep the line clean if unchanged */
                b[i].pair = pair;
                b[i].seen = now;
            }
            return;
        }
        if (!b[i].valid)
            victim = &b[i];
        else if (victim->valid && b[i].seen < victim->seen)
            victim = &b[i];
    }
    memcpy(victim->mac, mac, 6);
    victim->valid = 1;
    victim->pair = pair;
    victim->seen = now;
}

/* The pair a unicast MAC was learnt on, or -1 (unknown or aged out). */
static int mac_lookup(struct net_engine *e, const uint8_t *mac, uint64_t now)
{
    struct net_mac_entry *b = &e->macs[mac_bucket(mac) * NET_MAC_WAYS];
    for (int i = 0; i < NET_MAC_WAYS; i++)
        if (b[i].valid && memcmp(b[i].mac, mac, 6) == 0)
            return now - b[i].seen <= e->mac_age ? (int)b[i].pair : -1;
    return -1;
}

int net_switch_lookup(struct net_engine *e, const uint8_t *mac)
{
    return mac_lookup(e, mac, now_seconds());
}

/* Entries a lookup would find now (learnt, not aged out). For the metrics scrape, from
 * another thread while the engine learns: racy reads of single fields, so a count may
 * be off by the entries changing at that moment, never more. */
uint32_t net_mac_table_size(const struct net_engine *e)
{
    uint64_t now = now_seconds();
    uint32_t n = 0;
    for (uint32_t i = 0; i < NET_MAC_BUCKETS * NET_MAC_WAYS; i++) {
        const struct net_mac_entry *m = &e->macs[i];
        if (!__atomic_load_n(&m->valid, __ATOMIC_RELAXED))
            continue;
        uint64_t seen = __atomic_load_n(&m->seen, __ATOMIC_RELAXED);
        if (seen >= now || now - seen <= e->mac_age) /* the engine may be a tick ahead */
            n++;
    }
    return n;
}

/* --- rx buffers --- */

/* Take rx chains until `need` bytes (or max_chains chains) are gathered into
 * e->rx_iov. Returns the number of chains (0: none available), or <0 if the
 * ring is bad (the queue is then marked broken). */
static int gather_rx(struct net_engine *e, struct vu_vq *vq, uint64_t need, uint32_t max_chains,
                     uint32_t *niov_out, uint64_t *total_out, int *exhausted)
{
    uint32_t nchains = 0, niov = 0;
    uint64_t total = 0;
    int avail = vu_vq_avail_count(vq);
    if (avail < 0)
        return avail;
    while (total < need && nchains < (uint32_t)avail && nchains < max_chains) {
        struct vu_chain *c = &e->rx_chain;
        int r = vu_vq_pop(vq, c);
        if (r == 0 && c->n_out > 0) {
            vu_vq_record_error(vq, NET_ERR_RX_READABLE, c->head, c->n_out);
            r = NET_ERR_RX_READABLE;
        }
        if (r == 0 && niov + c->n_in > VU_MAX_CHAIN_IOV) {
            vu_vq_discard(vq, 1); /* leave it for the next frame */
            break;
        }
        if (r < 0) {
            /* Chains already taken cannot be given back past this one: a guest
             * that hands us bad rx buffers loses its rx queue, nobody else's. */
            vq->broken = 1;
            return r;
        }
        memcpy(&e->rx_iov[niov], c->iov, c->n_in * sizeof(struct iovec));
        niov += c->n_in;
        e->rx_heads[nchains] = c->head;
        e->rx_lens[nchains] = c->in_bytes;
        total += c->in_bytes;
        nchains++;
    }
    *niov_out = niov;
    *total_out = total;
    *exhausted = nchains == (uint32_t)avail;
    return (int)nchains;
}

/* A frame of `len` bytes (header included) now fills the first chains: set
 * num_buffers, publish them, and give back the chains it did not need. num_buffers is
 * written before any of them is pushed: a push marks the chain's pages in the dirty
 * log (c_ext/ring.c), and the marks of one chain may reach the log at the next
 * push, so no write to a chain may follow its push. */
static void complete_rx(struct net_engine *e, struct vu_vq *vq, struct net_pair *p,
                        uint32_t nchains, uint32_t niov, uint64_t len, int set_num_buffers)
{
    uint64_t left = len;
    uint32_t used = 0;
    while (used < nchains && (left > 0 || used == 0)) {
        uint64_t n = left < e->rx_lens[used] ? left : e->rx_lens[used];
        e->rx_lens[used] = n; /* from here on: the chain's used length */
        left -= n;
        used++;
    }
    uint16_t num_buffers = (uint16_t)used;
    if (p->port->hdr_len >= NUM_BUFFERS_OFFSET + 2 && (nchains != used || set_num_buffers))
        vu_iov_copy_to(e->rx_iov, niov, NUM_BUFFERS_OFFSET, &num_buffers, 2);
    for (uint32_t i = 0; i < used; i++)
        vu_vq_push(vq, e->rx_heads[i], (uint32_t)e->rx_lens[i]);
    vu_vq_discard(vq, nchains - used);
    p->rx_touched += used;
    p->port->stats.rx_packets++;
    p->port->stats.rx_bytes += len - p->port->hdr_len;
}

static uint64_t rx_need(const struct net_port *port, uint64_t frame_len)
{
    if (frame_len)
        return port->hdr_len + frame_len;
    return port->hdr_len + (port->guest_gso ? NET_MAX_GSO_FRAME : port->max_frame);
}

static uint16_t avail_idx(struct vu_vq *vq)
{
    return __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
}

/* Starved until the guest makes more buffers available than it had. */
static void starve(struct net_pair *p, struct vu_vq *vq, uint32_t nchains)
{
    vu_vq_discard(vq, nchains);
    p->rx_starved = 1;
    p->rx_starved_idx = avail_idx(vq);
    p->port->stats.rx_no_buffers++;
}

static void rx_from_tap(struct net_engine *e, struct net_pair *p)
{
    struct vu_vq *vq = p->rx;
    if (!vq || vq->broken || p->tap_fd < 0)
        return;
    if (p->rx_starved) {
        if (avail_idx(vq) == p->rx_starved_idx)
            return;
        p->rx_starved = 0;
    }
    uint32_t max_chains = p->port->mergeable ? NET_MAX_RX_CHAINS : 1;
    for (int budget = NET_RX_BUDGET; budget > 0; budget--) {
        uint32_t niov;
        uint64_t total;
        int exhausted;
        uint64_t need = rx_need(p->port, 0);
        int nchains = gather_rx(e, vq, need, max_chains, &niov, &total, &exhausted);
        if (nchains < 0)
            return;
        if (nchains == 0) {
            starve(p, vq, 0);
            return;
        }
        if (total < need && total < p->port->hdr_len + p->port->max_frame && exhausted) {
            /* Not room even for a full-size frame without GSO: wait for the guest
             * to post more rather than risk cutting one (the TAP keeps it
             * meanwhile). With room for that but not for a 64 KiB GSO frame, read:
             * a guest that takes GSO frames keeps far more posted. */
            starve(p, vq, (uint32_t)nchains);
            return;
        }
        if (total < p->port->hdr_len) {
            /* The chains we may merge cannot even hold a header (tiny buffers):
             * take the frame off the TAP and drop it, counted. */
            vu_vq_discard(vq, (uint32_t)nchains);
            if (read(p->tap_fd, e->drop_buf, sizeof(e->drop_buf)) <= 0)
                return;
            p->port->stats.rx_dropped++;
            p->port->stats.drop_rx_small_buffers++;
            continue;
        }
        /* One byte of our own after the guest's buffers: a frame that reaches it
         * did not fit (the TAP would otherwise cut it without telling). */
        uint32_t nread = niov;
        if (nread < IOV_MAX && total < need) {
            e->rx_iov[nread].iov_base = e->drop_buf;
            e->rx_iov[nread].iov_len = 1;
            nread++;
        }
        ssize_t r = readv(p->tap_fd, e->rx_iov, (int)(nread > IOV_MAX ? IOV_MAX : nread));
        if (r <= 0) {
            vu_vq_discard(vq, (uint32_t)nchains);
            if (r < 0 && errno != EAGAIN && errno != EINTR) {
                /* The TAP is gone or broken: stop reading it rather than spin on it. */
                vu_vq_record_error(vq, NET_ERR_TAP_IO, 0, (uint64_t)errno);
                p->tap_fd = -1;
            }
            return;
        }
        if ((uint64_t)r > total || ((uint64_t)r == total && nread == niov && total < need)) {
            /* Longer than the buffers (or, without the spare byte, maybe): the TAP
             * cut it. Drop it whole rather than pass on a stump. */
            vu_vq_discard(vq, (uint32_t)nchains);
            p->port->stats.rx_dropped++;
            p->port->stats.drop_rx_truncated++;
            continue;
        }
        complete_rx(e, vq, p, (uint32_t)nchains, niov, (uint64_t)r, 1);
    }
}

/* --- tx --- */

struct tx_ctx {
    struct net_engine *e;
    struct net_pair *p;
    uint64_t now;
};

/* Copy one frame (frame_len bytes of src, after its first src_skip bytes) into pair
 * q's rx buffers (switch mode). */
static void deliver(struct net_engine *e, struct net_pair *q, const struct iovec *src,
                    uint32_t nsrc, uint64_t src_skip, uint64_t frame_len)
{
    struct vu_vq *vq = q->rx;
    struct net_port *port = q->port;
    if (!vq || vq->broken) {
        port->stats.rx_dropped++;
        port->stats.drop_rx_queue_down++;
        return;
    }
    uint32_t niov;
    uint64_t total;
    uint64_t need = rx_need(port, frame_len);
    int exhausted;
    int nchains = gather_rx(e, vq, need, port->mergeable ? NET_MAX_RX_CHAINS : 1, &niov, &total,
                            &exhausted);
    if (nchains <= 0 || total < need) {
        if (nchains > 0)
            vu_vq_discard(vq, (uint32_t)nchains);
        if (nchains >= 0) {
            port->stats.rx_no_buffers++;
            port->stats.rx_dropped++;
            port->stats.drop_rx_no_buffers++;
        }
        return;
    }
    /* No offloads are offered in switch mode: a fresh header, then the frame,
     * copied once from the sender's buffers into the receiver's. */
    uint8_t hdr[12] = {0};
    uint16_t num_buffers = (uint16_t)nchains; /* gathering stopped at `need`: all are used */
    memcpy(hdr + NUM_BUFFERS_OFFSET, &num_buffers, 2);
    vu_iov_copy_to(e->rx_iov, niov, 0, hdr, port->hdr_len);
    iov_to_iov(e->rx_iov, niov, port->hdr_len, src, nsrc, src_skip, frame_len);
    complete_rx(e, vq, q, (uint32_t)nchains, niov, need, 0);
}

/* Copy len bytes from src (after src_skip) to dst (after dst_skip). */
static void iov_to_iov(const struct iovec *dst, uint32_t ndst, uint64_t dst_skip,
                       const struct iovec *src, uint32_t nsrc, uint64_t src_skip, uint64_t len)
{
    uint32_t di = 0, si = 0;
    while (di < ndst && dst_skip >= dst[di].iov_len)
        dst_skip -= dst[di++].iov_len;
    while (si < nsrc && src_skip >= src[si].iov_len)
        src_skip -= src[si++].iov_len;
    while (len > 0 && di < ndst && si < nsrc) {
        uint64_t dn = dst[di].iov_len - dst_skip, sn = src[si].iov_len - src_skip;
        uint64_t n = dn < sn ? dn : sn;
        if (n > len)
            n = len;
        memcpy((uint8_t *)dst[di].iov_base + dst_skip, (const uint8_t *)src[si].iov_base + src_skip,
               (size_t)n);
        len -= n;
        dst_skip += n;
        src_skip += n;
        if (dst_skip == dst[di].iov_len) {
            di++;
            dst_skip = 0;
        }
        if (src_skip == src[si].iov_len) {
            si++;
            src_skip = 0;
        }
    }
}

/* Broadcast or unknown unicast: one copy to every port but src, into its first pair
 * with an rx queue. */
static void flood(struct net_engine *e, const struct net_port *src, const struct iovec *iov,
                  uint32_t niov, uint64_t skip, uint64_t frame_len)
{
    for (uint32_t i = 0; i < e->npairs; i++) {
        struct net_pair *q = &e->pairs[i];
        if (q->port == src || !q->rx)
            continue;
        int first = 1;
        for (uint32_t j = 0; j < i; j++)
            if (e->pairs[j].port == q->port && e->pairs[j].rx)
                first = 0;
        if (first)
            deliver(e, q, iov, niov, skip, frame_len);
    }
}

static void switch_frame(struct tx_ctx *t, const struct vu_chain *c, uint32_t hdr_len,
                         const uint8_t *eth)
{
    struct net_engine *e = t->e;
    uint32_t src = (uint32_t)(t->p - e->pairs);
    uint64_t frame_len = c->out_bytes - hdr_len;
    mac_learn(e, eth + 6, src, t->now);
    int dst = (eth[0] & 1) ? -1 : mac_lookup(e, eth, t->now);
    if (dst >= 0) {
        if (e->pairs[dst].port != t->p->port)
            deliver(e, &e->pairs[dst], c->iov, c->n_out, hdr_len, frame_len);
        return;
    }
    t->p->port->stats.flooded++;
    flood(e, t->p->port, c->iov, c->n_out, hdr_len, frame_len);
}

/* --- announcements (VHOST_USER_SEND_RARP): a frame sent on a guest's behalf --- */

static void announce_lock(struct net_engine *e)
{
    while (__atomic_test_and_set(&e->announce_lock, __ATOMIC_ACQUIRE))
        ; /* held for a copy of a few hundred bytes at most, by one of two threads */
}

static void announce_unlock(struct net_engine *e)
{
    __atomic_clear(&e->announce_lock, __ATOMIC_RELEASE);
}

int net_post_announce(struct net_engine *e, uint32_t port_id, const uint8_t *frame, uint32_t len)
{
    uint64_t one = 1;
    if (len < ETH_HLEN || len > NET_ANNOUNCE_MAX_LEN)
        return -1;
    announce_lock(e);
    uint32_t n = e->nannounce, i = 0;
    while (i < n && e->announce[i].port_id != port_id)
        i++;
    if (i == NET_MAX_PAIRS) {
        announce_unlock(e);
        return -1;
    }
    e->announce[i].port_id = port_id;
    e->announce[i].len = len;
    memcpy(e->announce[i].frame, frame, len);
    if (i == n)
        __atomic_store_n(&e->nannounce, n + 1, __ATOMIC_RELAXED);
    announce_unlock(e);
    /* wake an engine asleep in poll; it looks at nannounce before every pass */
    if (e->stop_fd >= 0 && write(e->stop_fd, &one, sizeof(one)) < 0) {
        /* a busy engine finds it at its next pass anyway */
    }
    return 0;
}

void net_drop_announcements(struct net_engine *e)
{
    announce_lock(e);
    __atomic_store_n(&e->nannounce, 0, __ATOMIC_RELAXED);
    announce_unlock(e);
}

static void mac_forget(struct net_engine *e, const uint8_t *mac)
{
    struct net_mac_entry *b = &e->macs[mac_bucket(mac) * NET_MAC_WAYS];
    for (int i = 0; i < NET_MAC_WAYS; i++)
        if (b[i].valid && memcmp(b[i].mac, mac, 6) == 0)
            b[i].valid = 0;
}

/* As if the port had sent the frame: its source MAC is learnt on the port's first
 * pair with an rx queue (forgotten if the port has none running: frames for it flood
 * until it does), and it goes to every other port (it is a broadcast). */
static void send_announcement(struct net_engine *e, const struct net_announce *a, uint64_t now)
{
    const struct net_port *src = NULL;
    int at = -1;
    for (uint32_t i = 0; i < e->npairs && at < 0; i++) {
        if (e->pairs[i].port->id == a->port_id) {
            src = e->pairs[i].port;
            if (e->pairs[i].rx)
                at = (int)i;
        }
    }
    const uint8_t *mac = a->frame + 6;
    if (at >= 0)
        mac_learn(e, mac, (uint32_t)at, now);
    else
        mac_forget(e, mac);
    struct iovec iov = {.iov_base = (void *)a->frame, .iov_len = a->len};
    flood(e, src, &iov, 1, 0, a->len); /* src NULL (not running here): to every port */
}

static __attribute__((noinline)) void take_announcements(struct net_engine *e, uint64_t now)
{
    struct net_announce todo[NET_MAX_PAIRS];
    announce_lock(e);
    uint32_t n = e->nannounce;
    memcpy(todo, e->announce, n * sizeof(todo[0]));
    __atomic_store_n(&e->nannounce, 0, __ATOMIC_RELAXED);
    announce_unlock(e);
    for (uint32_t i = 0; i < n; i++)
        send_announcement(e, &todo[i], now);
}

static uint32_t tx_handle_chain(void *ctx, struct vu_vq *vq, struct vu_chain *c)
{
    struct tx_ctx *t = ctx;
    struct net_port *port = t->p->port;
    uint32_t hdr_len = port->hdr_len;
    int code = 0;
    uint64_t detail = 0;
    uint8_t hdr[12 + 12]; /* virtio-net header, then destination and source MAC */

    if (c->n_in > 0) {
        code = NET_ERR_TX_WRITABLE;
        detail = c->n_in;
    } else if (c->out_bytes < hdr_len + ETH_HLEN) {
        code = NET_ERR_SHORT_HDR;
        detail = c->out_bytes;
    } else {
        vu_iov_copy_from(c->iov, c->n_out, 0, hdr, hdr_len + 12);
        uint64_t frame = c->out_bytes - hdr_len;
        uint64_t limit = (hdr[1] != VNET_HDR_GSO_NONE && port->host_gso) ? NET_MAX_GSO_FRAME
                                                                           : port->max_frame;
        if (frame > limit) {
            code = NET_ERR_TOO_LONG;
            detail = frame;
        } else if (c->n_out > IOV_MAX) {
            code = NET_ERR_TOO_MANY_IOV;
            detail = c->n_out;
        }
    }
    if (code) {
        vu_vq_record_error(vq, code, c->head, detail);
        port->stats.tx_dropped++;
        port->stats.drop_tx_invalid++;
        return 0;
    }
    if (t->e->switch_mode) {
        switch_frame(t, c, hdr_len, hdr + hdr_len);
    } else if (writev(t->p->tap_fd, c->iov, (int)c->n_out) < 0) {
        if (errno != EAGAIN && errno != ENOBUFS && errno != EIO)
            vu_vq_record_error(vq, NET_ERR_TAP_IO, c->head, (uint64_t)errno);
        port->stats.tx_dropped++;
        port->stats.drop_tx_tap++;
        return 0;
    }
    port->stats.tx_packets++;
    port->stats.tx_bytes += c->out_bytes - hdr_len;
    return 0;
}

static void flush_rx(struct net_engine *e)
{
    for (uint32_t i = 0; i < e->npairs; i++) {
        struct net_pair *p = &e->pairs[i];
        if (p->rx_touched && p->rx) {
            vu_vq_flush_used(p->rx);
            vu_vq_count_batch(p->rx, p->rx_touched);
            vu_vq_signal_if_needed(p->rx);
            p->rx_touched = 0;
        }
    }
}

static uint64_t error_count(struct net_engine *e)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < e->npairs; i++) {
        if (e->pairs[i].rx)
            n += e->pairs[i].rx->err.count;
        if (e->pairs[i].tx)
            n += e->pairs[i].tx->err.count;
    }
    return n;
}

static void drain(int fd)
{
    uint64_t v;
    if (fd >= 0 && read(fd, &v, sizeof(v)) < 0) {
        /* EAGAIN: nothing to drain */
    }
}

/* One pass over every pair; returns 1 if any work was found. */
static int pass(struct net_engine *e)
{
    int work = 0;
    struct tx_ctx t = {.e = e, .now = now_seconds()};
    if (e->switch_mode && __atomic_load_n(&e->nannounce, __ATOMIC_RELAXED))
        take_announcements(e, t.now); /* its frames are signalled with the pass's */
    /* Start each pass at the next pair, so no port's tx always goes first. */
    uint32_t first = e->npairs ? e->passes++ % e->npairs : 0;
    for (uint32_t k = 0; k < e->npairs; k++) {
        struct net_pair *p = &e->pairs[(first + k) % e->npairs];
        if (p->tx && !p->tx->broken) {
            t.p = p;
            uint64_t bad_before = p->tx->stats.bad_chains;
            int n = vu_vq_process(p->tx, tx_handle_chain, &t);
            /* chains the ring walk refused never reach tx_handle_chain: count them too */
            uint64_t bad = p->tx->stats.bad_chains - bad_before;
            p->port->stats.tx_dropped += bad;
            p->port->stats.drop_tx_invalid += bad;
            if (n > 0)
                work = 1;
        }
        if (!e->switch_mode && p->rx && !p->rx->broken) {
            uint16_t before = p->rx->used_idx;
            rx_from_tap(e, p);
            if (p->rx->used_idx != before)
                work = 1;
        }
    }
    flush_rx(e);
    return work;
}

/* Ask for kicks again; returns 1 if something arrived meanwhile. */
static int arm_notifications(struct net_engine *e)
{
    int more = 0;
    for (uint32_t i = 0; i < e->npairs; i++) {
        struct net_pair *p = &e->pairs[i];
        if (p->tx && !p->tx->broken && vu_vq_enable_notification(p->tx) > 0)
            more = 1;
        if (p->rx && !p->rx->broken && p->rx_starved) {
            /* kick me once avail->idx passes where it was when we ran short (our
             * last_avail_idx is behind it: those buffers are not enough) */
            vu_vq_request_kick_at(p->rx, p->rx_starved_idx);
            if (avail_idx(p->rx) != p->rx_starved_idx)
                more = 1; /* buffers came while we asked: rx_from_tap takes them */
        }
    }
    return more;
}

int net_run(struct net_engine *e)
{
    uint64_t errors_at_entry = error_count(e);
    struct pollfd fds[1 + 3 * NET_MAX_PAIRS];
    int is_kick[1 + 3 * NET_MAX_PAIRS];
    struct vu_vq *kicked[1 + 3 * NET_MAX_PAIRS]; /* the queue of each kick fd */
    uint64_t last_work = 0, idle_passes = 0;
    for (;;) {
        if (__atomic_load_n(&e->stop, __ATOMIC_ACQUIRE))
            return VU_RUN_STOPPED;
        int work = pass(e);
        if (error_count(e) != errors_at_entry)
            return VU_RUN_ERRORS;
        if (work) {
            idle_passes = 0;
            continue;
        }
        /* Busy-poll a short while after the last frame before sleeping: a
         * kick and a wake-up cost more than a burst of frames. The guest does
         * not kick meanwhile (avail_event stays behind). The clock is read
         * once per 64 idle passes, not per pass. */
        if (idle_passes++ == 0)
            last_work = now_ns();
        if ((idle_passes & 63) != 0 || now_ns() - last_work < (uint64_t)e->busy_poll_us * 1000)
            if (e->busy_poll_us)
                continue;
        if (arm_notifications(e))
            continue;

        nfds_t n = 0;
        is_kick[n] = 0;
        fds[n++] = (struct pollfd){.fd = e->stop_fd, .events = POLLIN};
        for (uint32_t i = 0; i < e->npairs; i++) {
            struct net_pair *p = &e->pairs[i];
            if (p->tx && !p->tx->broken) {
                is_kick[n] = 1;
                kicked[n] = p->tx;
                fds[n++] = (struct pollfd){.fd = p->tx->kick_fd, .events = POLLIN};
            }
            if (p->rx && !p->rx->broken) {
                is_kick[n] = 1;
                kicked[n] = p->rx;
                fds[n++] = (struct pollfd){.fd = p->rx->kick_fd, .events = POLLIN};
            }
            if (!e->switch_mode && p->rx && !p->rx->broken && !p->rx_starved && p->tap_fd >= 0) {
                is_kick[n] = -(int)i - 1; /* a TAP: readv in the next pass takes its frames */
                fds[n++] = (struct pollfd){.fd = p->tap_fd, .events = POLLIN};
            }
        }
        if (poll(fds, n, -1) < 0 && errno != EINTR)
            return VU_RUN_FD_ERROR;
        if (fds[0].revents) {
            drain(e->stop_fd); /* a stop, or an announcement to send: the next pass sees */
            if (__atomic_load_n(&e->stop, __ATOMIC_ACQUIRE))
                return VU_RUN_STOPPED;
        }
        for (nfds_t i = 1; i < n; i++) {
            if (is_kick[i] > 0 && (fds[i].revents & POLLIN)) {
                drain(fds[i].fd);
                kicked[i]->stats.kicks++;
            }
            if (is_kick[i] < 0 && (fds[i].revents & (POLLERR | POLLHUP | POLLNVAL))) {
                /* TAP deleted under us: stop polling it (logged once) */
                struct net_pair *p = &e->pairs[-is_kick[i] - 1];
                vu_vq_record_error(p->rx, NET_ERR_TAP_IO, 0, (uint64_t)fds[i].revents);
                p->tap_fd = -1;
            }
        }
        idle_passes = 0;
    }
}

void net_clear_macs(struct net_engine *e)
{
    memset(e->macs, 0, sizeof(e->macs));
}

void net_request_stop(struct net_engine *e)
{
    uint64_t one = 1;
    __atomic_store_n(&e->stop, 1, __ATOMIC_RELEASE);
    if (e->stop_fd >= 0 && write(e->stop_fd, &one, sizeof(one)) < 0) {
        /* the flag alone stops it at the next pass */
    }
}

static const struct vu_error_info net_errors[] = {NET_ERRORS(VU_ERROR_INFO)};

const struct vu_error_info *net_error_table(uint32_t *n)
{
    *n = sizeof(net_errors) / sizeof(net_errors[0]);
    return net_errors;
}
