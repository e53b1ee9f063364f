"""cffi build script for ``devices.net._net``: the virtio-net engine (net.c: tx/rx,
TAP, switch) compiled with the core's ring walker (c_ext/build.py says how and why)."""

from __future__ import annotations

import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the core's build script: its cdef, sources and make_device_ffi (run, not imported:
# c_ext/ is not a package, and setuptools runs this file the same way)
core = runpy.run_path(str(HERE.parents[1] / "c_ext" / "build.py"))

CDEF = (
    core["error_defines"](HERE / "net.h", "NET_ERRORS")
    + """
#define NET_MAX_PAIRS ...
#define NET_MAC_BUCKETS ...
#define NET_MAC_WAYS ...
#define NET_RX_BUDGET ...
#define NET_ANNOUNCE_MAX_LEN ...
struct net_stats {
    uint64_t tx_packets; uint64_t tx_bytes; uint64_t tx_dropped; uint64_t rx_packets;
    uint64_t rx_bytes; uint64_t rx_dropped; uint64_t rx_no_buffers; uint64_t flooded;
    uint64_t drop_tx_invalid; uint64_t drop_tx_tap; uint64_t drop_rx_no_buffers;
    uint64_t drop_rx_queue_down; uint64_t drop_rx_small_buffers; uint64_t drop_rx_truncated;
};
struct net_port {
    uint32_t id; uint32_t hdr_len; uint32_t max_frame; int mergeable; int guest_gso;
    int host_gso; struct net_stats stats;
};
struct net_pair {
    struct net_port *port; struct vu_vq *rx; struct vu_vq *tx; int tap_fd; int rx_starved;
    uint16_t rx_starved_idx; uint32_t rx_touched;
};
struct net_engine {
    uint32_t npairs; int switch_mode; uint32_t mac_age; uint32_t busy_poll_us; int stop_fd;
    int stop;
    struct net_pair pairs[];
    ...;
};
int net_run(struct net_engine *e);
void net_request_stop(struct net_engine *e);
void net_clear_macs(struct net_engine *e);
int net_switch_lookup(struct net_engine *e, const uint8_t *mac);
uint32_t net_mac_table_size(const struct net_engine *e);
int net_post_announce(struct net_engine *e, uint32_t port_id, const uint8_t *frame, uint32_t len);
void net_drop_announcements(struct net_engine *e);
const struct vu_error_info *net_error_table(uint32_t *n);
"""
)

ffibuilder = core["make_device_ffi"]("devices.net._net", CDEF, HERE / "net.h", [HERE / "net.c"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
