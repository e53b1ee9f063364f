"""Build a tiny busybox initramfs for booting test guests under QEMU.

The base initramfs (gzip'd newc cpio) holds busybox, the kernel modules a guest
needs for virtio-blk/-net, IDE, e1000 and ext4, optionally fio (plus the shared
libraries ``ldd`` lists) and an ``/init`` that runs ``/workload.sh``.

A per-test workload is a second, *uncompressed* newc cpio appended to the base
one: the kernel unpacks concatenated archives in order, so

    initrd = base_initramfs_bytes + workload_cpio(script)

Everything is written in pure Python (no ``cpio`` tool).  The base image is
cached under ``cache_dir`` by a key of kernel version, busybox, the extra
binaries and this file's content, built under a file lock and published with
an atomic rename, so parallel pytest workers can share one cache directory.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
MODULES_ROOT = Path("/lib/modules")

# Modules the guest loads, in a load order that works (see /work/shared/FACTS.md).
# Hard dependencies from modules.dep are inserted before a module automatically.
DEFAULT_MODULES: tuple[str, ...] = (
    # block integrity / SCSI / IDE (ata_piix -> /dev/sda)
    "crct10dif_common",
    "crct10dif_generic",
    "crc-t10dif",
    "crc64",
    "crc64_rocksoft_generic",
    "crc64-rocksoft",
    "t10-pi",
    "scsi_common",
    "scsi_mod",
    "libata",
    "ata_piix",
    "sd_mod",
    # virtio stack
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "e1000",
    # ext4 (crc32c_generic is needed, else "Cannot load crc32c driver")
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "libcrc32c",
    "ext4",
)

# Host binaries copied in (with their shared libraries) when they exist on the
# host: a path, or (host path, guest path).  e2fsprogs' mke2fs is installed as
# /usr/sbin/mkfs.ext4 (it picks the fs type from argv[0]) for a real journalled
# ext4; busybox's own mke2fs only makes ext2.
Binary = str | Path | tuple[str | Path, str]
DEFAULT_BINARIES: tuple[Binary, ...] = (
    "/usr/bin/fio",
    "/usr/bin/iperf3",
    ("/sbin/mke2fs", "/usr/sbin/mkfs.ext4"),
)
# Plain host files copied in when they exist.
HOST_FILES: tuple[str, ...] = ("/etc/mke2fs.conf",)

# Extra library directories for binaries whose libraries live off the default path
# (e.g. libceph-common in /usr/lib/x86_64-linux-gnu/ceph).
_LD_LIBRARY_PATH = "/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu/ceph"

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=@LD_LIBRARY_PATH@
export HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
# keep kernel messages off the console (the workload owns it)
echo 1 > /proc/sys/kernel/printk 2>/dev/null
ip link set lo up 2>/dev/null
while read -r mod; do
    [ -n "$mod" ] || continue
    out=$(insmod "/lib/modules/guest/$mod" 2>&1) || case "$out" in
        *"File exists"*) ;;
        *) echo "init: insmod $mod failed: $out" ;;
    esac
done < /lib/modules/guest/order
if grep -q 'vhtest.shell' /proc/cmdline; then
    echo "=== SHELL ==="
    setsid cttyhack sh
fi
if [ -f /workload.sh ]; then
    echo "=== WORKLOAD START ==="
    cd /tmp
    sh /workload.sh
    rc=$?
    cd /
    echo "=== WORKLOAD EXIT $rc ==="
else
    echo "=== NO WORKLOAD ==="
fi
sync
poweroff -f
"""


