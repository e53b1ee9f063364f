"""Every bound on what a front end or a guest controls in the core, named once.

A hostile or broken front end (the socket) or guest (the rings) must not be able to make
the daemon allocate without bound or block its event loop. Each quantity they control is
capped by one constant here; the modules that enforce a cap import it from here (the C
ones are defined in c_ext/vu.h and read back through the compiled module, so there is
still one definition). A device names its own bounds the same way, in its own
``limits`` module (devices/blk/limits.py, devices/net/limits.py).
tests/unit/test_limits.py tries each at the bound and one past it.

What is bounded, and how:

=========================================  ==========  =============================================
bound                                      value       where it is enforced
=========================================  ==========  =============================================
MAX_PAYLOAD_SIZE (message body)            4096 B      protocol: larger header size -> drop
MAX_BUFFERED_BYTES                         8204 B      protocol: bytes held without a whole message
MAX_FDS_PER_MESSAGE                        8           protocol + server (ancillary buffer size)
MAX_CONFIG_SIZE                            256 B       protocol: GET/SET_CONFIG size field
MEM_TABLE_MAX_REGIONS                      8           protocol: SET_MEM_TABLE region count
MAX_MEM_SLOTS (regions mapped)             256         memory.c slots; ADD_MEM_REG past it fails
MAX_QUEUE_SIZE (ring entries)              1024        virtqueue/ring.c: SET_VRING_NUM
  chain length                             queue size  ring.c: descriptors per chain (loops too)
  indirect table entries                   queue size  ring.c
  requests in flight per queue             queue size  one ring; the inflight region is sized by it
MAX_CHAIN_IOV                              2048        ring.c: iovecs per chain (region splits)
MAX_READ_BYTES (Chain.read)                1 MiB       chains: what read() copies without a size
MAX_LOG_BYTES (dirty log mapped)           1 GiB       dirtylog: SET_LOG_BASE size (covers 32 TiB)
=========================================  ==========  =============================================

Time is bounded too: a queue worker checks for a stop request between chains, so a
front end's GET_VRING_BASE or a memory change waits for at most one request in each
queue, never for a whole ring of them.
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

# --- the chain API (Python devices) -----------------------------------------------------
#: a chain's lengths are the guest's (overlapping descriptors can claim more than its
#: memory): Chain.read() without a size copies at most this much
MAX_READ_BYTES: Final = 1 << 20

# --- live migration ---------------------------------------------------------------------
#: the dirty log SET_LOG_BASE may make us map: one bit per 4 KiB page, so 1 GiB covers
#: 32 TiB of guest-physical address space
MAX_LOG_BYTES: Final = 1 << 30
