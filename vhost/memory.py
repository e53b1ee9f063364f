"""Guest memory: the regions the front end shares with us, mmapped, and address
translation with bounds checks.

The map itself (``struct vu_mem``) lives in C so the ring walker reads it
without Python; this class owns it, adds and removes regions, and offers the
same translations to Python for tests and control-plane use. It knows nothing
of the protocol: callers pass plain numbers and fds. Callers must stop every
queue that reads this map before changing it (the session does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vhost import limits
from vhost._native import ffi, lib

MAX_REGIONS: int = limits.MAX_MEM_SLOTS


class GuestMemoryError(Exception):
    """A region could not be added/removed, or an address is outside guest memory."""


_REGION_ERRORS = {
    -16: "overlaps an existing region",
    -17: f"no free slot (at most {MAX_REGIONS} regions)",
    -18: "has zero size or wraps around the address space",
    -19: "does not match any mapped region",
    -22: "runs past the end of its file (mmap_offset + size > file size)",
}


@dataclass(frozen=True)
class Region:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


class GuestMemory:
    """The mapped regions of one front end's guest RAM."""

    def __init__(self) -> None:
        self._mem = ffi.new("struct vu_mem *")
        self._regions: list[Region] = []

    @property
    def handle(self) -> object:
        """The C map, for vhost.virtqueue; nobody else should need it."""
        return self._mem

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def add(self, region: Region, fd: int) -> None:
        """Map ``fd`` as ``region``. The fd stays the caller's (close it after)."""
        rc = lib.vu_mem_add(self._mem, region.guest_phys_addr, region.memory_size,
                            region.userspace_addr, region.mmap_offset, fd)
        if rc == -20:
            err = ffi.errno
            raise GuestMemoryError(f"mmap of region {_describe(region)} failed: {os.strerror(err)}")
        if rc < 0:
            raise GuestMemoryError(f"region {_describe(region)} {_REGION_ERRORS.get(rc, rc)}")
        self._regions.append(region)

    def remove(self, region: Region) -> None:
        rc = lib.vu_mem_remove(self._mem, region.guest_phys_addr, region.memory_size,
                               region.userspace_addr)
        if rc < 0:
            raise GuestMemoryError(f"region {_describe(region)} {_REGION_ERRORS.get(rc, rc)}")
        self._regions = [r for r in self._regions
                         if (r.guest_phys_addr, r.memory_size, r.userspace_addr)
                         != (region.guest_phys_addr, region.memory_size, region.userspace_addr)]

    def clear(self) -> None:
        lib.vu_mem_clear(self._mem)
        self._regions.clear()

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
    return (f"gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} "
            f"uva={r.userspace_addr:#x} offset={r.mmap_offset:#x}")
