"""Deep and shallow blocks pipelined over the frames of a video.

The shallow blocks of a frame-local video model see one frame at a time, so a
frame can go through them as soon as the deep block has made it final, while
the deep block works on the next one. The shallow work runs on a worker thread
with its own MLX stream: a sampler's host reads (a Jacobi residual, a final
``mx.eval``) then block only the thread that issued them, and on the CPU each
stream has its own thread, so the two blocks' ops run side by side (MLX
releases the GIL while it waits). MLX streams belong to the thread that made
them, so the deep block's tokens reach the worker evaluated. One worker per
device lives as long as the process: a fresh stream per call would cost an OS
thread each time and retrace every compiled step (MLX compiles per stream).

The sample is the unpipelined one up to float32 rounding, except that a Jacobi
shallow block then stops on each frame's own residual rather than on all
frames' together (each frame meeting the threshold implies the joint test).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import mlx.core as mx


class StreamWorker:
    """A daemon thread that runs queued jobs with its own MLX stream on ``device``."""

    def __init__(self, device: mx.Device):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        started: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(device, started), name="starflow-shallow-blocks",
                         daemon=True).start()
        error = started.get()
        if error is not None:  # no worker to wait on later
            raise error

    def _serve(self, device: mx.Device, started: queue.SimpleQueue) -> None:
        try:
            stream = mx.new_stream(device)
        except Exception as error:
            started.put(error)
            return
        started.put(None)
        with mx.stream(stream):
            while True:
                self.jobs.get()()


_workers: dict[str, StreamWorker] = {}
_workers_lock = threading.Lock()


def stream_worker(device: mx.Device | None = None) -> StreamWorker:
    device = mx.default_device() if device is None else device
    key = str(device)
    with _workers_lock:
        if key not in _workers:
            _workers[key] = StreamWorker(device)
        return _workers[key]


class ShallowPipeline:
    """Runs ``invert(frame)`` (B, 1, H, W, c) -> (B, 1, H, W, c) on each submitted frame, in order, on the worker.

    ``report(frames_done)`` is called on the caller's thread as finished frames are collected.
    Use as a context manager: leaving it waits until the worker is done with this run, so no
    work of a failed call outlives it.
    """

    def __init__(self, invert: Callable[[mx.array], mx.array], frames: int,
                 report: Callable[[int], None] | None = None):
        self.invert, self.report = invert, report
        self.out: list[mx.array | None] = [None] * frames
        self.collected = 0
        self.worker = stream_worker()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.failed = False  # set on the worker after an error, or by the caller when it gives up
        self.finished = False

    def __enter__(self) -> "ShallowPipeline":
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.failed = True
            self._drain()

    def _run(self, t: int, frame: mx.array) -> None:
        if self.failed:
            return
        try:
            out = self.invert(frame)
            mx.eval(out)
            self.done.put((t, out))
        except BaseException as error:  # handed to the caller's thread, which raises it
            self.failed = True
            self.done.put((None, error))

    def submit(self, t: int, frame: mx.array) -> None:
        """Queue frame ``t`` (final deep-block output as a grid); collect whatever has finished meanwhile."""
        mx.eval(frame)
        self.worker.jobs.put(lambda: self._run(t, frame))
        while not self.done.empty():
            self._collect(self.done.get())

    def _collect(self, item) -> None:
        t, out = item
        if t is None:
            raise out
        self.out[t] = out
        self.collected += 1
        if self.report is not None:
            self.report(self.collected)

    def _drain(self) -> list:
        """Wait for the worker to reach this point of the queue; the items it produced meanwhile."""
        self.finished = True
        self.worker.jobs.put(lambda: self.done.put(None))
        items = []
        while (item := self.done.get()) is not None:
            items.append(item)
        return items

    def result(self) -> mx.array:
        """All frames through the shallow blocks, (B, T, H, W, c); waits for the last ones."""
        for item in self._drain():
            self._collect(item)
        if self.collected != len(self.out):
            raise RuntimeError(f"the deep block finished {self.collected} of {len(self.out)} frames")
        return mx.concatenate(self.out, axis=1)
