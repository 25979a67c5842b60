"""Pixel-space video models (the built-in moving digits) behind the video VAE's interface.

``VideoPipeline`` speaks to a codec: ``encode`` (frames -> flow data), ``decode_frames``
(flow data -> frames to show), its spatial and temporal factors. A model trained on
pixels needs no VAE, only this identity codec: frames are the data (times the
manifest's ``pixel_scale``; grayscale models keep one channel), one pixel frame per
flow frame, and frames come out enlarged (nearest neighbour) so that a 12-pixel
canvas is big enough to watch and meets H.264's even sizes.
"""

from __future__ import annotations

import math
from typing import Iterator

import mlx.core as mx

VIEW_SIDE = 128  # decoded frames are enlarged to at least this many pixels a side


class PixelVideo:
    """Identity codec: ``(B, T, H, W, 3)`` frames in [-1, 1] <-> ``(B, T, H, W, channels)`` flow data."""

    factor = 1
    temporal_factor = 1
    has_encoder = True
    tile = None  # nothing to tile: kept so callers can treat every codec alike

    def __init__(self, channels: int, pixel_scale: float = 1.0):
        if channels not in (1, 3):
            raise ValueError(f"a pixel-space video model has 1 or 3 channels, got {channels}")
        self.channels, self.pixel_scale = channels, pixel_scale

    def encode(self, video) -> mx.array:
        """RGB frames (B, T, H, W, 3) in [-1, 1] -> the flow's data (luma for grayscale models), float32."""
        x = mx.array(video).astype(mx.float32)
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"video must be channels-last (B, T, H, W, 3), got shape {tuple(x.shape)}")
        if self.channels == 1:  # ITU-R 601 luma, as PIL's "L" conversion
            x = (x * mx.array([0.299, 0.587, 0.114])).sum(axis=-1, keepdims=True)
        return x * self.pixel_scale

    def enlargement(self, height: int, width: int) -> int:
        """Integer zoom making the smaller side at least VIEW_SIDE, and both sides even (H.264's 4:2:0 needs it)."""
        k = max(1, math.ceil(VIEW_SIDE / min(height, width)))
        while (height * k) % 2 or (width * k) % 2:
            k += 1
        return k

    def decode_frames(self, data) -> Iterator[mx.array]:
        """Flow data (B, T, H, W, channels) -> RGB frames (B, 1, kH, kW, 3) float32, one frame at a time."""
        x = mx.array(data).astype(mx.float32) / self.pixel_scale
        if x.ndim != 5 or x.shape[-1] != self.channels:
            raise ValueError(f"data must be channels-last (B, T, H, W, {self.channels}), got {tuple(x.shape)}")
        k = self.enlargement(x.shape[2], x.shape[3])
        for t in range(x.shape[1]):
            frame = mx.repeat(mx.repeat(x[:, t : t + 1], k, axis=2), k, axis=3)
            yield mx.broadcast_to(frame, (*frame.shape[:-1], 3)) if self.channels == 1 else frame

    def decode(self, data) -> mx.array:
        return mx.concatenate(list(self.decode_frames(data)), axis=1)
