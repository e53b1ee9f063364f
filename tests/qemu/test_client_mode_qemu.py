"""Client mode end to end: QEMU 7.2 listens (``-chardev socket,server=on,wait=off``),
``vhost-user-blk --client`` connects, and each side restarts on its own under guest
I/O (docs/client-mode.md).

One test, two boots (CI time):

1. The daemon starts first, before QEMU's socket exists, and backs off until QEMU
   listens. (QEMU 7.2's vhost-user-blk waits in device realize for its back end even
   with ``wait=off``, so the guest boots only once the daemon is connected.) The guest
   writes 64 KiB blocks with O_DIRECT in passes over a 1 MiB region, each block read
   back and compared (``OK pass block`` on the console), and echoes any kernel message
   about an I/O error. While that runs the daemon is SIGKILLed and started again: QEMU
   goes back to listening, the new daemon connects, QEMU runs the init sequence again
   and hands over its inflight region, and the guest's I/O resumes with no error.
2. Then QEMU is SIGKILLed in the middle of a pass; its socket file is left behind
   (stale), the daemon retries, and a new QEMU on the same path gets the same daemon
   process, which connects to it. The host has checked the image meanwhile (every
   block is wholly some pass's content, no block is behind what the guest saw
   complete); the second guest reads the region back through the daemon (its md5 must
   be the host's) and writes a pass of its own, verified in the guest and on the host.

The daemon's log must show every connection, at most one "cannot connect" line per
outage, and a clean exit on SIGTERM while it retries (QEMU gone at the end).

Run: ``python -m pytest tests/qemu/test_client_mode_qemu.py -q -m qemu -s``.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest

from tests.guest import qemu
from tests.guest.workloads import MiB, pattern
from tests.support.daemon import Daemon, Ready

from .harness import BootGuest, StartDaemon, needs_qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

IMG_SIZE = 64 * MiB
BLOCK = 64 * 1024
BLOCKS = 16  # the region the guest writes: 1 MiB at offset 0
HEADER = "pass {:06d} block {:06d}\n"  # what starts each block, 25 bytes
BODY = pattern(1313, BLOCK - len(HEADER.format(0, 0)))
NEW_PASS = 900  # the second guest's own pass

BOOT_TIMEOUT = 90.0  # QEMU start until the first verified block
RESUME_TIMEOUT = 30.0  # daemon restart until the guest verified blocks again
GUEST_TIMEOUT = 90.0

OK_RE = re.compile(r"^OK (\d+) (\d+)$", re.MULTILINE)
FAIL_RE = re.compile(r"^(BAD|ERR|KMSG|FAIL).*$", re.MULTILINE)
KMSG_BAD = "I/O error|blk_update_request|not a head|Call Trace|blocked for more|BUG:|Oops"
CANNOT_CONNECT = "client: cannot connect to "
CONNECTED_AFTER = re.compile(r"client: connected to .* after (\d+) failed attempts")

# guest helpers: block I of pass P is HEADER(P, I) + BODY; write it, read it back, compare
_BLOCK_SH = r"""
DEV=/dev/vda
[ -b $DEV ] || { echo "FAIL: no $DEV"; ls /sys/block; exit 1; }
make_block() { { printf 'pass %06d block %06d\n' $1 $2; cat /data/body; } > /tmp/blk; }
write_verify() {
    make_block $1 $2
    dd if=/tmp/blk of=$DEV bs=64k seek=$2 oflag=direct conv=notrunc 2>/dev/null \
        || { echo "ERR write $1 $2"; return 1; }
    dd if=$DEV of=/tmp/back bs=64k skip=$2 count=1 iflag=direct 2>/dev/null \
        || { echo "ERR read $1 $2"; return 1; }
    cmp -s /tmp/blk /tmp/back || { echo "BAD $1 $2"; return 1; }
    echo "OK $1 $2"
}
"""

# boot 1: passes until QEMU is killed; the kernel's complaints echoed as they come
WRITER = (
    _BLOCK_SH
    + r"""
