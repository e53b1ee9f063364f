"""The C extension built with AddressSanitizer and UBSan, and a Python that loads it.

Job: build every compiled module -- ``vhost._native`` from ``c_ext/`` and each device's
(``devices/*/build.py``) -- with ``VHOST_SANITIZE=1`` (``c_ext/build.py`` adds
``-fsanitize=address,undefined``) into a cache directory of its own, next to a copy of the
``vhost`` and ``devices`` packages, and give the environment a child Python needs to run
tests against them: that copy first on ``PYTHONPATH``, the ASan runtime preloaded (an
uninstrumented python must load it before anything else), leak checks off (CPython keeps
memory on purpose) and every report fatal. The project's own ``*.so`` are never touched.
Boundary: nothing outside tests imports this.

The cache is ``$VHOST_SANITIZED_DIR`` or ``/tmp/vhost-py-sanitized``, one subdirectory per
hash of the C sources, the build script, the compiler and the Python version, so a
changed ``ring.c`` gets a new build and an unchanged one is built once.

Run any tests under the sanitizers::

    python -m tests.sanitized tests/unit/test_ring_differential.py -x
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
C_EXT = ROOT / "c_ext"
PACKAGES = (ROOT / "vhost", ROOT / "devices")
#: the build scripts, core first: (script, how to get its FFI from the loaded script)
BUILDS = [C_EXT / "build.py", *sorted((ROOT / "devices").glob("*/build.py"))]
CACHE = Path(os.environ.get("VHOST_SANITIZED_DIR", "/tmp/vhost-py-sanitized"))
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:abort_on_error=0:allocator_may_return_null=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"

# The child build: build.py computes its source paths relative to the working directory
# and cffi compiles inside tmpdir, so both are the build directory.
_BUILD = """
import importlib.util, sys
for i, script in enumerate(sys.argv[1:]):
    spec = importlib.util.spec_from_file_location(f"vhost_build_{i}", script)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    print(build.ffibuilder.compile(tmpdir=".", verbose=True))
"""


def _compiler() -> str:
    cc = os.environ.get("CC", "gcc")
    return subprocess.run(
        [cc, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]


def source_hash() -> str:
    """What the sanitized build depends on (not the .py files: those are copied each time)."""
    h = hashlib.sha256()
    sources = [*C_EXT.glob("*.[ch]"), *(ROOT / "devices").glob("*/*.[ch]"), *BUILDS]
    for path in sorted(sources):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(_compiler().encode() + sys.version.encode())
    return h.hexdigest()[:16]


def runtime_library(name: str) -> str:
    """The gcc runtime library ``name`` (e.g. libasan.so) as a path, or fail clearly."""
    cc = os.environ.get("CC", "gcc")
    path = subprocess.run(
        [cc, f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"{cc} has no {name} (install the gcc sanitizer runtimes)")
    return os.path.realpath(path)


def _native_in(directory: Path) -> Path | None:
    found = sorted((directory / "vhost").glob("_native*.so"))
    return found[0] if found else None


def _modules_in(directory: Path) -> list[Path]:
    """Every compiled module under ``directory`` (relative paths)."""
    return sorted(p.relative_to(directory) for p in directory.glob("**/_*.so"))


def _build(target: Path) -> Path:
    """Compile into a fresh directory beside ``target``, then move it into place whole, so
    a reader never sees half a build and two builders do not collide."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        env = dict(os.environ, VHOST_SANITIZE="1")
        env.pop("LD_PRELOAD", None)
        done = subprocess.run(
            [sys.executable, "-c", _BUILD, *map(str, BUILDS)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sanitized build failed:\n{done.stdout}\n{done.stderr}")
        built = _modules_in(work)
        if _native_in(work) is None or len(built) != len(BUILDS):
            raise RuntimeError(
                f"sanitized build made {built}, not {len(BUILDS)} modules:\n{done.stdout}"
            )
        for rel in built:
            if b"__asan_init" not in (work / rel).read_bytes():
                raise RuntimeError(f"{rel} was built without AddressSanitizer")
            final = work / "pkg" / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            (work / rel).rename(final)
        try:
            (work / "pkg").rename(target)
        except OSError:  # another process won the race; its build is as good
            if _native_in(target) is None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    native = _native_in(target)
    assert native is not None
    return native


def _prune(keep: Path, max_age: float = 86400.0) -> None:
    """Drop builds of other sources not used for a day (a run may still use a recent one)."""
    now = time.time()
    for old in CACHE.iterdir():
        try:
            if old != keep and now - old.stat().st_mtime > max_age:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def sanitized_package() -> tuple[Path, Path]:
    """Build (once per source hash) and return (directory for PYTHONPATH, its _native .so).

    The packages' .py files are copied in again on every call: they are not part of the
    hash, and a stale copy would test old Python against new C."""
    target = CACHE / source_hash()
    native = _native_in(target) or _build(target)
    os.utime(target)
    _prune(target)
    for package in PACKAGES:
        for py in package.glob("**/*.py"):
            if "tests" in py.relative_to(package).parts:
                continue  # a device's own tests run from the project tree
            dest = target / py.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{py.name}.{os.getpid()}"
            shutil.copyfile(py, tmp)
            os.replace(tmp, dest)
    return target, native


def sanitizer_env(package_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child Python that imports the sanitized ``vhost`` first.

    Run it with ``python -P`` (no script directory or cwd in front of sys.path), so the
    project's own ``vhost`` cannot shadow the copy; the project root stays on the path
    behind it for ``tests``."""
    env = dict(os.environ if base is None else base)
    preload = [runtime_library("libasan.so")]
    env["LD_PRELOAD"] = " ".join(preload + [p for p in env.get("LD_PRELOAD", "").split() if p])
    env["ASAN_OPTIONS"] = ASAN_OPTIONS
    env["UBSAN_OPTIONS"] = UBSAN_OPTIONS
    env["PYTHONPATH"] = os.pathsep.join(
        [str(package_dir), str(ROOT)]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["VHOST_SANITIZED_NATIVE"] = str(_native_in(package_dir))
    return env


def pytest_command(*args: str) -> list[str]:
    # importlib mode: pytest's default puts the rootdir in front of sys.path, ahead of the copy
    return [
        sys.executable,
        "-P",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--import-mode=importlib",
        *args,
    ]


def main(argv: list[str]) -> int:
    package_dir, native = sanitized_package()
    print(f"sanitized build: {native}", file=sys.stderr, flush=True)
    return subprocess.call(pytest_command(*argv), cwd=ROOT, env=sanitizer_env(package_dir))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
