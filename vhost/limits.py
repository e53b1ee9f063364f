"""Every bound on what a front end or a guest controls, named once.

A hostile or broken front end (the socket) or guest (the rings) must not be able to make
the daemon allocate without bound or block its event loop. Each quantity they control is
capped by one constant here; the modules that enforce a cap import it from here (the C
ones are defined in c_ext/vu.h or c_ext/net.h and read back through the compiled module,
so there is still one definition). tests/unit/test_limits.py tries each at the bound and
one past it.

What is bounded, and how:

=========================================  ==========  =============================================
bound                                      value       where it is enforced
=========================================  ==========  =============================================
MAX_PAYLOAD_SIZE (message body)            4096 B      protocol: larger header size -> drop
MAX_BUFFERED_BYTES                         8204 B      protocol: bytes held without a whole message
MAX_FDS_PER_MESSAGE                        8           protocol + server (ancillary buffer size)
MAX_CONFIG_SIZE                            256 B       protocol: GET/SET_CONFIG size field
MEM_TABLE_MAX_REGIONS                      8           protocol: SET_MEM_TABLE region count
MAX_MEM_SLOTS (regions mapped)             32          memory.c slots; ADD_MEM_REG past it fails
MAX_QUEUE_SIZE (ring entries)              1024        virtqueue/ring.c: SET_VRING_NUM
  chain length                             queue size  ring.c: descriptors per chain (loops too)
  indirect table entries                   queue size  ring.c
  requests in flight per queue             queue size  one ring; the inflight region is sized by it
MAX_CHAIN_IOV                              2048        ring.c: iovecs per chain (region splits)
MAX_BLK_QUEUES                             64          devices/blk: --num-queues (queue threads)
MAX_REQUEST_BYTES (blk data)               126 MiB     blk.c: SEG_MAX x SIZE_MAX, as advertised
MAX_DISCARD_SEG / _WRITE_ZEROES            32          blk.c: segments per request
MAX_DISCARD_SECTORS / _WZ                  2^22 - 1    blk.c: sectors per segment
MAX_ENGINE_PAIRS (net)                     64          net.c: queue pairs one engine serves
MAC table NET_MAC_BUCKETS x NET_MAC_WAYS   1024 x 4    net.c: learnt MACs; oldest way replaced
NET_RX_BUDGET                              256         net.c: frames read from a TAP per pass
=========================================  ==========  =============================================

Time is bounded too: a queue worker checks for a stop request between chains, so a
front end's GET_VRING_BASE or a memory change waits for at most one request in each
queue (at most MAX_REQUEST_BYTES of disk I/O), never for a whole ring of them.
"""

from __future__ import annotations

from typing import Final

from vhost._native import lib

# --- the socket (vhost-user messages) ---------------------------------------------------
MAX_PAYLOAD_SIZE: Final = 4096
MAX_FDS_PER_MESSAGE: Final = 8
MAX_CONFIG_SIZE: Final = 256
MEM_TABLE_MAX_REGIONS: Final = 8
#: any valid message fits in header + MAX_PAYLOAD_SIZE; twice that buffered without a
#: complete message can only be a hostile peer (12 is the header size)
MAX_BUFFERED_BYTES: Final = 12 + 2 * MAX_PAYLOAD_SIZE

# --- guest memory and rings (C) ---------------------------------------------------------
MAX_MEM_SLOTS: Final[int] = lib.VU_MAX_REGIONS
MAX_QUEUE_SIZE: Final[int] = lib.VU_MAX_QUEUE_SIZE
MAX_CHAIN_IOV: Final[int] = lib.VU_MAX_CHAIN_IOV

# --- virtio-blk -------------------------------------------------------------------------
MAX_BLK_QUEUES: Final = 64
SIZE_MAX: Final = 1 << 20      # bytes per data segment (config space size_max)
SEG_MAX: Final = 126           # QEMU's default queue size (128) minus header and status
MAX_REQUEST_BYTES: Final = SEG_MAX * SIZE_MAX
MAX_DISCARD_SECTORS: Final = (1 << 22) - 1
MAX_DISCARD_SEG: Final = 32
MAX_WRITE_ZEROES_SECTORS: Final = (1 << 22) - 1
MAX_WRITE_ZEROES_SEG: Final = 32

# --- virtio-net (C) ---------------------------------------------------------------------
MAX_ENGINE_PAIRS: Final[int] = lib.NET_MAX_PAIRS
NET_MAC_BUCKETS: Final[int] = lib.NET_MAC_BUCKETS
NET_MAC_WAYS: Final[int] = lib.NET_MAC_WAYS
NET_RX_BUDGET: Final[int] = lib.NET_RX_BUDGET
