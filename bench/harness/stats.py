"""Summaries of repeated measurements, and terminal progress with a time estimate."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence


def summary(samples: Sequence[float]) -> dict[str, object]:
    """median / min / max / n of the finite samples (and the samples themselves)."""
    vals = [float(v) for v in samples if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "samples": [round(v, 6) for v in vals],
    }


def fmt_duration(s: float) -> str:
    s = max(0, round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Steps of estimated duration; prints which step runs and the time left,
    re-scaling the estimate of the remaining steps by how long finished ones took."""

    def __init__(self, estimates: Sequence[tuple[str, str, float]]) -> None:
        # (kind, label, estimated seconds)
        self.steps = list(estimates)
        self.i = 0
        self.t_start = time.monotonic()
        self.t_step = self.t_start
        self.actual: dict[str, list[float]] = {}
        self.est_of: dict[str, list[float]] = {}

    def _scale(self, kind: str) -> float:
        a, e = self.actual.get(kind), self.est_of.get(kind)
        if a and e and sum(e) > 0:
            return sum(a) / sum(e)
        all_a = sum(sum(v) for v in self.actual.values())
        all_e = sum(sum(v) for v in self.est_of.values())
        return all_a / all_e if all_e > 0 else 1.0

    def left(self) -> float:
        rest = self.steps[self.i :]
        return sum(est * self._scale(kind) for kind, _, est in rest)

    def begin(self, label: str) -> None:
        self.t_step = time.monotonic()
        n = len(self.steps)
        elapsed = fmt_duration(self.t_step - self.t_start)
        print(
            f"[{self.i + 1}/{n}] {label}  (elapsed {elapsed}, ~{fmt_duration(self.left())} left)",
            flush=True,
        )

    def end(self) -> None:
        if self.i < len(self.steps):
            kind, _, est = self.steps[self.i]
            self.actual.setdefault(kind, []).append(time.monotonic() - self.t_step)
            self.est_of.setdefault(kind, []).append(est)
        self.i += 1

    @staticmethod
    def note(msg: str) -> None:
        print(f"      {msg}", flush=True)

    @staticmethod
    def warn(msg: str) -> None:
        print(f"      WARNING: {msg}", file=sys.stderr, flush=True)
