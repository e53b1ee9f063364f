"""Every bound on what a front end or a guest controls in the virtio-net device, named
once (the core's are in vhost/limits.py; the table has the same shape). The C ones are
defined in devices/net/net.h and read back through the compiled module.

=========================================  ==========  =============================================
bound                                      value       where it is enforced
=========================================  ==========  =============================================
MAX_QUEUE_PAIRS                            16          devices/net: --num-queues per port
MAX_ENGINE_PAIRS (net)                     64          net.c: queue pairs one engine serves
MAC table NET_MAC_BUCKETS x NET_MAC_WAYS   1024 x 4    net.c: learnt MACs; oldest way replaced
NET_RX_BUDGET                              256         net.c: frames read from a TAP per pass
=========================================  ==========  =============================================
"""

from __future__ import annotations

from typing import Final

from devices.net._net import lib

MAX_QUEUE_PAIRS: Final = 16
MAX_ENGINE_PAIRS: Final[int] = lib.NET_MAX_PAIRS
NET_MAC_BUCKETS: Final[int] = lib.NET_MAC_BUCKETS
NET_MAC_WAYS: Final[int] = lib.NET_MAC_WAYS
NET_RX_BUDGET: Final[int] = lib.NET_RX_BUDGET
