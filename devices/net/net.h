/*
 * net.h - virtio-net data path: one engine thread serves a set of queue pairs,
 * moving frames between tx rings and TAP queues (tap mode) or between the
 * ports of a learning L2 switch (switch mode). No Python per packet: Python
 * builds the engine from the active queues and (re)starts it when they change.
 */
#ifndef VU_NET_H
#define VU_NET_H

#include <stdint.h>

#include "vu.h"

#define NET_MAX_PAIRS 64          /* queue pairs one engine serves */
#define NET_MAX_RX_CHAINS 64      /* rx chains merged into one packet */
#define NET_MAX_GSO_FRAME 65550   /* largest frame with segmentation offload */
#define NET_RX_BUDGET 256         /* packets read from a TAP queue per pass */
#define NET_MAC_BUCKETS 1024      /* switch MAC table: buckets x ways entries */
#define NET_MAC_WAYS 4
#define NET_ANNOUNCE_MAX_LEN 64   /* an announcement frame (QEMU's and ours: 60 bytes) */

/* Frame errors (the frame is dropped and counted, the port goes on): rows as in vu.h. */
#define NET_ERRORS(X) \
    X(NET_ERR_SHORT_HDR, -40, VALUE, "tx chain shorter than the virtio-net header and an Ethernet header") \
    X(NET_ERR_TOO_LONG, -41, VALUE, "tx frame longer than the MTU (or the GSO limit)") \
    X(NET_ERR_TX_WRITABLE, -42, VALUE, "tx chain has device-writable buffers") \
    X(NET_ERR_RX_READABLE, -43, VALUE, "rx chain has device-readable buffers") \
    X(NET_ERR_TAP_IO, -44, ERRNO, "TAP I/O error") \
    X(NET_ERR_TOO_MANY_IOV, -45, VALUE, "tx frame needs more iovecs than writev takes")

enum net_error_code { NET_ERRORS(VU_ERROR_ENUM) };

/* A port's counters: written by its engine thread only, read without a lock (see
 * struct vu_stats). Every drop is counted once in tx_dropped or rx_dropped and once
 * under its reason (drop_*). */
struct net_stats {
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_dropped;      /* bad chains, oversize, TAP refused */
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t rx_dropped;      /* switch: no rx buffers at the destination */
    uint64_t rx_no_buffers;   /* times the guest had no rx buffer when a frame was ready */
    uint64_t flooded;         /* switch: frames sent to every other port */
    uint64_t drop_tx_invalid;      /* tx chain refused by the ring walk or the frame checks */
    uint64_t drop_tx_tap;          /* the TAP did not take the frame (full, down, error) */
    uint64_t drop_rx_no_buffers;   /* switch: no rx buffers for the frame at this port */
    uint64_t drop_rx_queue_down;   /* switch: this port's rx queue is not running */
    uint64_t drop_rx_small_buffers; /* TAP: the rx buffers cannot hold even a header */
    uint64_t drop_rx_truncated;    /* TAP: the frame was longer than the rx buffers */
};

struct net_port {
    uint32_t id;              /* switch port number */
    uint32_t hdr_len;         /* 12 (VERSION_1 or MRG_RXBUF) or 10 */
    uint32_t max_frame;       /* largest frame without GSO: MTU + Ethernet + VLAN */
    int mergeable;            /* MRG_RXBUF negotiated */
    int guest_gso;            /* guest takes GSO frames (GUEST_TSO4/6 or UFO) */
    int host_gso;             /* guest may send GSO frames (HOST_TSO4/6 or UFO) */
    struct net_stats stats;
};

struct net_pair {
    struct net_port *port;
    struct vu_vq *rx;         /* NULL while that queue is not active */
    struct vu_vq *tx;
    int tap_fd;               /* tap mode: this pair's TAP queue; -1 in switch mode */
    int rx_starved;           /* waiting for rx buffers (tap mode) */
    uint16_t rx_starved_idx;  /* avail->idx when it started waiting */
    uint32_t rx_touched;      /* used entries pushed in this pass, not yet flushed */
};

struct net_mac_entry {
    uint8_t mac[6];
    uint16_t valid;
    uint32_t pair;            /* index into the engine's pairs: the port's first pair */
    uint64_t seen;            /* seconds (CLOCK_MONOTONIC) when last learnt */
};

/* A frame a port sends on its guest's behalf (the RARP of VHOST_USER_SEND_RARP),
 * waiting for the engine thread. */
struct net_announce {
    uint32_t port_id;
    uint32_t len;
    uint8_t frame[NET_ANNOUNCE_MAX_LEN];
};

struct net_engine {
    uint32_t npairs;
    int switch_mode;
    uint32_t mac_age;         /* seconds a learnt MAC stays valid */
    uint32_t busy_poll_us;    /* keep polling this long after the last frame */
    int stop_fd;              /* written to stop the engine, or to wake it for an announcement */
    int stop;
    uint32_t passes;
    struct net_pair pairs[NET_MAX_PAIRS];
    struct net_mac_entry macs[NET_MAC_BUCKETS * NET_MAC_WAYS];
    /* scratch */
    struct iovec rx_iov[VU_MAX_CHAIN_IOV];
    uint32_t rx_heads[NET_MAX_RX_CHAINS];
    uint64_t rx_lens[NET_MAX_RX_CHAINS];
    struct vu_chain rx_chain;
    uint8_t drop_buf[NET_MAX_GSO_FRAME + 12];
    /* Announcements posted by net_post_announce (the control thread) and taken by the
     * engine thread at its next pass: at most one per port (a newer one replaces it),
     * and a switch has at most NET_MAX_PAIRS ports. The lock guards only these; they
     * sit apart from what a pass touches. */
    uint8_t announce_lock;
    uint32_t nannounce;       /* also read without the lock: is there anything? */
    struct net_announce announce[NET_MAX_PAIRS];
};

int net_run(struct net_engine *e);
void net_request_stop(struct net_engine *e);
void net_clear_macs(struct net_engine *e);
int net_switch_lookup(struct net_engine *e, const uint8_t *mac);
uint32_t net_mac_table_size(const struct net_engine *e);
int net_post_announce(struct net_engine *e, uint32_t port_id, const uint8_t *frame, uint32_t len);
void net_drop_announcements(struct net_engine *e);
const struct vu_error_info *net_error_table(uint32_t *n);

#endif