grep -iE '@KMSG@' /dev/kmsg | while read -r l; do echo "KMSG $l"; done &
p=1
while [ $p -le 10000 ]; do
    i=0
    while [ $i -lt @BLOCKS@ ]; do write_verify $p $i; i=$((i + 1)); done
    p=$((p + 1))
done
echo "FAIL: never killed"
exit 1
"""
)

# boot 2: the region as the host saw it, then a pass of its own
CHECKER = (
    _BLOCK_SH
    + r"""
dd if=$DEV of=/tmp/region bs=64k count=@BLOCKS@ iflag=direct 2>/dev/null || echo "ERR read region"
result region_md5 "$(md5sum < /tmp/region | cut -d' ' -f1)"
bad=0
i=0
while [ $i -lt @BLOCKS@ ]; do write_verify @NEW@ $i || bad=$((bad + 1)); i=$((i + 1)); done
result rewrite_bad $bad
result kmsg_bad "$(dmesg | grep -ciE '@KMSG@')"
"""
)


def _script(template: str) -> str:
    text = ". /lib/vhtest.sh\n" + template
    return (
        text.replace("@KMSG@", KMSG_BAD)
        .replace("@BLOCKS@", str(BLOCKS))
        .replace("@NEW@", str(NEW_PASS))
    )


def block_content(pass_: int, index: int) -> bytes:
    return HEADER.format(pass_, index).encode() + BODY


def region_passes(image: Path) -> list[int]:
    """The pass each block of the region holds (0: never written); fails on a block
    that is not wholly one pass's content for that very block."""
    with open(image, "rb") as f:
        data = f.read(BLOCKS * BLOCK)
    passes: list[int] = []
    for j in range(BLOCKS):
        blk = data[j * BLOCK : (j + 1) * BLOCK]
        if blk == bytes(BLOCK):
            passes.append(0)
            continue
        m = re.match(rb"pass (\d{6}) block (\d{6})\n", blk)
        assert m and int(m[2]) == j, f"block {j} holds {blk[:40]!r}"
        assert blk == block_content(int(m[1]), j), f"block {j}: {blk[:25]!r} with a bad body"
        passes.append(int(m[1]))
    return passes


def last_ok(text: str) -> tuple[int, int]:
    """(pass, block) of the last block the guest saw written and read back."""
    oks = OK_RE.findall(text)
    assert oks, text[-2000:]
    return int(oks[-1][0]), int(oks[-1][1])


def wait_oks(g: qemu.Guest, more_than: int, timeout: float, what: str) -> int:
    """Wait until the console has more than ``more_than`` OK lines; fail at once on a
    BAD/ERR/KMSG line. Returns the count."""
    deadline = time.monotonic() + timeout
    while True:
        text = g.output()
        if m := FAIL_RE.search(text):
            raise AssertionError(f"{what}: the guest said {m[0]!r}\n{text[-3000:]}")
        n = len(OK_RE.findall(text))
        if n > more_than:
            return n
        if not g.running():
            raise AssertionError(f"{what}: QEMU exited ({g.returncode})\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {n} blocks after {timeout:.0f}s\n{text[-3000:]}")
        time.sleep(0.05)


def qemu_server_args(sock: Path) -> list[str]:
    return [
        "-chardev",
        f"socket,id=c0,path={sock},server=on,wait=off",
        "-device",
        "vhost-user-blk-pci,chardev=c0,num-queues=1",
    ]


