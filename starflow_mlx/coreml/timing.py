"""Per-package prediction time, and how much of the other packages' time overlapped the deep block's.

On Core ML the deep block runs on the GPU while the shallow blocks (Neural
Engine) and the VAE work on finished frames; the report measures how much of
that work really ran concurrently: the time during which the deep block and at
least one other package were both predicting.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

Interval = tuple[float, float]


def union(intervals: list[Interval]) -> list[Interval]:
    """Disjoint, sorted intervals covering the same time."""
    merged: list[list[float]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def intersection_seconds(a: list[Interval], b: list[Interval]) -> float:
    """Length of the time covered by both sets of intervals."""
    total, j = 0.0, 0
    a, b = union(a), union(b)
    for start, stop in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < stop:
            total += min(stop, b[k][1]) - max(start, b[k][0])
            k += 1
    return total


@dataclass(frozen=True)
class TimingReport:
    seconds: dict[str, float]  # prediction seconds per package
    calls: dict[str, int]
    deep: str  # the package the others are meant to overlap
    overlap: float  # seconds during which `deep` and at least one other package were predicting
    wall: float  # first prediction's start to the last one's end

    @property
    def others(self) -> float:
        return sum(sec for name, sec in self.seconds.items() if name != self.deep)

    def lines(self) -> list[str]:
        rows = [f"{name:<16} {self.calls[name]:>6} calls {sec:9.2f} s" for name, sec in sorted(self.seconds.items())]
        deep = self.seconds.get(self.deep, 0.0)
        share = f" ({100 * self.overlap / self.others:.0f}%)" if self.others else ""
        rows.append(f"overlap: {self.overlap:.2f} s of the other packages' {self.others:.2f} s ran while {self.deep} "
                    f"predicted{share}; {self.deep} {deep:.2f} s, {self.wall:.2f} s from first to last prediction")
        return rows


class TimedBackend:
    """Wraps a backend (Core ML or the interpreter) and records every prediction's package and interval."""

    def __init__(self, backend):
        self.backend = backend
        self.calls: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def make_state(self, package: str) -> Any:
        return self.backend.make_state(package)

    def predict(self, function: str, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.backend.predict(function, inputs, state)
        stop = time.perf_counter()
        with self._lock:
            self.calls.append((function.partition(".")[0], start, stop))
        return out

    def report(self, deep: str = "deep_block") -> TimingReport:
        with self._lock:
            calls = list(self.calls)
        seconds: dict[str, float] = {}
        counts: dict[str, int] = {}
        for name, start, stop in calls:
            seconds[name] = seconds.get(name, 0.0) + stop - start
            counts[name] = counts.get(name, 0) + 1
        mine = [(start, stop) for name, start, stop in calls if name == deep]
        others = [(start, stop) for name, start, stop in calls if name != deep]
        wall = max(c[2] for c in calls) - min(c[1] for c in calls) if calls else 0.0
        return TimingReport(seconds, counts, deep, intersection_seconds(mine, others), wall)
