"""Our vhost-user back-end descriptors (vhost/descriptors.py) installed where libvirt
reads them, and libvirt still finding its own.

libvirt 9.0 reads /usr/share/qemu/vhost-user and /etc/qemu/vhost-user (no per-user
directory for the system instance) only to find a back end for two devices: a
vhost-user GPU (``<video><driver name='vhostuser'/>``) and a virtiofs
``<filesystem>`` without ``<binary path>``; its vhostuser disks and interfaces name
their sockets and look nothing up. It parses *every* file there before it uses any,
and a file it cannot parse fails the lookup, whichever device it was for. So:

* negative control -- a descriptor with a type libvirt does not know, installed beside
  Debian's 50-qemu-virtiofsd.json, makes ``virsh create`` of a domain with a virtiofs
  share fail with libvirt's parse error (no QEMU is started);
* ours installed with the documented command -- the same domain starts: libvirt found
  virtiofsd through Debian's descriptor and started it, the guest mounts the share,
  reads a file the host wrote and writes one the host reads back; libvirtd's debug
  log shows each of our files parsed (its type and binary) and no parse error.

The test removes exactly the files it added (and puts back, byte for byte, any file of
ours that was installed before it ran).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest import build, qemu
from tests.qemu.harness import needs_qemu
from tests.support.daemon import this_tree_env
from vhost import descriptors, registry

from .domain import DomainSpec, LibvirtGuest, filesystem_virtiofs
from .instance import LibvirtError, PrivateLibvirt, why_not_supported

SYSTEM_DIR = descriptors.DEFAULT_DIR
VIRTIOFSD_DESCRIPTOR = SYSTEM_DIR / "50-qemu-virtiofsd.json"
BROKEN = SYSTEM_DIR / "99-vhtest-broken.json"
TAG = "hostshare"
HOST_TEXT = "written by the host through virtiofs\n"
GUEST_TEXT = "written by the guest"

pytestmark = [
    pytest.mark.qemu,
    needs_qemu,
    pytest.mark.skipif(why_not_supported() is not None, reason=why_not_supported() or ""),
    pytest.mark.skipif(
        not VIRTIOFSD_DESCRIPTOR.exists(),
        reason=f"needs {VIRTIOFSD_DESCRIPTOR} (Debian's qemu-system-common ships it)",
    ),
]

SCRIPT = rf"""
. /lib/vhtest.sh
mkdir -p /mnt/share
mount -t virtiofs {TAG} /mnt/share || {{ echo "FAIL: mount"; exit 1; }}
result host_md5 "$(md5sum < /mnt/share/from-host | cut -d' ' -f1)"
echo -n "{GUEST_TEXT}" > /mnt/share/from-guest || exit 1
sync
umount /mnt/share
result done 1
"""


@pytest.fixture(scope="module")
def fs_base() -> Path:
    """The minimal guest initramfs plus virtiofs (and fuse, its dependency)."""
    return build.build_base_initramfs(
        build.default_cache_dir(), modules=(*build.DEFAULT_MODULES, "virtiofs"), binaries=()
    )


def install_command() -> list[str]:
    """The documented command (README, docs/libvirt.md)."""
    return [sys.executable, "-m", "vhost", "install-descriptors"]


@contextlib.contextmanager
def ours_installed(directory: Path) -> Iterator[list[Path]]:
    """Our descriptors installed into ``directory`` by the documented command; at the
    end each file it added is removed and each it replaced is put back."""
    ours = [directory / descriptors.file_name(n) for n in registry.names()]
    before = {p: p.read_bytes() for p in ours if p.exists()}
    try:
        r = subprocess.run(
            [*install_command(), "--dir", str(directory)],
            capture_output=True,
            text=True,
            env={**os.environ, **this_tree_env()},
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        yield ours
    finally:
        for p in ours:
            if p in before:
                p.write_bytes(before[p])
            else:
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def broken_descriptor() -> Iterator[Path]:
    BROKEN.write_text(
        json.dumps({"description": "tests/libvirt", "type": "no-such-type", "binary": "/bin/false"})
    )
    try:
        yield BROKEN
    finally:
        BROKEN.unlink(missing_ok=True)


def test_libvirt_finds_its_virtiofsd_with_ours_installed(
    libvirt: PrivateLibvirt, lv_workdir: Path, lv_kernel: Path, fs_base: Path
) -> None:
    w = lv_workdir
    share = w / "share"
    share.mkdir(mode=0o755)
    (share / "from-host").write_text(HOST_TEXT)
    initrd = build.make_initrd(fs_base, SCRIPT, w / "fs.initrd")
    spec = DomainSpec(
        "vhtest-virtiofs",
        lv_kernel,
        initrd,
        w / "vhtest-virtiofs.console.log",
        devices=[filesystem_virtiofs(share, TAG)],
    )
    xml = w / "fs.xml"
    xml.write_text(spec.xml())
    guest = LibvirtGuest(libvirt, spec.name, spec.console)

    # negative control: one file libvirt cannot parse fails the lookup
    with broken_descriptor(), pytest.raises(LibvirtError) as e:
        guest.create(xml)
    assert "unknown vhost-user type: 'no-such-type'" in str(e.value), e.value
    assert libvirt.domain_state(spec.name) == "gone"

    with ours_installed(SYSTEM_DIR) as ours:
        docs = {p: json.loads(p.read_text()) for p in ours}
        for doc in docs.values():
            descriptors.check_descriptor(doc)
        log_from = len(libvirt.log_text())
        guest.create(xml)
        try:
            live = libvirt.virsh("dumpxml", spec.name).stdout
            rc, text = guest.run_workload(timeout=90)
        finally:
            if guest.running():
                guest.destroy()
        looked_up = libvirt.log_text()[log_from:]

    res = qemu.results(text)
    assert rc == 0 and res.get("done") == "1", guest.diag("virtiofs workload failed")
    assert res["host_md5"] == hashlib.md5(HOST_TEXT.encode()).hexdigest(), res
    assert (share / "from-guest").read_text() == GUEST_TEXT
    # libvirt picked Debian's virtiofsd, not one of ours
    binary = json.loads(VIRTIOFSD_DESCRIPTOR.read_text())["binary"]
    assert f"<binary path='{binary}'/>" in live, live
    # ... having parsed every file, ours included
    for p, doc in docs.items():
        assert f"description path '{p}' type : {doc['type']}" in looked_up, looked_up
        assert f"description path '{p}' binary : {doc['binary']}" in looked_up, looked_up
    assert "unable to parse json" not in looked_up and "unknown vhost-user" not in looked_up
    # exactly what the test added is gone again
    assert not BROKEN.exists()
