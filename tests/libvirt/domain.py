"""libvirt domains for the test guests: the XML (a TCG domain booting the test
kernel and initramfs directly, shared memfd RAM, a serial console to a file, and our
vhost-user devices), and :class:`LibvirtGuest`, a domain as the console helpers of
tests/qemu see a guest.

The device XML is what docs/libvirt.md shows users:

* :func:`vhostuser_disk` -- ``<disk type='vhostuser'>`` on a vhost-user-blk socket,
  with ``<reconnect>`` (QEMU's ``reconnect=N``: the back end may restart under it);
* :func:`vhostuser_interface` -- ``<interface type='vhostuser'>``, QEMU the client
  (``mode='client'``: our daemon listens), with ``<reconnect>``, and a user alias so
  that :func:`no_msix_override` can set ``vectors=0`` on that NIC: QEMU 7.2 under TCG
  crashes when a guest enables MSI-X on a vhost-user virtio-net-pci (FACTS.md; seen
  here too, libvirt logs "shutting down, reason=crashed"), and libvirt has no attribute
  for the vector count, so it is a ``<qemu:override>`` (libvirt >= 8.2; the domain is
  then tainted "custom-device").

Boundary: XML text and waiting on a domain; no assertions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

from tests.guest import qemu

from .instance import PrivateLibvirt

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
CMDLINE = "console=ttyS0 quiet panic=-1"


def _attr(value: object) -> str:
    return quoteattr(str(value))


def vhostuser_disk(socket: Path, *, target: str = "vda", reconnect: int | None = 1) -> str:
    """A virtio disk served by the vhost-user-blk back end listening on ``socket``;
    QEMU connects again every ``reconnect`` seconds after the connection drops."""
    again = f"\n    <reconnect enabled='yes' timeout='{reconnect}'/>" if reconnect else ""
    return f"""<disk type='vhostuser' device='disk'>
  <driver name='qemu' type='raw'/>
  <source type='unix' path={_attr(socket)}>{again}
  </source>
  <target dev={_attr(target)} bus='virtio'/>
</disk>"""


def vhostuser_interface(
    socket: Path, *, mac: str, alias: str = "ua-net0", reconnect: int | None = 1
) -> str:
    """A virtio NIC served by the vhost-user-net back end listening on ``socket``
    (QEMU is the client); ``alias`` (user aliases start with ``ua-``) names it for
    :func:`no_msix_override`."""
    again = f"\n    <reconnect enabled='yes' timeout='{reconnect}'/>" if reconnect else ""
    return f"""<interface type='vhostuser'>
  <mac address={_attr(mac)}/>
  <source type='unix' path={_attr(socket)} mode='client'>{again}
  </source>
  <model type='virtio'/>
  <alias name={_attr(alias)}/>
</interface>"""


def no_msix_override(alias: str = "ua-net0") -> str:
    """``vectors=0`` on device ``alias`` (legacy INTx; see the module docstring)."""
    return f"""<qemu:device alias={_attr(alias)}>
  <qemu:frontend>
    <qemu:property name='vectors' type='unsigned' value='0'/>
  </qemu:frontend>
</qemu:device>"""


def filesystem_virtiofs(source: Path, tag: str) -> str:
    """A virtiofs share of ``source``; no ``<binary path>``, so libvirt looks virtiofsd
    up in the vhost-user back-end descriptors."""
    return f"""<filesystem type='mount' accessmode='passthrough'>
  <driver type='virtiofs'/>
  <source dir={_attr(source)}/>
  <target dir={_attr(tag)}/>
