"""The C side's error codes, with the texts written next to them in C.

Each compiled module exports a table (``vu_error_table`` in the core, ``blk_error_table``
and so on in a device's module) whose rows come from one X-macro in its header, so a code,
its name and its text are written once. This module reads such tables and formats what a
queue recorded (code, head, detail) for log lines and exceptions.

Boundary: no ring or device logic; only the lookup and the formatting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vhost._native import ffi, lib

if TYPE_CHECKING:
    from vhost._native import CData, Pointer, vu_error_info


@dataclass(frozen=True)
class ErrorInfo:
    code: int
    name: str  # the C name, e.g. VU_ERR_ADDR
    text: str
    detail_is_errno: bool

    def describe(self, detail: int) -> str:
        """The text, with the detail as the C side meant it (an errno, or a value)."""
        if self.detail_is_errno:
            return f"{self.text}: {os.strerror(detail)}" if 0 < detail < 4096 else self.text
        return f"{self.text} (detail {detail:#x})"


class ErrorTable:
    """Codes to :class:`ErrorInfo`; a device's table falls back to the core's."""

    def __init__(self, rows: list[ErrorInfo], fallback: ErrorTable | None = None) -> None:
        self._rows = {row.code: row for row in rows}
        if len(self._rows) != len(rows):
            raise ValueError("an error table names one code twice")
        self._fallback = fallback
        if fallback is not None:
            clash = set(self._rows) & set(fallback._all())
            if clash:
                raise ValueError(f"error codes {sorted(clash)} are the core's")

    @classmethod
    def from_c(
        cls, table: Callable[[CData], Pointer[vu_error_info]], fallback: ErrorTable | None = None
    ) -> ErrorTable:
        """Read a module's table: ``table`` is its ``*_error_table(uint32_t *n)``."""
        count = ffi.new("uint32_t *")
        entries = table(count)
        rows = []
        for i in range(count[0]):
            e = entries[i]
            rows.append(
                ErrorInfo(
                    int(e.code),
                    _text(e.name),
                    _text(e.text),
                    int(e.detail_kind) == lib.VU_DETAIL_ERRNO,
                )
            )
        return cls(rows, fallback)

    def _all(self) -> dict[int, ErrorInfo]:
        rows = dict(self._fallback._all()) if self._fallback is not None else {}
        rows.update(self._rows)
        return rows

    def __iter__(self) -> Iterator[ErrorInfo]:
        return iter(sorted(self._all().values(), key=lambda row: -row.code))

    def __contains__(self, code: object) -> bool:
        return code in self._all()

    def get(self, code: int) -> ErrorInfo | None:
        row = self._rows.get(code)
        if row is None and self._fallback is not None:
            return self._fallback.get(code)
        return row

    def text(self, code: int) -> str:
        row = self.get(code)
        return row.text if row is not None else f"error {code}"

    def describe(self, code: int, detail: int) -> str:
        row = self.get(code)
        return row.describe(detail) if row is not None else f"error {code} (detail {detail:#x})"


def _text(pointer: CData) -> str:
    value = ffi.string(pointer)
    return value.decode() if isinstance(value, bytes) else str(value)


#: the core's codes (ring walk, guest memory, inflight region, kick fd)
CORE_ERRORS = ErrorTable.from_c(lib.vu_error_table)
