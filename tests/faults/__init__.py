"""Fault injection for tests: the LD_PRELOAD shim in eio_shim.c (see its header for what
it does and the variables it reads), built with gcc at test time, and the environment a
process needs to run under it.

Boundary: builds and describes the shim; it starts no process and knows no daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("eio_shim.c")


class ShimBuildError(Exception):
    """gcc is missing or refused the shim; the text has its output."""


def build_eio_shim(out_dir: Path) -> Path:
    """Compile eio_shim.c into ``out_dir`` (again only when the source is newer);
    returns the path of the shared object."""
    out = out_dir / "eio_shim.so"
    if out.exists() and out.stat().st_mtime >= SHIM_SOURCE.stat().st_mtime:
        return out
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise ShimBuildError("no C compiler (gcc/cc) to build the fault-injection shim")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run(
        [
            gcc,
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(tmp),
            str(SHIM_SOURCE),
            "-ldl",
            "-lpthread",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise ShimBuildError(f"gcc failed on {SHIM_SOURCE}:\n{r.stdout}{r.stderr}")
    tmp.replace(out)  # atomic: a concurrent test never loads half a file
    return out


def shim_env(
    shim: Path,
    path: str | os.PathLike[str],
    *,
    start: int = 0,
    length: int = 0,
    ops: str = "rw",
    errno: int | None = None,
    short: int = 0,
    fail_sync: bool = False,
) -> dict[str, str]:
    """The variables that make a process fail I/O to ``path`` as eio_shim.c describes
    (the shim appended to any ``LD_PRELOAD`` the caller already has)."""
    # after any preload already there: a sanitizer runtime must stay first, and its
    # interceptors then reach the shim as "the next definition"
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD", ""), str(shim)]))
    env = {
        "LD_PRELOAD": preload,
        "EIO_SHIM_PATH": os.fspath(path),
        "EIO_SHIM_START": str(start),
        "EIO_SHIM_LEN": str(length),
        "EIO_SHIM_OPS": ops,
        "EIO_SHIM_SHORT": str(short),
        "EIO_SHIM_SYNC": "1" if fail_sync else "0",
    }
    if errno is not None:
        env["EIO_SHIM_ERRNO"] = str(errno)
    return env
