"""Worker-thread preadv against io_uring for the blk data path, side by side in one
run (bench/io_engines.c). The daemon uses whichever this shows is cheaper for
page-cached 4 KiB reads; today that is preadv (see devices/blk.py). Needs
liburing-dev; skipped without it.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def engines_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None or not Path("/usr/include/liburing.h").exists():
        pytest.skip("needs gcc and liburing-dev")
    out = tmp_path_factory.mktemp("engines") / "io_engines"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(out), str(HERE / "io_engines.c"), "-luring"], check=True
    )
    return out


@pytest.mark.parametrize("qd", [1, 32])
def test_io_engines(benchmark: Any, engines_bin: Path, tmp_path: Path, qd: int) -> None:
    img = tmp_path / "img"
    img.write_bytes(random.Random(3).randbytes(64 << 20))  # page cached once written
    results: dict[str, tuple[float, float]] = {}

    def run() -> None:
        out = subprocess.run(
            [str(engines_bin), str(img), str(qd), "200000"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            engine, _, wall, cpu = line.split()
            results[engine] = (float(wall), float(cpu))

    benchmark.pedantic(run, rounds=3, iterations=1)
    for engine, (wall, cpu) in results.items():
        benchmark.extra_info[f"{engine}_ns_per_read"] = wall
        print(f"\n{engine:>6} qd={qd:<3} {wall:7.0f} ns/read wall {cpu:7.0f} ns/read CPU")
    sync, uring = results["sync"][1], results["uring"][1]
    print(f"uring/sync CPU ratio at qd={qd}: {uring / sync:.2f}")
    assert sync > 0 and uring > 0
