"""Crash safety end to end: the daemon SIGKILLed again and again under a guest that
writes random blocks with crc32c verification, and restarted on the same socket.

The guest (QEMU 7.2, TCG, ``-chardev socket,...,reconnect=1``) runs fio passes on
/dev/vda: random writes of mixed block sizes, O_DIRECT, libaio, iodepth 16, each
block verified (``verify=crc32c``, reads interleaved through ``verify_backlog`` and a
verify phase at the end of the pass, ``verify_fatal``).  Meanwhile the test waits a
random 0.5-3 s while I/O flows, SIGKILLs the daemon, checks that its socket file is
left stale, starts the daemon again with the same arguments (same ``--socket-path``
and ``--blk-file``), waits for QEMU to reconnect and for the guest's I/O to resume,
and repeats.  After the last kill it asks the guest (a magic block at the end of the
image, outside fio's region) to stop after the pass in progress.

Passing means: every fio pass exits 0 with no verify error; the guest's kernel logged
no I/O error, "not a head", blk_update_request or call trace; QEMU stayed up and
powered off normally; every restarted daemon served the reconnecting QEMU; the last
daemon exits 0 on SIGTERM and removes its socket.

What a lost or doubled request looks like: lost -- the guest's I/O never resumes (the
monitor shows requests in flight that never complete) and the test fails with "I/O
did not resume"; doubled -- ``virtio_blk virtio0: req.0:id N is not a head!`` then I/O
errors; a write the guest saw complete but that never reached the image -- a verify
error.  The failure message has the kill table, the guest console (monitor ticks
thinned out) and each daemon incarnation's log (run with ``-v``: the messages QEMU
sent, where each queue started and, on a clean stop, where its ring stood).

Environment:

* ``VHOST_CRASH_KILLS`` -- number of kills (default 3, the CI run; the issue's long
  run is 20);
* ``VHOST_CRASH_SEED`` -- seed of the kill delays (default random; printed and
  recorded as the ``seed`` property so a run can be repeated).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.guest.workloads import MiB

from . import crash_harness as ch
from .harness import boot_guest, guest_binaries, needs_qemu

pytestmark = [pytest.mark.qemu, needs_qemu]

FIO = Path("/usr/bin/fio")
IMG_SIZE = 128 * MiB
CTL_OFF = IMG_SIZE - 4096  # the stop request: a block outside fio's region
STOP_MAGIC = b"VHOST-CRASH-TEST-STOP"
KILLS = int(os.environ.get("VHOST_CRASH_KILLS", "3"))
DELAY = (0.5, 3.0)  # seconds of flowing I/O before each kill
TICK = 0.2  # the guest's I/O monitor period

BOOT_TIMEOUT = 120.0  # QEMU start until fio's first I/O
CONNECT_TIMEOUT = 20.0  # daemon restart until QEMU reconnected and queue 0 started
RESUME_TIMEOUT = 30.0  # restart until the guest completes I/O again
STALL_TIMEOUT = 60.0  # no completion at all for this long while fio runs: a hang
MAX_PASSES = 1000


RecordProperty = Callable[[str, object], None]

SCRIPT = r"""
DEV=/dev/vda
[ -b $DEV ] || { echo "FAIL: no $DEV"; ls /sys/block; exit 1; }
# the kernel's messages about the disk, as they come (printk keeps them off the console)
grep -iE 'virtio|I/O error|not a head|blk_update_request|Call Trace|blocked for more|BUG|Oops' \
    /dev/kmsg &
kmsg=$!
# completions and requests in flight, for the host to see I/O stop and resume
(
    while :; do
        read -r up idle < /proc/uptime
        read -r r1 r2 r3 r4 w1 w2 w3 w4 inf rest < /sys/block/vda/stat
        echo "IO $up $r1 $w1 $inf"
        sleep @TICK@
    done
) &
mon=$!
stop_requested() {
    dd if=$DEV bs=4096 skip=@CTL_BLOCK@ count=1 iflag=direct 2>/dev/null | grep -q @MAGIC@
}
pass=0
rc=0
while :; do
    pass=$((pass + 1))
    echo "FIO PASS $pass START"
    fio --name=crash --filename=$DEV --offset=0 --size=@SIZE@ \
        --rw=randwrite --bssplit=4k/80:8k/10:64k/8:256k/2 --randseed=$pass \
        --direct=1 --ioengine=libaio --iodepth=16 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=256 \
        --verify_state_save=0 --output-format=json --output=/tmp/fio.json \
        > /tmp/fio.err 2>&1
    rc=$?
    echo "FIO PASS $pass END rc=$rc"
    echo "FIOJSON $pass $(tr -d '\n' < /tmp/fio.json)"
    while read -r l; do echo "FIOERR $pass $l"; done < /tmp/fio.err
    [ $rc -eq 0 ] || break
    stop_requested && break
    [ $pass -lt @MAX_PASSES@ ] || { echo "FAIL: no stop request after $pass passes"; rc=99; break; }
