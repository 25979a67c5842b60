"""Progress for long work, shared by every command: moving bars on a terminal, one line per stage elsewhere.

Work reports ``progress(label, done, total, **info)``. A stage's bar appears on its
first report (work reports ``(0, total)`` before it starts) and moves with each later
one. Stage times are real: MLX evaluates lazily, so the clock is read only after
``mx.synchronize()``. A stage that runs again (one per image batch) starts its bar
over and adds to its time. Without a terminal nothing animates: each finished stage
is logged as one line on stderr, and a long stage also once it has run 5 seconds and then every
30 seconds while it runs, reports or not (a first image or training step that builds MLX's kernels
for 20 seconds to a minute reports nothing).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import mlx.core as mx

LOG_EVERY = 30.0  # seconds between lines of a running stage when not on a terminal
LOG_FIRST = 5.0  # a stage still running after this long gets its first line at once (silence reads as a hang)


def about(seconds: float) -> str:
    """A time estimate in words: seconds when under two minutes, minutes under two hours, then hours."""
    if seconds < 120:
        return f"about {max(5, round(seconds / 5) * 5)} s" if seconds >= 5 else "a few seconds"
    if seconds < 7200:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def describe_info(info: dict) -> str:
    if "iterations" in info:
        return f"{info['iterations']} it, residual {info['residual']:.1e}"
    return str(info.get("note", ""))


class StageProgress:
    """A ``progress`` callback that draws one bar per stage and times each stage."""

    def __init__(self, console=None, live: bool | None = None):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.bars = Progress(TextColumn("{task.description:>20}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                             TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                             disable=not self.live)
        self.tasks: dict[str, int] = {}
        self.running: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.last = self.logged = time.perf_counter()
        self.current: tuple[str, int, int, dict] | None = None  # the running stage's last report
        self.named: set[str] = set()  # stages that have had their first line while running
        self.stopped = threading.Event()
        self.beat = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self) -> "StageProgress":
        self.bars.start()
        if not self.live:
            self.beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.beat.is_alive():
            self.beat.join()
        self.bars.stop()

    def _heartbeat(self) -> None:
        while not self.stopped.wait(min(LOG_FIRST, LOG_EVERY) / 10):
            now, current = time.perf_counter(), self.current
            if current is None:
                continue
            label, done, total, info = current
            began = self.running.get(label, now)
            if now - self.logged >= LOG_EVERY or (label not in self.named and now - began >= LOG_FIRST):
                self.named.add(label)
                self._line(f"{label}: {done}/{total}, {now - began:.0f}s so far", info, now)

    def __call__(self, label: str, done: int, total: int, **info) -> None:
        now = time.perf_counter()
        if label not in self.running:
            # A stage first heard of part-way through began when the previous one ended.
            self.running[label] = now if done == 0 else self.last
            if label in self.tasks:
                self.bars.reset(self.tasks[label], total=total)
            else:
                self.tasks[label] = self.bars.add_task(label, total=total, info="")
        self.bars.update(self.tasks[label], completed=done, total=total, info=describe_info(info))
        self.current = (label, done, total, info) if done < total else None
        if not self.live and done < total and now - self.logged >= LOG_EVERY:
            self._line(f"{label}: {done}/{total}", info, now)
        if done >= total:
            mx.synchronize()  # the work reported done may still be queued
            end = time.perf_counter()
            took = end - self.running.pop(label)
            self.seconds[label] = self.seconds.get(label, 0.0) + took
            self.last = end
            if not self.live:
                self._line(f"{label}: {done}/{total} in {took:.2f}s", info, end)

    def _line(self, text: str, info: dict, now: float) -> None:
        extra = describe_info(info)
        self.console.print(text + (f" ({extra})" if extra else ""), highlight=False, markup=False, soft_wrap=True)
        self.logged = now

    @contextmanager
    def stage(self, label: str, note: str = ""):
        """A one-step stage around a block of work."""
        self(label, 0, 1, note=note)
        yield
        self(label, 1, 1, note=note)

    def log(self, message: str) -> None:
        """A line of output that stays above the bars."""
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def summary(self) -> str:
        return "  ".join(f"{label} {seconds:.2f}s" for label, seconds in self.seconds.items())
