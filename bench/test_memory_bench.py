"""Guest address translation with many memory regions (c_ext/memory.c).

A front end may fill every memory slot (256: one per hot-plugged DIMM), and the ring
walker translates each descriptor's guest-physical address. This measures the cost of
one translation by region count (1, 8, 64, 256), in C: a driver compiled here with
memory.c itself (cffi's per-call cost, ~100 ns, would hide a lookup of a few ns) maps
the regions of one sparse memfd, in shuffled order, and translates precomputed
addresses in a loop:

* ``to_host``: ``vu_gpa_to_host`` (indirect tables; one region);
* ``to_iov``: ``vu_gpa_to_iov`` (every descriptor buffer), into up to 4 iovecs;
* ``linear``: the baseline, a linear scan over the regions as ``find_region`` did
  before the map was sorted, then the same bounds check.

Address patterns: ``spread``, every lookup in a random region (the worst case for a
cache, the common one for nothing); ``local``, runs of 64 lookups in one region (a
guest whose buffers come from one big RAM region). Figures are ns per lookup, the
loop's throughput (lookups are independent, so the CPU overlaps them). Nothing is
asserted about timings.

Run: ``python -m pytest bench/test_memory_bench.py -s``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGION_COUNTS = (1, 8, 64, 256)
LOOKUPS = 5_000_000  # per case and round: ~0.1 s

DRIVER = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "vu.h"

#define REGION (2u << 20)
#define NADDR 4096

static struct vu_mem mem;
static uint64_t addrs[NADDR];

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* The scan memory.c used before its map was sorted. */
__attribute__((noinline)) static void *linear_to_host(const struct vu_mem *m, uint64_t addr,
                                                      uint64_t len)
{
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct vu_region *r = &m->regions[i];
        if (addr >= r->gpa && addr - r->gpa < r->size)
            return len > r->size - (addr - r->gpa) ? NULL : r->host + (addr - r->gpa);
    }
    return NULL;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    uint32_t n = (uint32_t)atoi(argv[1]);
    uint64_t lookups = strtoull(argv[2], NULL, 10);
    int fd = memfd_create("bench-memory", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)n * REGION) < 0)
        return 1;
    uint32_t order[VU_MAX_REGIONS];
    uint64_t seed = 88172645463325252ull;
    for (uint32_t k = 0; k < n; k++)
        order[k] = k;
    for (uint32_t k = n; k > 1; k--) {
        uint32_t j = (uint32_t)(rnd(&seed) % k), t = order[k - 1];
        order[k - 1] = order[j];
        order[j] = t;
    }
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = order[k]; /* DIMM-like: 1 GiB apart in gpa, a hole after each */
        uint64_t gpa = (4ull << 30) + (uint64_t)i * (1ull << 30);
        if (vu_mem_add(&mem, gpa, REGION, 0x7e0000000000ull + (uint64_t)i * REGION,
                       (uint64_t)i * REGION, fd) != 0)
            return 2;
    }
    const char *patterns[] = {"spread", "local"};
    for (int p = 0; p < 2; p++) {
        uint32_t region = 0;
        for (uint32_t a = 0; a < NADDR; a++) {
            if (p == 0 || a % 64 == 0)
                region = (uint32_t)(rnd(&seed) % n);
            uint64_t off = rnd(&seed) % (REGION - 4096) & ~7ull;
            addrs[a] = (4ull << 30) + (uint64_t)region * (1ull << 30) + off;
        }
        for (int kind = 0; kind < 3; kind++) {
            uintptr_t sum = 0;
            struct iovec iov[4];
            double t0 = now();
            for (uint64_t i = 0; i < lookups; i++) {
                uint64_t a = addrs[i & (NADDR - 1)];
                if (kind == 0)
                    sum += (uintptr_t)vu_gpa_to_host(&mem, a, 512);
                else if (kind == 1)
                    sum += (uintptr_t)vu_gpa_to_iov(&mem, a, 512, iov, 4) +
                           (uintptr_t)iov[0].iov_base;
                else
                    sum += (uintptr_t)linear_to_host(&mem, a, 512);
            }
            double dt = now() - t0;
            if (sum == 0)
                return 3; /* every lookup hits: keeps the loop from being optimised out */
            const char *names[] = {"to_host", "to_iov", "linear"};
            printf("%s %s %.2f\n", names[kind], patterns[p], dt * 1e9 / (double)lookups);
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    work = tmp_path_factory.mktemp("memory-bench")
    src = work / "memory_bench.c"
    src.write_text(DRIVER)
    out = work / "memory_bench"
    flags = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]
    sources = [str(src), str(ROOT / "c_ext" / "memory.c")]  # with c_ext/build.py's flags
    subprocess.run(["gcc", *flags, "-I", str(ROOT / "c_ext"), "-o", str(out), *sources], check=True)
    return out


@pytest.mark.parametrize("regions", REGION_COUNTS)
def test_translation_by_region_count(benchmark: Any, driver: Path, regions: int) -> None:
    results: dict[tuple[str, str], list[float]] = {}

    def run() -> None:
        out = subprocess.run(
            [str(driver), str(regions), str(LOOKUPS)], check=True, capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            kind, pattern, ns = line.split()
            results.setdefault((kind, pattern), []).append(float(ns))

    benchmark.pedantic(run, rounds=5, iterations=1)
    print()
    for (kind, pattern), values in sorted(results.items()):
        best = min(values)
        benchmark.extra_info[f"{kind}_{pattern}_ns"] = best
        print(f"regions={regions:<4} {kind:>8} {pattern:>6} {best:6.2f} ns/lookup (best of 5)")
    for pattern in ("spread", "local"):
        ratio = min(results[("to_host", pattern)]) / min(results[("linear", pattern)])
        benchmark.extra_info[f"to_host_vs_linear_{pattern}"] = ratio
        print(f"regions={regions:<4} to_host/linear ({pattern}): {ratio:.2f}")
    assert all(v > 0 for values in results.values() for v in values)