done
kill $mon $kmsg 2>/dev/null
echo "RESULT passes=$pass"
echo "RESULT fio_rc=$rc"
echo "=== DMESG BEGIN ==="
dmesg | grep -iE 'virtio_blk|I/O error|not a head|blk_update_request|Call Trace'
echo "=== DMESG END ==="
exit $rc
"""


def _script(fio_size: int) -> str:
    return (
        SCRIPT.replace("@TICK@", str(TICK))
        .replace("@CTL_BLOCK@", str(CTL_OFF // 4096))
        .replace("@MAGIC@", STOP_MAGIC.decode())
        .replace("@SIZE@", str(fio_size))
        .replace("@MAX_PASSES@", str(MAX_PASSES))
    )


@pytest.fixture(scope="session")
def fio_base() -> Path:
    """The guest initramfs of the QEMU tests plus fio and its libraries (cached)."""
    if not FIO.exists():
        pytest.skip("needs fio on the host (it is copied into the guest)")
    return build.build_base_initramfs(
        build.default_cache_dir(), binaries=[*guest_binaries(), str(FIO)]
    )


class CrashRun:
    """The state of one crash test run, and the report made of it on failure."""

    def __init__(self, workdir: Path, seed: int, io_delay_us: int) -> None:
        self.workdir = workdir
        self.sock = workdir / "crash.sock"
        self.image = workdir / "crash.img"
        self.rng = random.Random(seed)
        self.seed = seed
        self.args = ["-v"]
        self.env = ch.io_delay_env(workdir, io_delay_us)
        self.incarnations: list[ch.Incarnation] = []
        self.kills: list[ch.KillRecord] = []
        self.console: ch.Console | None = None
        self.guest: qemu.Guest | None = None
        self.t0 = 0.0  # first fio pass seen

    @property
    def daemon(self) -> ch.Incarnation:
        return self.incarnations[-1]

    def start_daemon(self) -> ch.Incarnation:
        inc = ch.start_incarnation(
            self.workdir, len(self.incarnations), self.sock, self.image, self.args, self.env
        )
        self.incarnations.append(inc)
        return inc

    # --- waiting ---
    def poll(self) -> ch.Console:
        assert self.console is not None and self.guest is not None
        self.console.poll()
        ch.poll_connection(self.daemon)
        if not self.guest.running():
            self.console.poll()
            if not self.console.finished():
                raise AssertionError(f"QEMU exited (rc {self.guest.returncode}) mid-run")
        if not self.daemon.daemon.alive():
            raise AssertionError(
                f"daemon #{self.daemon.n} exited with {self.daemon.daemon.proc.returncode}"
            )
        return self.console

    def guest_failed(self) -> str | None:
        c = self.poll()
        if bad := _bad_kmsg(c.kmsg()):
            return "the guest kernel said:\n" + "\n".join(bad)
        if (n := c.failed_pass()) is not None:
            return f"fio pass {n} failed (rc {c.pass_rcs[n]})"
        if c.finished():
            return f"the guest workload ended (rc {c.exit_rc}) before the kills were done"
        return None

    def wait_until(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if (why := self.guest_failed()) is not None:
                raise AssertionError(f"while waiting for {what}: {why}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.05)

    # --- one kill ---
    def kill_and_restart(self, index: int) -> ch.KillRecord:
        c = self.poll()
        delay = self.rng.uniform(*DELAY)
        self.wait_until(
            "fio running with I/O flowing",
            lambda: c.fio_running() and c.io_flowing(),
            RESUME_TIMEOUT,
        )
        end = time.monotonic() + delay
        self.wait_until(f"{delay:.2f}s of I/O", lambda: time.monotonic() >= end, delay + 5)
        # the pass may have ended meanwhile: kill only while fio runs and I/O flows
        self.wait_until(
            "fio running with I/O flowing",
            lambda: c.fio_running() and c.io_flowing(),
            RESUME_TIMEOUT,
        )
        last = c.last_tick()
        t_kill = time.monotonic()
        old = self.daemon
        rec = ch.KillRecord(index, t_kill - self.t0, c.pass_started, delay)
        self.kills.append(rec)
        rec.exit_status = old.daemon.kill9()
        rec.done_at_kill = last.done if last else None
        rec.socket_after_kill = ch.socket_state(self.sock)
        assert rec.socket_after_kill == "stale", (
            f"after SIGKILL the socket file is {rec.socket_after_kill}, expected stale"
        )
        inc = self.start_daemon()
        rec.restart_after = inc.started - t_kill

        self.wait_until(
            f"QEMU to reconnect to daemon #{inc.n}",
            lambda: inc.queue_started is not None,
            CONNECT_TIMEOUT,
        )
        assert inc.connected is not None
        rec.connected_after = inc.connected - t_kill
        rec.queue_started_after = (inc.queue_started or 0.0) - t_kill
        rec.queue_base = inc.queue_base
        rec.resubmitted = inc.resubmitted
        down = c.ticks_between(t_kill, inc.connected)
        rec.inflight_stalled = [t.inflight for t in down]
        baseline = max([t.done for t in down] + [rec.done_at_kill or 0])

        def resumed() -> bool:
            return any(t.done > baseline for t in c.ticks_between(inc.connected or 0, 1e18))

        self.wait_until(
            f"the guest's I/O to resume after kill {index} (completions stuck at {baseline})",
            resumed,
            RESUME_TIMEOUT,
        )
        first = next(t for t in c.ticks_between(inc.connected, 1e18) if t.done > baseline)
        rec.resumed_after = first.seen - t_kill
        return rec

    def finish(self) -> None:
        """Ask the guest to stop after this pass; wait for it, failing on a stall."""
        with open(self.image, "r+b") as f:
            os.pwrite(f.fileno(), STOP_MAGIC.ljust(4096, b"\0"), CTL_OFF)
        c = self.poll()
        progress = (time.monotonic(), c.last_tick())
        while not c.finished():
            time.sleep(0.1)
            if self.guest is not None and not self.guest.running():
                c.poll()
                break
            self.poll()
            if bad := _bad_kmsg(c.kmsg()):
                raise AssertionError("the guest kernel said:\n" + "\n".join(bad))
            last = c.last_tick()
            if last is not None and (progress[1] is None or last.done != progress[1].done):
                progress = (time.monotonic(), last)
            elif time.monotonic() - progress[0] > STALL_TIMEOUT:
                raise AssertionError(
                    f"the guest's I/O stalled for {STALL_TIMEOUT:.0f}s after the last kill "
                    f"(last tick {last})"
                )
        assert self.guest is not None
        rc = self.guest.wait_exit(30)
        c.poll()
        assert rc == 0, f"QEMU exited with {rc}"

    # --- report ---
    def report(self) -> str:
        head = (
            f"seed {self.seed} (VHOST_CRASH_SEED), kills wanted {KILLS}, done "
            f"{len(self.kills)}; image {self.image}"
        )
        parts = [head]
        parts += [r.row() for r in self.kills]
        if self.console is not None:
            c = self.console
            c.poll()
            parts.append(
                f"fio passes started {c.pass_started}, ended {c.pass_ended}, rcs {c.pass_rcs}"
            )
            # when each was read, on the kill table's clock: which kill came before it
            parts += [f"kmsg at {seen - self.t0:7.2f}s: {m}" for seen, m in c.kmsg_seen()]
            parts += c.fio_stderr()[-30:]
            parts.append("--- guest console (tail) ---\n" + c.tail())
        for inc in self.incarnations:
            text = inc.log_text()
            lines = text.splitlines()
            if len(lines) > 150:  # the message dumps of -v: keep the start and the end
                text = "\n".join([*lines[:40], "[...]", *lines[-100:]])
            parts.append(
                f"--- daemon #{inc.n} (pid {inc.daemon.pid}, exit "
                f"{inc.daemon.proc.poll()}), {inc.daemon.log_path} ---\n{text}"
            )
        return "\n".join(parts)


def _bad_kmsg(lines: list[str]) -> list[str]:
    return ch.bad_kmsg(lines, ch.BAD_DISK_KMSG)


def _stop_for_evidence(run: CrashRun) -> None:
    """SIGTERM the live daemon so it logs where each ring stood (a hang's evidence)."""
    if run.incarnations and run.daemon.daemon.alive():
        with contextlib.suppress(AssertionError):
            run.daemon.daemon.terminate(10)


@pytest.mark.parametrize(
    ("io_delay_us", "fio_size"),
    [
        # as it runs: requests take microseconds, the kills find the daemon idle
        pytest.param(0, 64 * MiB, id="page-cache"),
        # each preadv/pwritev 500 us late (crash_harness.IO_DELAY_SHIM): the daemon is
        # the bottleneck, the kills land between pop and push and the restarted daemon
        # must resubmit what the inflight region holds
        pytest.param(500, 24 * MiB, id="slow-io"),
    ],
)
def test_blk_survives_daemon_kill9(
    fio_base: Path,
    tmp_path: Path,
    record_property: RecordProperty,
    io_delay_us: int,
    fio_size: int,
) -> None:
    """SIGKILL the daemon VHOST_CRASH_KILLS times (default 3) under fio randwrite with
    crc32c verification; restarted on the same socket it serves the reconnecting QEMU
    and the guest sees no I/O error, no hang and no verify error."""
    seed = int(os.environ.get("VHOST_CRASH_SEED") or random.randrange(1 << 32))
    run = CrashRun(tmp_path, seed, io_delay_us)
    record_property("seed", seed)
    with open(run.image, "wb") as f:
        f.truncate(IMG_SIZE)
    first = run.start_daemon()
    ch.wait_serving(first, 10)
    args = [
        "-chardev",
        f"socket,id=c0,path={run.sock},reconnect=1",
        "-device",
        "vhost-user-blk-pci,chardev=c0,num-queues=1",
    ]
    t_boot = time.monotonic()
    run.guest = boot_guest(fio_base, _script(fio_size), tmp_path, "crash", args)
    run.console = ch.Console(run.guest)
    ok = False
    try:
        c = run.console
        run.wait_until("the first fio pass", lambda: c.pass_started >= 1, BOOT_TIMEOUT)
        run.t0 = time.monotonic()
        boot = run.t0 - t_boot
        for i in range(1, KILLS + 1):
            run.kill_and_restart(i)
        run.finish()
        ok = True
    finally:
        if not ok:
            _stop_for_evidence(run)
            if run.guest is not None:
                run.guest.kill()
            print("\n" + run.report())
    total = time.monotonic() - t_boot
    c = run.console
    print(
        f"\n[crash] seed {seed}: boot {boot:.1f}s, {len(run.kills)} kills, "
        f"{c.pass_ended} fio passes, total {total:.1f}s"
    )
    for r in run.kills:
        print("  " + r.row())
    record_property("total_s", round(total, 1))
    record_property("kills", len(run.kills))
    record_property("passes", c.pass_ended)
    record_property("resumed_after_s", [round(r.resumed_after or -1, 2) for r in run.kills])
    record_property("resubmitted", [r.resubmitted for r in run.kills])

    diag = run.report
    assert len(run.kills) == KILLS, diag()
    res = qemu.results(c.text())
    assert c.exit_rc == 0 and res.get("fio_rc") == "0", f"guest workload failed:\n{diag()}"
    problems = c.fio_pass_problems(fio_size)
    assert not problems, "\n".join(problems) + "\n" + diag()
    bad = _bad_kmsg(c.kmsg() + c.section("DMESG"))
    assert not bad, "guest kernel:\n" + "\n".join(bad) + "\n" + diag()

    if io_delay_us:
        # not vacuous: some kill caught requests between pop and push, and the next
        # daemon found them in the inflight region and ran them again
        assert any(r.resubmitted for r in run.kills), (
            "no restarted daemon resubmitted a request from the inflight region\n" + diag()
        )
    # each restarted daemon served the reconnecting QEMU (its connection #1)
    for inc in run.incarnations:
        assert inc.connected is not None and inc.queue_started is not None, diag()
    last = run.daemon
    last.daemon.wait_connection_closed(1)  # QEMU powered off
    errors = [
        ln
        for inc in run.incarnations
        for ln in inc.log_text().splitlines()
        if " ERROR " in ln or "Traceback" in ln
    ]
    assert not errors, "\n".join(errors) + "\n" + diag()
    last.daemon.check_clean_exit()
