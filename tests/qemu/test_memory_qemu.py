"""Guest memory with real QEMU 7.2 guests (TCG): a DIMM hot-plugged under I/O.

``test_dimm_hotplug_under_io``: the guest boots with ``-m 512M,slots=8,maxmem=2G``
(RAM a shared memfd) and our ``vhost-user-blk``; while it runs verified O_DIRECT I/O,
the test plugs a 256 MiB memfd DIMM over QMP (``object-add memory-backend-memfd``,
``device_add pc-dimm``). QEMU hands the daemon the new region with ADD_MEM_REG (its
log shows the DIMM's gpa and size); the guest onlines the memory
(``memhp_default_state=online``, and ``echo online`` for any block left offline), then
a small static program (``DIMM_IO``, compiled here) takes pages of its own that
/proc/self/pagemap places inside the DIMM's guest-physical range and does O_DIRECT
reads and writes with them as the buffers, so the daemon must translate descriptor
addresses in the new region: the bytes on the host's image and the ones read back are
checked. The I/O that ran across the hot-plug must verify too.

Guest RAM on hugetlbfs is tested by the hugepages variants of the blk and net tests
(``tests/qemu/test_blk_qemu.py::test_vhost_user_blk_guest[hugepages]``,
``tests/qemu/test_net_harness.py::test_guest_to_host[vhost-user-net-hugepages]``).

Run: ``python -m pytest tests/qemu/test_memory_qemu.py -q -s``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.guest.workloads import MiB, pattern

from .harness import StartDaemon, blk_qemu_args, needs_qemu
from .migration import Qmp

pytestmark = [pytest.mark.qemu, needs_qemu]

IMG_SIZE = 64 * MiB
GUEST_TIMEOUT = 120.0
DIMM_SIZE = 256 * MiB
DIMM_IO_OFF = 8 * MiB  # where the DIMM-buffer I/O goes on the disk ...
DIMM_IO_PAGES = 1024  # ... 4 MiB of it, 16 pages per request
BG_OFF = 32 * MiB  # the background job's 256 KiB
BG_DATA = pattern(70, 256 << 10)

# O_DIRECT I/O whose buffers are pages of this process in a guest-physical range.
DIMM_IO = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#define PG 4096
#define PER_REQ 16
#define ALLOC (32u << 20)

/* word i of the disk, the same as the test's expected_words() */
static uint64_t word(uint64_t i)
{
    uint64_t z = i + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* dimm_io DEV DISK_OFFSET PAGES LO HI: write PAGES pages to DEV at DISK_OFFSET from
 * pages of ours whose guest-physical address is in [LO, HI) (hex), read them back
 * into other such pages and compare. */
int main(int argc, char **argv)
{
    if (argc != 6)
        return 64;
    uint64_t off = strtoull(argv[2], NULL, 0), lo = strtoull(argv[4], NULL, 16);
    uint64_t hi = strtoull(argv[5], NULL, 16);
    size_t want = strtoul(argv[3], NULL, 0);
    uint8_t *buf = mmap(NULL, ALLOC, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buf == MAP_FAILED || mlock(buf, ALLOC) != 0)
        return 65;
    memset(buf, 1, ALLOC); /* our own pages, no shared zero page */
    int pm = open("/proc/self/pagemap", O_RDONLY);
    if (pm < 0)
        return 66;
    static uint8_t *in[ALLOC / PG];
    size_t n = 0, other = 0;
    uint64_t min_pa = UINT64_MAX, max_pa = 0;
    for (size_t i = 0; i < ALLOC / PG; i++) {
        uint64_t e;
        uintptr_t va = (uintptr_t)(buf + i * PG);
        if (pread(pm, &e, 8, (off_t)(va / PG * 8)) != 8 || !(e >> 63))
            return 67;
        uint64_t pa = (e & ((1ull << 55) - 1)) * PG;
        if (pa == 0)
            return 68; /* no CAP_SYS_ADMIN: PFNs hidden */
        if (pa >= lo && pa < hi) {
            in[n++] = buf + i * PG;
            if (pa < min_pa)
                min_pa = pa;
            if (pa > max_pa)
                max_pa = pa;
        } else {
            other++;
        }
    }
    printf("RESULT dimm_pages=%zu\nRESULT other_pages=%zu\n", n, other);
    printf("RESULT dimm_min_pa=%llx\nRESULT dimm_max_pa=%llx\n",
           (unsigned long long)min_pa, (unsigned long long)max_pa);
    if (n < 2 * want) {
        printf("RESULT dimm_io=too_few_pages\n");
        return 2;
    }
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0)
        return 69;
    struct iovec iov[PER_REQ];
    for (size_t r = 0; r < want / PER_REQ; r++) {
        for (size_t j = 0; j < PER_REQ; j++) {
            size_t page = r * PER_REQ + j;
            uint64_t *w = (uint64_t *)in[page];
            for (size_t k = 0; k < PG / 8; k++)
                w[k] = word((off + page * PG) / 8 + k);
            iov[j].iov_base = in[page];
            iov[j].iov_len = PG;
        }
        if (pwritev(fd, iov, PER_REQ, (off_t)(off + r * PER_REQ * PG)) != PER_REQ * PG)
            return 70;
    }
    if (fdatasync(fd) != 0)
        return 71;
    size_t bad = 0;
    for (size_t r = 0; r < want / PER_REQ; r++) {
        for (size_t j = 0; j < PER_REQ; j++) {
            iov[j].iov_base = in[want + r * PER_REQ + j];
            iov[j].iov_len = PG;
            memset(iov[j].iov_base, 0xa5, PG);
        }
        if (preadv(fd, iov, PER_REQ, (off_t)(off + r * PER_REQ * PG)) != PER_REQ * PG)
            return 72;
        for (size_t j = 0; j < PER_REQ; j++) {
            size_t page = r * PER_REQ + j;
            const uint64_t *w = iov[j].iov_base;
            for (size_t k = 0; k < PG / 8; k++)
                bad += w[k] != word((off + page * PG) / 8 + k);
        }
    }
    printf("RESULT dimm_io_pages=%zu\nRESULT dimm_io_bad_words=%zu\n", want, bad);
    return bad != 0;
}
"""

