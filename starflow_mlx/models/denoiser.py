"""The learnable self-denoiser of STARFlow-V: a bidirectional transformer over the noisy latents."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from starflow_mlx.config import FlowConfig
from starflow_mlx.models.layers import RMSNorm, compute_dtype
from starflow_mlx.models.tarflow import make_layers

DENOISER_LAYERS = 8


def frame_window_mask(text_len: int, frames: int, frame_size: int, causal_frames: int, window: int | None) -> mx.array:
    """Boolean mask over ``[text; frames]``: every query sees the text, and frames within the window.

    A query in frame f sees frames from ``f + A - 1 - G`` to ``f + A - 1`` (A = causal_frames,
    G = window); text queries see frames up to ``A - 1``.
    """
    size = text_len + frames * frame_size
    q = np.arange(size)[:, None]
    k = np.arange(size)[None, :]
    g = 10000 if window is None else window
    k_frame = (k - text_len) // frame_size
    lower = (q - text_len) // frame_size + causal_frames - 1 - g
    upper = np.maximum(q - text_len, 0) // frame_size + causal_frames - 1
    return mx.array((k < text_len) | ((k_frame >= lower) & (k_frame <= upper)))


class Denoiser(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        c = config.token_channels
        heads = config.num_heads if config.num_heads is not None else config.channels // config.head_dim
        kv_heads = config.num_kv_heads if config.num_kv_heads is not None else heads
        self.causal_frames = config.temporal_causal
        self.window = config.denoiser_window
        self.proj_in = nn.Linear(c, config.channels)
        self.proj_out = nn.Linear(config.channels, c)
        if config.conditional_denoiser and config.txt_dim > 0:
            self.proj_txt = nn.Linear(config.txt_dim, config.channels)
        self.attn_blocks = make_layers(config, config.channels, heads, kv_heads, DENOISER_LAYERS)
        if config.use_final_norm:
            self.final_norm = RMSNorm(config.channels)

    @property
    def sees_text(self) -> bool:
        return "proj_txt" in self

    def __call__(self, x: mx.array, y: mx.array | None, rope, frames: int, frame_size: int) -> mx.array:
        """``x`` (B, N, c) tokens in grid order; returns the raw denoiser output (B, N, c)."""
        h = self.proj_in(x.astype(compute_dtype(self.proj_in)))
        n_text = 0
        if self.sees_text and y is not None:
            prefix = self.proj_txt(y.astype(compute_dtype(self.proj_txt)))
            n_text = prefix.shape[1]
            h = mx.concatenate([prefix.astype(h.dtype), h], axis=1)
        mask = None
        if self.causal_frames > 0 and frames > 0:
            mask = frame_window_mask(n_text, frames, frame_size, self.causal_frames, self.window)
        for layer in self.attn_blocks:
            h = layer(h, rope, mask)
        h = h[:, n_text:]
        if "final_norm" in self:
            h = self.final_norm(h)
        return self.proj_out(h).astype(mx.float32)
