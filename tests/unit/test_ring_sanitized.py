"""The ring walk differential test again, against the C built with AddressSanitizer and UBSan.

tests/sanitized.py builds ``vhost._native`` with ``VHOST_SANITIZE=1`` into a cache directory;
each test here runs a child Python on that build (ASan preloaded, every report fatal) and
checks that the child passed and really used the sanitized module. Budget: CI_SECONDS of
fuzzing in CI, N minutes with ``--fuzz-minutes N``; the child's summary line
(``ring fuzz: N chains ...``) is repeated in this session's terminal summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sanitized import ROOT, pytest_command, sanitized_package, sanitizer_env

CI_SECONDS = 22.0  # fuzzing in the child; with start-up and the pinned cases about 30 s
DIFFERENTIAL = ROOT / "tests" / "unit" / "test_ring_differential.py"


class _Summary:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def summary(request: pytest.FixtureRequest) -> _Summary:
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "ring-sanitized-summary")
    return plugin


@pytest.fixture(scope="module")
def sanitized() -> Iterator[tuple[Path, Path]]:
    package_dir, native = sanitized_package()
    yield package_dir, native


def _run_python(env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_build_is_instrumented(sanitized: tuple[Path, Path]) -> None:
    package_dir, native = sanitized
    blob = native.read_bytes()
    assert b"__asan_init" in blob and b"__ubsan_handle" in blob
    assert native.parent == package_dir / "vhost"
    assert not native.is_relative_to(ROOT)  # the project's own build is left alone


def test_a_heap_overflow_in_c_is_caught(sanitized: tuple[Path, Path]) -> None:
    """The canary: a copy one byte past a heap buffer must kill the child with a report."""
    package_dir, native = sanitized
    done = _run_python(
        sanitizer_env(package_dir),
        f"""
import cffi
import vhost._native as m
assert m.__file__ == {str(native)!r}, m.__file__
abi = cffi.FFI()
abi.cdef("struct iovec {{ void *iov_base; size_t iov_len; }};"
         "size_t vu_iov_copy_to(const struct iovec *, uint32_t, size_t, const void *, size_t);")
lib = abi.dlopen(m.__file__)  # the module already loaded: its exported helper
dst = abi.new("char[]", 4096)          # large enough to come from malloc, not pymalloc
iov = abi.new("struct iovec *")
iov.iov_base, iov.iov_len = dst, 4097  # one byte too long
print("copying", flush=True)
lib.vu_iov_copy_to(iov, 1, 0, abi.new("char[]", 4097), 4097)
print("not caught", flush=True)
""",
    )
    assert "copying" in done.stdout and "not caught" not in done.stdout
    assert done.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-4000:]


def test_undefined_behaviour_in_c_is_caught(sanitized: tuple[Path, Path]) -> None:
    """The other canary: a misaligned store through an iovec pointer is UB, and fatal."""
    package_dir, _ = sanitized
    done = _run_python(
        sanitizer_env(package_dir),
        """
import os
from vhost._native import ffi, lib
from vhost.memory import GuestMemory, Region
fd = os.memfd_create("canary")
os.ftruncate(fd, 4096)
mem = GuestMemory()
mem.add(Region(0, 4096, 0x7F00_0000_0000, 0), fd)
buf = ffi.new("char[]", 4096)
iov = ffi.cast("struct iovec *", int(ffi.cast("uintptr_t", buf)) + 1)
print("translating", flush=True)
lib.vu_gpa_to_iov(mem.handle, 0, 16, iov, 1)
print("not caught", flush=True)
""",
    )
    assert "translating" in done.stdout and "not caught" not in done.stdout
    assert done.returncode != 0
    assert "runtime error" in done.stderr and "misaligned" in done.stderr, done.stderr[-4000:]


def test_differential_under_sanitizers(
    sanitized: tuple[Path, Path],
    fuzz_minutes: float,
    summary: _Summary,
    tmp_path: Path,
) -> None:
    package_dir, native = sanitized
    seconds = fuzz_minutes * 60 if fuzz_minutes > 0 else CI_SECONDS
    report = tmp_path / "ring-fuzz.json"
    env = sanitizer_env(package_dir)
    env.pop("VHOST_FUZZ_EXAMPLES", None)
    env |= {"VHOST_FUZZ_SECONDS": str(seconds), "VHOST_FUZZ_REPORT": str(report)}
    done = subprocess.run(
        pytest_command(str(DIFFERENTIAL), "-q", "-x"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 900,
        check=False,
    )
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith("ring fuzz:")]
    summary.lines += [f"sanitized (ASan+UBSan) {line}" for line in lines]
    assert done.returncode == 0, output[-30000:]
    assert "AddressSanitizer" not in output and "runtime error" not in output, output[-30000:]
    counts = json.loads(report.read_text())
    assert counts["native"] == str(native), "the child did not load the sanitized build"
    assert lines and str(native) in lines[-1]
    assert counts["chains"].get("accepted", 0) > 0
