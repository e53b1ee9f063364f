"""A front end that dies: run as a subprocess by test_frontend_crash.py, which SIGKILLs it
(or it SIGKILLs itself at a chosen point) to play a QEMU that crashes.

    python -m tests.integration.crash_frontend SOCKET --phase PHASE [--seed N]
        [--queues N] [--depth N] [--queue-size N] [--ram-mib N] [--span-mib N]

It connects, prints ``CONNECTED`` and then, by phase (``MEMORY`` and ``QUEUES`` are
printed when those steps were acked, so the test can tell where a kill landed):

* ``io``       -- sets up memory and every queue and keeps ``--depth`` random reads and
                  writes (4-64 KiB, 1-3 segments, some indirect) in flight on each queue,
                  forever; prints ``READY`` once the first completions came back. The
                  test kills it at a random moment after that.
* ``setup``    -- the same, but the test kills it at a random moment soon after
                  ``CONNECTED``: usually in the middle of the setup messages.
* ``memtable`` -- negotiates, sends SET_MEM_TABLE, and SIGKILLs itself when it is acked.
* ``queue``    -- memory, then half a queue (size, base, ring addresses, kick fd but no
                  call fd), then SIGKILLs itself.
* ``kick``     -- full setup, fills every queue, publishes, kicks and SIGKILLs itself
                  at once (the daemon is in the middle of the batch).
* ``partial``  -- memory, then the first half of a SET_MEM_TABLE message with its fd
                  attached, then SIGKILLs itself (the daemon holds an incomplete message
                  and the fd that came with it).

Every print is flushed; anything unexpected is a traceback on stderr and exit status 1
(the test tells that apart from the -9 it expects).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from typing import NoReturn

from tests.support.blk import BlkDriver, BlkRequest
from tests.support.frontend import ALL_FEATURES, DriverQueue, FrontEnd, GuestRam, MiB
from vhost.protocol import (
    SetMemTable,
    SetVringAddr,
    SetVringBase,
    SetVringKick,
    SetVringNum,
    encode_message,
)

SECTOR = 512
PHASES = ("io", "setup", "memtable", "queue", "kick", "partial")


def say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("still alive after SIGKILL")


def submit_random(blk: BlkDriver, rng: random.Random, span_sectors: int) -> BlkRequest:
    nbytes = rng.choice((4, 8, 16, 64)) * 1024
    sector = rng.randrange(0, span_sectors - nbytes // SECTOR) & ~7
    segs = rng.choice((1, 2, 3))
    indirect = rng.random() < 0.25
    if rng.random() < 0.5:
        return blk.submit_write(sector, rng.randbytes(nbytes), segs=segs, indirect=indirect)
    return blk.submit_read(sector, nbytes, segs=segs, indirect=indirect)


def fill(blk: BlkDriver, depth: int, rng: random.Random, span_sectors: int) -> None:
    while len(blk.inflight) < depth and blk.queue.num_free >= 5:
        submit_random(blk, rng, span_sectors)


def stream(drivers: list[BlkDriver], depth: int, rng: random.Random, span_sectors: int) -> None:
    """Keep ``depth`` requests in flight on every queue until killed."""
    completed = 0
    ready = False
    while True:
        for blk in drivers:
            old = blk.queue.avail_idx
            fill(blk, depth, rng, span_sectors)
            blk.queue.publish()
            if blk.queue.avail_idx != old and blk.queue.need_kick(old):
                blk.queue.kick()
        progressed = 0
        for blk in drivers:
            progressed += blk.collect()
        if not progressed:
            for blk in drivers:
                blk.queue.enable_cb()
                progressed += blk.collect()
        if not progressed:
            drivers[0].queue.wait_call(0.05)
            continue
        completed += progressed
        if not ready:
            ready = True
            say("READY")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("socket")
    ap.add_argument("--phase", choices=PHASES, default="io")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--ram-mib", type=int, default=16)
    ap.add_argument("--span-mib", type=int, default=16, help="I/O goes to the first N MiB")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    span = args.span_mib * MiB // SECTOR

    ram = GuestRam(args.ram_mib * MiB, 2)
    fe = FrontEnd(args.socket, ram)
    fe.connect()
    say("CONNECTED")
    fe.negotiate(ALL_FEATURES)
    if args.phase == "partial":
        regions = ram.regions()
        msg, fds = encode_message(SetMemTable(tuple(regions), tuple(ram.fd for _ in regions)))
        fe.raw_send(msg[: len(msg) // 2], fds)
        die()
    fe.set_mem_table()
    say("MEMORY")
    if args.phase == "memtable":
        die()
    if args.phase == "queue":
        _half_queue(fe, ram)
        die()
    drivers = [BlkDriver(fe.setup_queue(i, args.queue_size)) for i in range(args.queues)]
    say("QUEUES")
    if args.phase == "kick":
        for blk in drivers:
            fill(blk, args.depth, rng, span)
            blk.publish_and_kick()
        die()
    stream(drivers, args.depth, rng, span)


def _half_queue(fe: FrontEnd, ram: GuestRam) -> None:
    q = DriverQueue(ram, 64)
    fe.request_ack(SetVringNum(0, 64))
    fe.request_ack(SetVringBase(0, 0))
    fe.request_ack(
        SetVringAddr(
            index=0,
            flags=0,
            desc_user_addr=ram.uva_of(q.desc_gpa),
            used_user_addr=ram.uva_of(q.used_gpa),
            avail_user_addr=ram.uva_of(q.avail_gpa),
            log_guest_addr=0,
        )
    )
    fe.request_ack(SetVringKick(0, q.kick_fd))


if __name__ == "__main__":
    main()
