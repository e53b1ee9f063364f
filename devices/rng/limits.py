"""Every bound on what a front end or a guest controls in the virtio-rng device, named
once (the core's are in vhost/limits.py; the table has the same shape).

=========================================  ==========  =============================================
bound                                      value       where it is enforced
=========================================  ==========  =============================================
MAX_CHAIN_BYTES                            65536 B     devices/rng: bytes written into one chain
MAX_BATCH                                  64          devices/rng: chains taken per kick
=========================================  ==========  =============================================

A driver may offer buffers of any size (a chain can describe gigabytes); the device writes
at most MAX_CHAIN_BYTES into each, which virtio allows (the used length says how much), so
memory and time per request stay bounded whatever the guest asks.
"""

from __future__ import annotations

from typing import Final

MAX_CHAIN_BYTES: Final = 64 * 1024
MAX_BATCH: Final = 64