def test_blk_client_mode_survives_daemon_and_qemu_restarts(
    tmp_path: Path, blk_daemon: StartDaemon, guests: BootGuest
) -> None:
    sock = tmp_path / "qemu-vub.sock"  # QEMU's: the daemon connects to it
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMG_SIZE)
    files = {"/data/body": BODY}

    def start_daemon(ready: Ready) -> Daemon:
        return blk_daemon("-v", image=image, socket_path=sock, client=True, ready=ready)

    # --- the daemon first: it backs off until QEMU listens ------------------------------
    t0 = time.monotonic()
    first = start_daemon(Ready.CONNECTING)
    assert not sock.exists()
    g1 = guests(_script(WRITER), qemu_server_args(sock), name="writer", files=files)
    first.wait_log(f"{first.connection(1)}: front end connected", 1, 30)
    n = wait_oks(g1, 3, BOOT_TIMEOUT, "first boot")
    t_boot = time.monotonic() - t0

    # --- the daemon killed and started again under I/O ----------------------------------
    t_kill = time.monotonic()
    first.kill9()
    first.checked = True  # killed on purpose
    assert sock.exists(), "QEMU's socket went with the daemon"
    second = start_daemon(Ready.FIRST_CONNECTION)  # QEMU listens again: connects at once
    second.wait_log(re.compile(r"#1/vq0: started \(size \d+, base \d+\)"), 1, 30)
    at_restart = len(OK_RE.findall(g1.output()))
    wait_oks(g1, max(n, at_restart) + 5, RESUME_TIMEOUT, "after the daemon restart")
    t_resumed = time.monotonic() - t_kill
    assert "inflight region" in second.log_text()  # QEMU handed over what it kept

    # --- QEMU killed in the middle of a pass, the daemon stays ---------------------------
    g1.kill()
    console1 = g1.output()
    done_pass, done_block = last_ok(console1)
    second.wait_connection_closed(1)
    second.wait_log(CANNOT_CONNECT)
    assert sock.exists()  # a killed QEMU leaves its socket file: connect is refused
    assert "Connection refused" in second.log_lines(CANNOT_CONNECT)[0]
    passes = region_passes(image)
    for j, q in enumerate(passes):
        # nothing is older than what the guest saw complete (the console may lag behind
        # the guest, never run ahead of it)
        floor = done_pass if j <= done_block else done_pass - 1
        assert q >= floor, (j, q, done_pass, done_block, passes)
    with open(image, "rb") as f:
        region_md5 = hashlib.md5(f.read(BLOCKS * BLOCK)).hexdigest()

    # --- a new QEMU on the same path: the same daemon connects to it --------------------
    t_qemu = time.monotonic()
    g2 = guests(_script(CHECKER), qemu_server_args(sock), name="checker", files=files)
    rc, text = g2.run_workload(timeout=GUEST_TIMEOUT)
    t_second = time.monotonic() - t_qemu
    assert rc == 0, f"second guest failed (rc={rc}):\n{text[-3000:]}"
    res = qemu.results(text)
    assert res.get("region_md5") == region_md5, (res, passes)
    assert res.get("rewrite_bad") == "0" and res.get("kmsg_bad") == "0", res
    assert not FAIL_RE.search(text), text[-3000:]
    assert region_passes(image) == [NEW_PASS] * BLOCKS

    # --- the daemon's side --------------------------------------------------------------
    second.wait_connection_closed(2)  # the second QEMU powered off
    log = second.log_text()
    after = [int(m[1]) for m in CONNECTED_AFTER.finditer(log)]
    assert len(after) == 1 and after[0] >= 1, log  # to the second QEMU, after retries
    # one line for each outage (QEMU killed, QEMU powered off), whatever the attempts
    second.wait_log(CANNOT_CONNECT, 2)
    assert second.log_count(CANNOT_CONNECT) == 2, log
    assert not [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln], log
    second.check_clean_exit()  # SIGTERM while it retries
    print(
        f"\n[client mode] boot {t_boot:.1f}s, I/O resumed {t_resumed:.2f}s after the daemon "
        f"kill, QEMU killed at pass {done_pass} block {done_block} (region passes "
        f"{sorted(set(passes))}), second QEMU done in {t_second:.1f}s, "
        f"{after[0]} failed attempts before it"
    )
