"""Guest memory: the regions the front end shares with us, mmapped, and address
translation with bounds checks.

The map itself (``struct vu_mem``) lives in C so the ring walker reads it
without Python; this class owns it, adds and removes regions, and offers the
same translations to Python for tests and control-plane use. It knows nothing
of the protocol: callers pass plain numbers and fds. Callers must stop every
queue that reads this map before changing it (the session does).

The C map is sorted in both address spaces, so a translation is a binary search over
up to MAX_REGIONS (256) regions. A region on hugetlbfs (guest RAM from
``mem-path=/dev/hugepages`` or an ``MFD_HUGETLB`` memfd) must have its mmap_offset and
size in whole huge pages, or it is refused (docs/memory.md).

Views into guest memory that a Python device kept past its chain (vhost.chains) are
*pinned* here: a region that one points into is not unmapped when it goes but retired,
its pages replaced by private zero pages, and unmapped once the last such view is gone.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vhost import limits
from vhost._native import ffi, lib
from vhost.errors import CORE_ERRORS

if TYPE_CHECKING:
    from vhost._native import CData, vu_mem

MAX_REGIONS: int = limits.MAX_MEM_SLOTS

log = logging.getLogger("vhost.memory")


class GuestMemoryError(Exception):
    """A region could not be added/removed, or an address is outside guest memory."""


def _region_error(rc: int, fd: int | None = None) -> str:
    text = CORE_ERRORS.text(rc)
    if rc == lib.VU_ERR_REGION_FULL:
        text += f" (at most {MAX_REGIONS} regions)"
    elif rc == lib.VU_ERR_REGION_ALIGN and fd is not None:
        text += f" ({_size(os.fstatvfs(fd).f_bsize)})"
    return text


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Region:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass
class _Retired:
    """A region's address range, zero-filled, kept while views point into it."""

    base: CData
    size: int
    pins: list[_Pin] = field(default_factory=list)


@dataclass(frozen=True)
class _Pin:
    ref: weakref.ref[Any]  # the buffer a kept view holds
    address: int
    length: int

    @property
    def alive(self) -> bool:
        return self.ref() is not None


class GuestMemory:
    """The mapped regions of one front end's guest RAM."""

    def __init__(self) -> None:
        self._mem = ffi.new("struct vu_mem *")
        self._regions: list[Region] = []
        self._pins: list[_Pin] = []
        self._retired: list[_Retired] = []

    @property
    def handle(self) -> vu_mem:
        """The C map, for vhost.virtqueue; nobody else should need it."""
        return self._mem

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def add(self, region: Region, fd: int) -> None:
        """Map ``fd`` as ``region``. The fd stays the caller's (close it after)."""
        rc = lib.vu_mem_add(
            self._mem,
            region.guest_phys_addr,
            region.memory_size,
            region.userspace_addr,
            region.mmap_offset,
            fd,
        )
        if rc == lib.VU_ERR_MMAP:
            err = ffi.errno
            raise GuestMemoryError(f"mmap of region {_describe(region)} failed: {os.strerror(err)}")
        if rc < 0:
            raise GuestMemoryError(f"region {_describe(region)} {_region_error(rc, fd)}")
        self._regions.append(region)

    def remove(self, region: Region) -> None:
        self._release_retired()
        key = (region.guest_phys_addr, region.memory_size, region.userspace_addr)
        pins = self._pins_in(region)
        if pins:
            self._retire(region, pins)
        else:
            rc = lib.vu_mem_remove(self._mem, *key)
            if rc < 0:
                raise GuestMemoryError(f"region {_describe(region)} {_region_error(rc)}")
        self._regions = [
            r for r in self._regions if (r.guest_phys_addr, r.memory_size, r.userspace_addr) != key
        ]

    def clear(self) -> None:
        self._release_retired()
        for region in list(self._regions):
            pins = self._pins_in(region)
            if pins:
                self._retire(region, pins)
                self._regions.remove(region)
        lib.vu_mem_clear(self._mem)
        self._regions.clear()

    # --- views kept by Python devices (vhost.chains) ---
    def pin(self, ref: weakref.ref[Any], address: int, length: int) -> None:
        """A view of [address, address+length) (our address) outlived its chain; it stays
        alive as long as ``ref``. Its region will be retired rather than unmapped."""
        self._pins = [p for p in self._pins if p.alive]
        self._pins.append(_Pin(ref, address, length))
        log.warning(
            "a device kept a view of %d bytes of guest memory after its chain was "
            "finished; if its region goes, the view will see zero pages",
            length,
        )

    def _pins_in(self, region: Region) -> list[_Pin]:
        self._pins = [p for p in self._pins if p.alive]
        if not self._pins:
            return []
        try:
            start = self.translate_gpa(region.guest_phys_addr, region.memory_size)
        except GuestMemoryError:
            return []
        inside = [p for p in self._pins if start <= p.address < start + region.memory_size]
        self._pins = [p for p in self._pins if p not in inside]
        return inside

    def _retire(self, region: Region, pins: list[_Pin]) -> None:
        base = ffi.new("void **")
        size = ffi.new("uint64_t *")
        rc = lib.vu_mem_retire(
            self._mem, region.guest_phys_addr, region.memory_size, region.userspace_addr, base, size
        )
        if rc < 0:
            raise GuestMemoryError(f"region {_describe(region)} {_region_error(rc)}")
        self._retired.append(_Retired(base[0], int(size[0]), pins))
        log.warning(
            "region %s retired, not unmapped: %d view%s kept by a device still "
            "point into it (they now see zero pages)",
            _describe(region),
            len(pins),
            "" if len(pins) == 1 else "s",
        )

    def _release_retired(self) -> None:
        keep = []
        for r in self._retired:
            if any(p.alive for p in r.pins):
                keep.append(r)
            else:
                lib.vu_unmap(r.base, r.size)
        self._retired = keep

    @property
    def retired(self) -> int:
        """Address ranges kept (zero-filled) for views that outlived their chains."""
        self._release_retired()
        return len(self._retired)

    def translate_gpa(self, gpa: int, length: int) -> int:
        """Our address of guest-physical [gpa, gpa+length), all inside one region."""
        return self._translate(lib.vu_gpa_to_host, gpa, length, "guest-physical")

    def translate_uva(self, uva: int, length: int) -> int:
        """Our address of front-end-virtual [uva, uva+length), all inside one region."""
        return self._translate(lib.vu_uva_to_host, uva, length, "front-end virtual")

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(ffi.buffer(ffi.cast("char *", self.translate_gpa(gpa, length)), length))

    def write(self, gpa: int, data: bytes) -> None:
        ffi.memmove(ffi.cast("char *", self.translate_gpa(gpa, len(data))), data, len(data))

    def _translate(self, fn: object, addr: int, length: int, kind: str) -> int:
        if not (0 <= addr < 2**64 and 0 <= length < 2**64):
            raise GuestMemoryError(f"{kind} range {addr:#x}+{length:#x} out of range")
        ptr = fn(self._mem, addr, length)  # type: ignore[operator]
        if ptr == ffi.NULL:
            raise GuestMemoryError(f"{kind} range {addr:#x}+{length:#x} is not in guest memory")
        return int(ffi.cast("uintptr_t", ptr))

    def close(self) -> None:
        self.clear()


def _describe(r: Region) -> str:
    return (
        f"gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} "
        f"uva={r.userspace_addr:#x} offset={r.mmap_offset:#x}"
    )