# Shell helpers installed as /lib/vhtest.sh; a workload may ``. /lib/vhtest.sh``.
# busybox dd only really does O_DIRECT when its buffer is page aligned, i.e. when
# bs >= 4096 (it mmaps the buffer then); with a smaller bs the O_DIRECT read/write
# fails with EINVAL and busybox silently clears O_DIRECT and goes through the page
# cache.  These helpers therefore use bs=64k with byte offsets/counts, which gives
# real O_DIRECT for any 512-aligned offset and length.
SH_LIB = r"""
# dio_write SRC DEV OFFSET_BYTES: write file SRC to DEV at OFFSET with O_DIRECT
dio_write() {
    dd if="$1" of="$2" bs=64k seek="$3" oflag=seek_bytes,direct conv=notrunc 2>/tmp/dd.err \
        || { cat /tmp/dd.err >&2; return 1; }
}
# dio_read DEV OFFSET_BYTES LEN_BYTES DST: read LEN bytes at OFFSET with O_DIRECT
dio_read() {
    dd if="$1" of="$4" bs=64k skip="$2" count="$3" iflag=skip_bytes,count_bytes,direct \
        2>/tmp/dd.err || { cat /tmp/dd.err >&2; return 1; }
}
# sectors read / written so far by block device NAME (e.g. vda), from /sys/block/NAME/stat
rd_sectors() { set -- $(cat /sys/block/$1/stat); echo "$3"; }
wr_sectors() { set -- $(cat /sys/block/$1/stat); echo "$7"; }
# result KEY VALUE: print a RESULT line for qemu.results()
result() { echo "RESULT $1=$2"; }
"""


