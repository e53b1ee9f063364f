"""Back-end descriptors: the JSON files through which management software finds
vhost-user back ends (QEMU's docs/interop/vhost-user.json, ``VhostUserBackend``; the
vhost-user spec's "Backend program conventions").

One file per registered device, named ``50-vhost-py-NAME.json`` (the schema asks for a
two-digit prefix, so files sort predictably), holding::

    {"description": "...", "type": "block", "binary": "/abs/path/vhost-user-blk",
     "tags": ["vhost-py 0.1.0"]}

``type`` is the device's ``backend_type`` (a ``VHostUserBackendType``), ``binary`` the
absolute path of its console script as installed next to the Python that runs this
(else the first on PATH). The schema's descriptor has no features: features are what
the binary prints for ``--print-capabilities`` (``VHostUserBackendCapabilities``), so
installing runs each binary that way and refuses one whose answer is not a JSON object
of the descriptor's type. A file is written only once every descriptor checks out:
libvirt parses every file of the directory before it uses any, and one bad file fails
the whole lookup (docs/libvirt.md).

``python -m vhost install-descriptors [--dir DIR] [--dry-run] [--uninstall]``:
``--dir`` defaults to /usr/share/qemu/vhost-user (distribution packages; sysadmins'
own go to /etc/qemu/vhost-user); ``--dry-run`` prints what would be written or removed;
``--uninstall`` removes this project's files (``50-vhost-py-*.json``) and nothing else.

Boundary: imports no device (the registry finds them); writes only files named like
ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from vhost import registry
from vhost.device import DeviceType

#: where distribution packages install descriptors (vhost-user.json)
DEFAULT_DIR = Path("/usr/share/qemu/vhost-user")
#: every file of ours starts so; the rest is the device name and ``.json``
FILE_PREFIX = "50-vhost-py-"
#: vhost-user.json's VHostUserBackendType, in its order
BACKEND_TYPES = (
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
)
#: VhostUserBackend's members: name -> whether it is optional
MEMBERS = {"description": False, "type": False, "binary": False, "tags": True}
CAPABILITIES_TIMEOUT = 30.0
PROG = "python -m vhost install-descriptors"


class DescriptorError(Exception):
    """A descriptor (or the binary it names) that management software could not use."""


@dataclass(frozen=True)
class Descriptor:
    """One device's descriptor and the file it goes to."""

    device: str
    file_name: str
    doc: dict[str, Any]

    def text(self) -> str:
        return json.dumps(self.doc, indent=2) + "\n"


def file_name(device: str) -> str:
    return f"{FILE_PREFIX}{device}.json"


def find_binary(program: str) -> str | None:
    """The absolute path of console script ``program``: the one installed beside the
    running Python (sys.executable's directory, not resolved: a venv's bin), else the
    first on PATH; None when there is neither."""
    beside = Path(sys.executable).with_name(program)
    if beside.is_file() and os.access(beside, os.X_OK):
        return os.path.abspath(beside)
    found = shutil.which(program)
    return os.path.abspath(found) if found else None


def check_descriptor(doc: object) -> None:
    """Raise DescriptorError unless ``doc`` is a valid ``VhostUserBackend``: the members
    the schema has and no others, of its types, ``type`` one of :data:`BACKEND_TYPES`,
    ``binary`` an absolute path."""
    if not isinstance(doc, dict):
        raise DescriptorError(f"a descriptor is a JSON object, not {type(doc).__name__}")
    unknown = sorted(set(doc) - set(MEMBERS))
    if unknown:
        raise DescriptorError(f"members not in VhostUserBackend: {unknown}")
    missing = [m for m, optional in MEMBERS.items() if not optional and m not in doc]
    if missing:
        raise DescriptorError(f"missing members: {missing}")
    for member in ("description", "type", "binary"):
        if not isinstance(doc[member], str):
            raise DescriptorError(f"{member} must be a string, not {doc[member]!r}")
    if doc["type"] not in BACKEND_TYPES:
        raise DescriptorError(f"type {doc['type']!r} is not a VHostUserBackendType")
    if not os.path.isabs(doc["binary"]):
        raise DescriptorError(f"binary {doc['binary']!r} is not an absolute path")
    tags = doc.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DescriptorError(f"tags must be a list of strings, not {tags!r}")


