"""Per-package prediction time, and how much of it overlapped, around any driver backend."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np


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

    def seconds(self) -> dict[str, float]:
        """Prediction time per package."""
        totals: dict[str, float] = {}
        for name, start, stop in self.calls:
            totals[name] = totals.get(name, 0.0) + stop - start
        return totals

    def overlap(self) -> float:
        """Seconds of prediction time spent while another prediction was running (busy time minus its union)."""
        busy = union = 0.0
        end = -np.inf
        for _, start, stop in sorted(self.calls, key=lambda c: c[1]):
            busy += stop - start
            union += max(0.0, stop - max(start, end))
            end = max(end, stop)
        return busy - union

    def report(self) -> str:
        parts = ", ".join(f"{name} {sec:.2f} s" for name, sec in sorted(self.seconds().items()))
        return f"{parts}; overlapped {self.overlap():.2f} s"