class BuildError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    """$VHOST_GUEST_CACHE, else <tmp>/vhost-py-guest-cache."""
    env = os.environ.get("VHOST_GUEST_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "vhost-py-guest-cache"


# ---------------------------------------------------------------------------
# newc cpio writer
# ---------------------------------------------------------------------------


class CpioWriter:
    """Writes a newc ("070701") cpio archive into memory.

    Parent directories are created implicitly (mode 0755) before the first
    entry below them.
    """

    def __init__(self, ino_start: int = 1) -> None:
        self._buf = bytearray()
        self._ino = ino_start
        self._dirs: set[str] = {""}
        self._closed = False

    @staticmethod
    def _norm(path: str) -> str:
        p = path.strip("/")
        if not p or ".." in p.split("/"):
            raise ValueError(f"bad archive path {path!r}")
        return p

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        if self._closed:
            raise RuntimeError("archive already closed")
        namez = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            0,
            0,
            len(namez),
            0,
        )
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf += hdr + namez
        self._buf += b"\0" * (-len(self._buf) % 4)
        self._buf += data
        self._buf += b"\0" * (-len(self._buf) % 4)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755, nlink=2)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        p = self._norm(path)
        self._parents(p)
        if p not in self._dirs:
            self._dirs.add(p)
            self._entry(p, stat.S_IFDIR | (mode & 0o7777), nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        p = self._norm(path)
        self._parents(p)
        self._entry(p, stat.S_IFREG | (mode & 0o7777), data)

    def add_symlink(self, path: str, target: str) -> None:
        p = self._norm(path)
        self._parents(p)
        self._entry(p, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        p = self._norm(path)
        self._parents(p)
        namez = p.encode() + b"\0"
        fields = (self._ino, stat.S_IFCHR | mode, 0, 0, 1, 0, 0, 0, 0, major, minor, len(namez), 0)
        self._ino += 1
        self._buf += b"070701" + b"".join(b"%08X" % f for f in fields) + namez
        self._buf += b"\0" * (-len(self._buf) % 4)

    def finish(self) -> bytes:
        if not self._closed:
            self._entry("TRAILER!!!", 0, nlink=1)
            self._closed = True
        return bytes(self._buf)


# ---------------------------------------------------------------------------
# kernel, modules, binaries
# ---------------------------------------------------------------------------


def _version_key(p: Path) -> list[object]:
    ver = p.name.removeprefix("vmlinuz-")
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", ver)]


def kernel_path() -> Path:
    """The newest /boot/vmlinuz-* (for which modules are installed, if any are)."""
    cands = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key)
    if not cands:
        raise BuildError(
            "no guest kernel: /boot/vmlinuz-* not found (apt-get install -y linux-image-amd64)"
        )
    with_mods = [k for k in cands if (MODULES_ROOT / kernel_version(k) / "modules.dep").exists()]
    return (with_mods or cands)[-1]


def kernel_version(kernel: Path) -> str:
    return kernel.name.removeprefix("vmlinuz-")


def _modname(path_or_name: str) -> str:
    base = path_or_name.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def _parse_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (relative path, [dependency names])."""
    dep_file = moddir / "modules.dep"
    if not dep_file.exists():
        raise BuildError(f"{dep_file} missing: modules for this kernel are not installed")
    table: dict[str, tuple[str, list[str]]] = {}
    for line in dep_file.read_text().splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[_modname(path)] = (path.strip(), [_modname(d) for d in deps.split()])
    return table


def _builtin_modules(moddir: Path) -> set[str]:
    f = moddir / "modules.builtin"
    if not f.exists():
        return set()
    return {_modname(line) for line in f.read_text().split()}


def resolve_modules(version: str, wanted: Sequence[str]) -> list[tuple[str, Path]]:
    """Module (name, absolute path) list in load order: each module's hard
    dependencies (modules.dep, recursively) come before it; the order of
    ``wanted`` is otherwise kept.  Built-in modules are skipped."""
    moddir = MODULES_ROOT / version
    table = _parse_modules_dep(moddir)
    builtin = _builtin_modules(moddir)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()
    missing: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise BuildError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        if name not in table:
            if name not in builtin:
                missing.append(name)
            return
        rel, deps = table[name]
        for d in deps:
            visit(d, (*stack, name))
        seen.add(name)
        path = moddir / rel
        if not path.exists():
            missing.append(f"{name} ({path})")
            return
        order.append((name, path))

    for w in wanted:
        visit(_modname(w), ())
    if missing:
        raise BuildError(f"kernel {version}: modules not found: {', '.join(missing)}")
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if not zstd:
            raise BuildError(f"{path}: zstd-compressed module and no zstd tool")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return data


_LDD_RE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)", re.MULTILINE)


def shared_libs(binary: Path) -> list[Path]:
    """Absolute paths of the shared libraries (and the dynamic loader) ``ldd`` lists."""
    r = subprocess.run(["ldd", str(binary)], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        if "not a dynamic executable" in (r.stdout + r.stderr):
            return []
        raise BuildError(f"ldd {binary} failed: {r.stderr.strip()}")
    if "not found" in r.stdout:
        raise BuildError(f"ldd {binary}: missing libraries:\n{r.stdout}")
    return [Path(m) for m in _LDD_RE.findall(r.stdout)]


# ---------------------------------------------------------------------------
# base initramfs
# ---------------------------------------------------------------------------


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(version: str, modules: Sequence[str], binaries: Sequence[tuple[Path, str]]) -> str:
    h = hashlib.sha256()
    h.update(version.encode())
    h.update(_file_sha(BUSYBOX).encode())
    h.update(_file_sha(Path(__file__)).encode())
    h.update(",".join(modules).encode())
    for b, guest in binaries:
        st = b.stat()
        h.update(f"{b}>{guest}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _build_cpio(
    version: str, modules: Sequence[str], binaries: Sequence[tuple[Path, str]]
) -> bytes:
    if not BUSYBOX.exists():
        raise BuildError(f"{BUSYBOX} missing (apt-get install -y busybox-static)")
    w = CpioWriter()
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "mnt",
        "run",
        "etc",
        "root",
        "var",
        "lib/modules/guest",
    ):
        w.add_dir(d)
    w.add_chardev("dev/console", 5, 1)
    w.add_chardev("dev/null", 1, 3, 0o666)
    w.add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.add_file("etc/group", b"root:x:0:\n")
    for hf in HOST_FILES:
        if Path(hf).exists():
            w.add_file(hf, Path(hf).read_bytes())

    order = resolve_modules(version, modules)
    names: list[str] = []
    for name, path in order:
        fname = f"{name}.ko"
        w.add_file(f"lib/modules/guest/{fname}", _module_bytes(path))
        names.append(fname)
    w.add_file("lib/modules/guest/order", ("\n".join(names) + "\n").encode())

    added: set[str] = set()
    for b, guest in binaries:
        w.add_file(guest, b.read_bytes(), 0o755)
        for lib in shared_libs(b):
            key = str(lib)
            if key in added:
                continue
            added.add(key)
            w.add_file(key, lib.resolve().read_bytes(), 0o755)
            # merged-/usr hosts report /lib/...; also make /usr/lib/... resolve
            if key.startswith("/lib/x86_64-linux-gnu/"):
                alt = "/usr" + key
                if alt not in added:
                    added.add(alt)
                    w.add_symlink(alt, key)

    init = INIT_SCRIPT.replace("@LD_LIBRARY_PATH@", _LD_LIBRARY_PATH)
    w.add_file("init", init.encode(), 0o755)
    w.add_file("lib/vhtest.sh", SH_LIB.encode())
    return w.finish()


def build_base_initramfs(
    cache_dir: Path,
    modules: Sequence[str] = DEFAULT_MODULES,
    binaries: Iterable[Binary] | None = None,
) -> Path:
    """Build (or reuse) the gzip'd base initramfs; returns its path.

    ``binaries`` defaults to those of :data:`DEFAULT_BINARIES` that exist on
    the host (fio, iperf3, mkfs.ext4); each is a host path (copied to the same
    guest path) or a (host path, guest path) pair.  fio's libraries make the
    image ~35 MB gzip'd and boot ~1.5 s slower; pass ``()`` for a minimal one.

    The file is padded with zeros to a multiple of 512 bytes so a plain cpio
    appended to it starts 4-byte aligned, as the kernel requires.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    kernel = kernel_path()
    version = kernel_version(kernel)

    def pair(b: Binary) -> tuple[Path, str]:
        return (Path(b[0]), b[1]) if isinstance(b, tuple) else (Path(b), str(b))

    if binaries is None:
        bins = [pair(b) for b in DEFAULT_BINARIES if pair(b)[0].exists()]
    else:
        bins = [pair(b) for b in binaries]
        for b, _ in bins:
            if not b.exists():
                raise BuildError(f"binary {b} not found")
    key = _cache_key(version, modules, bins)
    out = cache_dir / f"initramfs-{version}-{key}.cpio.gz"
    if out.exists():
        return out
    with open(cache_dir / ".build.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if out.exists():  # another worker built it while we waited
                return out
            data = _build_cpio(version, modules, bins)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".initramfs-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as raw:
                    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                        gz.write(data)
                    pad = -raw.tell() % 512
                    raw.write(b"\0" * pad)
                os.chmod(tmp, 0o644)
                os.replace(tmp, out)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


# ---------------------------------------------------------------------------
# per-test workload
# ---------------------------------------------------------------------------


def workload_cpio(script: str, files: dict[str, bytes] | None = None) -> bytes:
    """An uncompressed newc cpio with /workload.sh (0755) and extra files.

    Paths in ``files`` are absolute in the guest (e.g. ``"/data/x"``); files
    whose name ends in ``.sh`` or that start with ``#!`` are made executable.
    Inode numbers start high so they do not clash with the base archive's.
    """
    w = CpioWriter(ino_start=1_000_000)
    w.add_file("workload.sh", script.encode(), 0o755)
    for path, data in (files or {}).items():
        mode = 0o755 if path.endswith(".sh") or data.startswith(b"#!") else 0o644
        w.add_file(path, data, mode)
    return w.finish()


def make_initrd(base: Path, script: str, out: Path, files: dict[str, bytes] | None = None) -> Path:
    """Write ``out`` = base initramfs + workload cpio; returns ``out``."""
    base_bytes = Path(base).read_bytes()
    if len(base_bytes) % 4:
        base_bytes += b"\0" * (-len(base_bytes) % 4)
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(base_bytes)
        f.write(workload_cpio(script, files))
    os.replace(tmp, out)
    return out