</filesystem>"""


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


@dataclass
class DomainSpec:
    """A TCG domain booting ``kernel`` and ``initrd`` with its serial console written
    to ``console``; ``devices`` and ``overrides`` are XML snippets. ``<acpi/>``: without
    it libvirt passes ``-no-acpi`` and the guest's ``poweroff -f`` only halts the CPU
    (QEMU, and the domain, keep running)."""

    name: str
    kernel: Path
    initrd: Path
    console: Path
    devices: Sequence[str] = ()
    overrides: Sequence[str] = ()
    mem_mb: int = 512
    cmdline: str = CMDLINE

    def xml(self) -> str:
        devices = [
            *self.devices,
            f"<serial type='file'>\n  <source path={_attr(self.console)}/>\n"
            "  <target port='0'/>\n</serial>",
            "<controller type='usb' model='none'/>",
            "<memballoon model='none'/>",
        ]
        override = ""
        if self.overrides:
            body = "\n".join(_indent(o, 4) for o in self.overrides)
            override = f"\n  <qemu:override>\n{body}\n  </qemu:override>"
        return f"""<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>{self.name}</name>
  <memory unit='MiB'>{self.mem_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{self.kernel}</kernel>
    <initrd>{self.initrd}</initrd>
    <cmdline>{self.cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{_indent(chr(10).join(devices), 4)}
  </devices>{override}
</domain>
"""


@dataclass
class LibvirtGuest:
    """Domain ``name`` of ``lv`` as tests/qemu's console helpers see a guest:
    :attr:`path` is its serial console (crash_harness.Console reads it as it grows).
    Each boot should get a console file of its own (:meth:`new_console`)."""

    lv: PrivateLibvirt
    name: str
    path: Path
    started_at: float = 0.0
    boots: int = 0
    consoles: list[Path] = field(default_factory=list)

    def new_console(self) -> None:
        """Move the last boot's console aside (``NAME.console.N.log``), so that the next
        boot writes a file of its own from the start."""
        if self.path.exists():
            kept = self.path.with_name(f"{self.name}.console.{self.boots}.log")
            self.path.rename(kept)
            self.consoles.append(kept)

    def start(self) -> None:
        """``virsh start`` (a defined domain)."""
        self.new_console()
        self.started_at = time.monotonic()
        self.lv.virsh("start", self.name)
        self.boots += 1

    def create(self, xml_path: Path) -> None:
        """``virsh create`` (a transient domain, gone once it stops)."""
        self.new_console()
        self.started_at = time.monotonic()
        self.lv.virsh("create", str(xml_path))
        self.boots += 1

    def destroy(self) -> None:
        self.lv.virsh("destroy", self.name)

    def state(self) -> str:
        return self.lv.domain_state(self.name)

    def running(self) -> bool:
        return self.state() == "running"

    def qemu_alive(self) -> bool:
        """Whether the domain's QEMU runs (its pid file and process, no virsh call:
        cheap enough to poll)."""
        pid = self.qemu_pid()
        if pid is None:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def qemu_pid(self) -> int | None:
        return self.lv.qemu_pid(self.name)

    def output(self) -> str:
        return qemu.console_text(self.path)

    def diag(self, what: str) -> str:
        return (
            f"{what} (domain {self.name} {self.state()}, "
            f"{time.monotonic() - self.started_at:.1f}s since start)\n"
            f"--- console ---\n{self.output()[-3000:]}\n"
            f"--- QEMU log ---\n{self.lv.domain_log(self.name)[-2000:]}"
        )

    def wait_for(self, marker: str | re.Pattern[str], timeout: float) -> str:
        """The console text once ``marker`` is in it; qemu.GuestError if the domain
        stops first, qemu.GuestTimeout after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            stopped = not self.running()
            text = self.output()
            found = marker in text if isinstance(marker, str) else marker.search(text)
            if found:
                return text
            name = marker if isinstance(marker, str) else marker.pattern
            if stopped:
                raise qemu.GuestError(self.diag(f"the domain stopped before {name!r}"))
            if time.monotonic() > deadline:
                raise qemu.GuestTimeout(self.diag(f"no {name!r} within {timeout:.0f}s"))
            time.sleep(0.2)

    def wait_shut_off(self, timeout: float) -> None:
        """Wait until libvirt has torn the domain down (the guest powered off:
        ``on_poweroff`` destroy): "shut off", or gone for a transient one. QEMU takes a
        second or two after the guest's poweroff; until then the domain holds its
        console file (virtlogd refuses it to another domain: "Device or resource
        busy") and its name."""
        deadline = time.monotonic() + timeout
        while self.state() not in ("shut off", "gone"):
            if time.monotonic() > deadline:
                raise qemu.GuestTimeout(self.diag(f"still running after {timeout:.0f}s"))
            time.sleep(0.2)

    def run_workload(self, timeout: float) -> tuple[int, str]:
        """Like qemu.Guest.run_workload: (exit code, console between START and EXIT),
        once the guest has powered off."""
        self.wait_for(qemu.START_MARKER, timeout)
        text = self.wait_for(qemu.EXIT_RE, timeout)
        m = qemu.EXIT_RE.search(text)
        assert m is not None
        self.wait_shut_off(30)
        start = text.index(qemu.START_MARKER) + len(qemu.START_MARKER)
        return int(m.group(1)), text[start : m.start()].strip("\n")