def check_capabilities(binary: str, backend_type: str) -> dict[str, Any]:
    """Run ``BINARY --print-capabilities`` as management software would; return the
    JSON object it printed. Raises DescriptorError unless it exits 0 with an object
    whose ``type`` is ``backend_type``."""
    try:
        r = subprocess.run(
            [binary, "--print-capabilities"],
            capture_output=True,
            text=True,
            timeout=CAPABILITIES_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DescriptorError(f"{binary} --print-capabilities: {e}") from None
    if r.returncode != 0:
        raise DescriptorError(
            f"{binary} --print-capabilities exited {r.returncode}: {r.stderr.strip()[-300:]}"
        )
    try:
        caps = json.loads(r.stdout)
    except ValueError:
        raise DescriptorError(
            f"{binary} --print-capabilities printed no JSON: {r.stdout[:200]!r}"
        ) from None
    if not isinstance(caps, dict) or caps.get("type") != backend_type:
        raise DescriptorError(
            f"{binary} --print-capabilities printed {caps!r}, expected type {backend_type!r}"
        )
    return caps


def _version() -> str:
    try:
        return metadata.version("vhost-py")
    except metadata.PackageNotFoundError:
        return "unknown"


def descriptor_for(device_type: DeviceType, binary: str) -> Descriptor:
    """The descriptor of ``device_type`` served by ``binary`` (checked against the
    schema; the binary is not run)."""
    doc: dict[str, Any] = {
        "description": f"vhost-py {device_type.program}: {device_type.summary}",
        "type": device_type.backend_type,
        "binary": binary,
        "tags": [f"vhost-py {_version()}"],
    }
    check_descriptor(doc)
    return Descriptor(device_type.name, file_name(device_type.name), doc)


def descriptors(names: Sequence[str] | None = None) -> list[Descriptor]:
    """Every registered device's descriptor (or those of ``names``), each binary found
    and its ``--print-capabilities`` checked. Raises DescriptorError for the first that
    fails, registry.RegistryError for a device that cannot be loaded."""
    out = []
    for name in registry.names() if names is None else names:
        device_type = registry.load(name)
        binary = find_binary(device_type.program)
        if binary is None:
            raise DescriptorError(
                f"{device_type.program} is not installed beside {sys.executable} nor on "
                "PATH (pip install the project first)"
            )
        d = descriptor_for(device_type, binary)
        check_capabilities(binary, device_type.backend_type)
        out.append(d)
    return out


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0644) by a rename: a reader sees the old file
    or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def install(directory: Path, *, dry_run: bool = False) -> list[Path]:
    """Write every descriptor into ``directory`` (made if missing); returns the paths.
    Nothing is written unless every descriptor checks out."""
    ds = descriptors()
    paths = [directory / d.file_name for d in ds]
    for d, path in zip(ds, paths, strict=True):
        if dry_run:
            print(f"would write {path}:\n{d.text()}", end="")
            continue
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        _write(path, d.text())
        print(f"installed {path} ({d.doc['type']}: {d.doc['binary']})")
    return paths


def installed(directory: Path) -> list[Path]:
    """This project's descriptor files in ``directory``, sorted."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{FILE_PREFIX}*.json") if p.is_file())


def uninstall(directory: Path, *, dry_run: bool = False) -> list[Path]:
    """Remove this project's descriptor files from ``directory``; returns them."""
    paths = installed(directory)
    for path in paths:
        if dry_run:
            print(f"would remove {path}")
        else:
            path.unlink()
            print(f"removed {path}")
    if not paths:
        print(f"no {FILE_PREFIX}*.json in {directory}")
    return paths


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog=PROG,
        description="Install the vhost-user back-end descriptors (QEMU's vhost-user.json) "
        "of every registered device, one file each, where management software such as "
        "libvirt looks for them.",
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        metavar="DIR",
        help=f"where the files go (default {DEFAULT_DIR}; a sysadmin's own: /etc/qemu/vhost-user)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print what would be written or removed")
    ap.add_argument(
        "--uninstall", action="store_true", help=f"remove {FILE_PREFIX}*.json from DIR instead"
    )
    return ap


def main(argv: list[str]) -> int:
    """``python -m vhost install-descriptors ...``; returns the exit status (2: bad
    arguments, 1: a descriptor or binary that does not check out, or a file that could
    not be written or removed)."""
    args = make_parser().parse_args(argv)
    directory = Path(os.path.abspath(args.dir))
    try:
        if args.uninstall:
            uninstall(directory, dry_run=args.dry_run)
        else:
            install(directory, dry_run=args.dry_run)
    except (DescriptorError, registry.RegistryError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e.filename or directory}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