# the guest: verified I/O in the background; once the host has plugged the DIMM, its
# memory blocks online, then DIMM_IO over the DIMM's range
BG_JOB = rb"""# bgjob.sh DEV OFF: write /data/bg at OFF and read it back (O_DIRECT) until /tmp/stop
dev=$1 off=$2
want=$(md5sum < /data/bg)
n=0
while [ ! -e /tmp/stop ]; do
    dd if=/data/bg of=$dev bs=64k seek=$off oflag=seek_bytes,direct conv=notrunc 2>/dev/null \
        || exit 1
    dd if=$dev of=/tmp/bg.back bs=64k skip=$off count=262144 \
        iflag=skip_bytes,count_bytes,direct 2>/dev/null || exit 2
    [ "$(md5sum < /tmp/bg.back)" = "$want" ] || exit 3
    n=$((n + 1)); echo $n > /tmp/bg.rounds
done
"""

HOTPLUG_SCRIPT = r"""
. /lib/vhtest.sh
fail() { echo "FAIL: $*"; exit 1; }
DEV=/dev/vda
[ -b $DEV ] || fail "no $DEV"
MEM=/sys/devices/system/memory
bs=$(( 0x$(cat $MEM/block_size_bytes) ))
blocks() { ls $MEM | grep '^memory' | sort; }
blocks > /tmp/mem.before
result mem_before_kb "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)"
echo 0 > /tmp/bg.rounds
sh /data/bgjob.sh $DEV @BGOFF@ & bg=$!
while [ "$(cat /tmp/bg.rounds)" = 0 ]; do sleep 0.1; done
echo "RESULT ready=1"
want=$(( $(wc -l < /tmp/mem.before) + @DIMM@ / bs ))
i=0
while [ "$(blocks | wc -l)" -lt $want ]; do
    i=$((i + 1)); [ $i -le 900 ] || fail "the DIMM's memory blocks did not appear"; sleep 0.1
done
result bg_rounds_at_plug "$(cat /tmp/bg.rounds)"
lo=-1; hi=0; auto=0; manual=0
for m in $(blocks | grep -vxF -f /tmp/mem.before); do
    state=$MEM/$m/state
    j=0  # the kernel may still be onlining it (memhp_default_state=online)
    while [ "$(cat $state)" != online ] && [ $j -lt 20 ]; do sleep 0.1; j=$((j + 1)); done
    if [ "$(cat $state)" = online ]; then auto=$((auto + 1)); else
        echo online > $state || fail "cannot online $m"; manual=$((manual + 1))
    fi
    idx=$(( 0x$(cat $MEM/$m/phys_index) ))
    [ $lo -lt 0 ] || [ $idx -lt $lo ] && lo=$idx
    [ $((idx + 1)) -gt $hi ] && hi=$((idx + 1))
done
lo=$(printf '%x' $((lo * bs))); hi=$(printf '%x' $((hi * bs)))
result dimm_lo $lo
result dimm_hi $hi
result online_auto $auto
result online_manual $manual
result mem_after_kb "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)"
chmod +x /data/dimm_io
/data/dimm_io $DEV @OFF@ @PAGES@ $lo $hi; result dimm_io_rc $?
touch /tmp/stop
wait $bg; result bg_rc $?
result bg_rounds "$(cat /tmp/bg.rounds)"
result done 1
"""


