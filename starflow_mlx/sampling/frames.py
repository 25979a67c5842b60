"""Hand a video's frames to a callback as soon as the deep block's sampler has made them final."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx


class FrameHook:
    """Collects final tokens in block order and calls ``on_frame(t, tokens)`` once per whole frame, in order.

    ``tokens`` is (batch, frame_size, c): the conditional half only when guidance doubled the batch.
    """

    def __init__(self, on_frame: Callable[[int, mx.array], None], frame_size: int, batch: int):
        self.on_frame, self.frame_size, self.batch = on_frame, frame_size, batch
        self.pending: list[mx.array] = []
        self.waiting = 0  # tokens in ``pending``
        self.done = 0  # tokens received
        self.frames = 0  # frames handed on

    def add(self, tokens: mx.array) -> None:
        if tokens.shape[1] == 0:
            return
        self.pending.append(tokens[: self.batch])
        self.waiting += tokens.shape[1]
        self.done += tokens.shape[1]
        while self.waiting >= self.frame_size:
            seq = self.pending[0] if len(self.pending) == 1 else mx.concatenate(self.pending, axis=1)
            self.on_frame(self.frames, seq[:, : self.frame_size])
            self.frames += 1
            self.waiting -= self.frame_size
            self.pending = [seq[:, self.frame_size :]] if self.waiting else []