def expected_words(off: int, pages: int) -> bytes:
    """What DIMM_IO writes at disk byte ``off``: word(i) for each 8-byte word i."""
    out = bytearray()
    m = (1 << 64) - 1
    for i in range(off // 8, (off + pages * 4096) // 8):
        z = (i + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        out += (z ^ (z >> 31)).to_bytes(8, "little")
    return bytes(out)


@pytest.fixture(scope="module")
def dimm_io(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc (and libc6-dev's static libc) for the guest helper")
    work = tmp_path_factory.mktemp("dimm-io")
    (work / "dimm_io.c").write_text(DIMM_IO)
    out, src = work / "dimm_io", work / "dimm_io.c"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(src)], check=True
    )
    return (work / "dimm_io").read_bytes()


def test_dimm_hotplug_under_io(
    blk_daemon: StartDaemon, guest_base: Path, tmp_path: Path, dimm_io: bytes
) -> None:
    d = blk_daemon("--verbose", image_size=IMG_SIZE)
    script = (
        HOTPLUG_SCRIPT.replace("@BGOFF@", str(BG_OFF))
        .replace("@DIMM@", str(DIMM_SIZE))
        .replace("@OFF@", str(DIMM_IO_OFF))
        .replace("@PAGES@", str(DIMM_IO_PAGES))
    )
    files = {"/data/bg": BG_DATA, "/data/bgjob.sh": BG_JOB, "/data/dimm_io": dimm_io}
    initrd = build.make_initrd(guest_base, script, tmp_path / "hotplug.initrd", files)
    qmp_path = tmp_path / "qmp.sock"
    g = qemu.Guest(
        build.kernel_path(),
        initrd,
        [*blk_qemu_args(d), "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        append_extra="memhp_default_state=online",
        log_path=tmp_path / "hotplug.console.log",
        start=False,
    )
    m = g.args.index("-m")
    g.args[m + 1] = "512M,slots=8,maxmem=2G"
    t0 = time.monotonic()
    with g:
        qmp = Qmp(qmp_path, alive=g.running)
        try:
            g.wait_for("RESULT ready=1", GUEST_TIMEOUT)
            t_plug = time.monotonic() - t0
            qmp.execute(
                "object-add",
                **{"qom-type": "memory-backend-memfd"},
                id="mem1",
                size=DIMM_SIZE,
                share=True,
            )
            qmp.execute("device_add", driver="pc-dimm", id="dimm1", memdev="mem1")
            (dimm,) = [x["data"] for x in qmp.execute("query-memory-devices")]
            rc, text = g.run_workload(timeout=GUEST_TIMEOUT)
        finally:
            qmp.close()
    res = qemu.results(text)
    total = time.monotonic() - t0
    print(
        f"\n[hotplug] plugged {t_plug:.1f}s after QEMU started (booted, I/O running), "
        f"total {total:.1f}s; DIMM at {dimm['addr']:#x}+{dimm['size']:#x}; {res}"
    )
    assert rc == 0 and res.get("done") == "1", text[-3000:]
    assert dimm["size"] == DIMM_SIZE and dimm["id"] == "dimm1" and dimm["hotplugged"], dimm

    # the daemon was handed the DIMM as a region of its own
    adds = [
        (int(a), int(b))
        for a, b in re.findall(
            r"<- AddMemReg\(region=MemoryRegion\(guest_phys_addr=(\d+), memory_size=(\d+)",
            d.log_text(),
        )
    ]
    assert (dimm["addr"], DIMM_SIZE) in adds, adds
    assert "failed:" not in d.log_text(), [ln for ln in d.log_text().splitlines() if "failed" in ln]

    # the guest saw the same memory: onlined, where QEMU put it
    assert int(res["dimm_lo"], 16) == dimm["addr"], res
    assert int(res["dimm_hi"], 16) == dimm["addr"] + DIMM_SIZE, res
    assert int(res["online_auto"]) + int(res["online_manual"]) == DIMM_SIZE // (128 * MiB), res
    grown = (int(res["mem_after_kb"]) - int(res["mem_before_kb"])) * 1024
    assert 0.9 * DIMM_SIZE <= grown <= DIMM_SIZE, res  # less the DIMM's own page structs

    # I/O with buffers in the DIMM: written from it, read back into it
    assert int(res["dimm_pages"]) >= 2 * DIMM_IO_PAGES, res
    lo, hi = dimm["addr"], dimm["addr"] + DIMM_SIZE
    assert lo <= int(res["dimm_min_pa"], 16) <= int(res["dimm_max_pa"], 16) < hi, res
    assert res["dimm_io_rc"] == "0" and res["dimm_io_bad_words"] == "0", res
    with open(d.image_path, "rb") as f:
        f.seek(DIMM_IO_OFF)
        assert f.read(DIMM_IO_PAGES * 4096) == expected_words(DIMM_IO_OFF, DIMM_IO_PAGES)
        f.seek(BG_OFF)
        assert f.read(len(BG_DATA)) == BG_DATA

    # and the I/O that ran across the hot-plug verified, before and after it
    assert res["bg_rc"] == "0", res
    assert 0 < int(res["bg_rounds_at_plug"]) < int(res["bg_rounds"]), res
