"""3-D rotary position embedding (interleaved pairs) over text, rows, columns and frames.

Tables are built with numpy at the edge (positions are static per shape) and
applied in MLX.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

LATENT_DIMS = 8  # rotary pairs reserved for the text / frame axis when the model has text


def token_positions(h: int, w: int, frames: int, text_len: int, pt_seq_len: int, three_d: bool) -> np.ndarray:
    """Positions of ``[text; frames x h x w]`` tokens, shape (text_len + frames*h*w, 2 or 3).

    Rows and columns are rescaled so that any grid spans the training grid
    ``pt_seq_len``; text tokens sit on the third axis spread over the same span.
    """
    mean_len, span = np.float32(math.sqrt(h * w)), np.float32(pt_seq_len)
    rows = np.arange(h, dtype=np.float32) / mean_len * span
    cols = np.arange(w, dtype=np.float32) / mean_len * span
    pr, pc = (a.reshape(-1) for a in np.meshgrid(rows, cols, indexing="ij"))
    n_frames = max(frames, 1)
    pr, pc = np.tile(pr, n_frames), np.tile(pc, n_frames)
    if not three_d:
        if text_len:
            raise ValueError("2-D rotary positions cannot carry text")
        return np.stack([pr, pc], axis=-1)
    pt = np.repeat(np.arange(n_frames, dtype=np.float32), h * w) if frames else np.zeros_like(pr)
    if text_len:
        txt = np.arange(text_len, dtype=np.float32) / np.float32(text_len) * np.float32(pt_seq_len)
        zeros = np.zeros(text_len, np.float32)
        pr, pc, pt = np.concatenate([zeros, pr]), np.concatenate([zeros, pc]), np.concatenate([txt, pt])
    return np.stack([pr, pc, pt], axis=-1)


def rope_angles(positions: np.ndarray, head_dim: int, three_d: bool) -> np.ndarray:
    """Angles (S, head_dim), each pair's angle repeated twice in place."""
    half = head_dim // 2
    spatial = half - LATENT_DIMS if three_d else half
    f = 1.0 / (10000.0 ** (np.arange(0, spatial, 2, dtype=np.float32)[: spatial // 2] / np.float32(spatial)))
    parts = [positions[:, 0:1] * f, positions[:, 1:2] * f]
    if three_d:
        g = 1.0 / (10000.0 ** (np.arange(LATENT_DIMS, dtype=np.float32) / np.float32(LATENT_DIMS)))
        parts.append(positions[:, 2:3] * g)
    angles = np.concatenate(parts, axis=-1).astype(np.float32)
    return np.repeat(angles, 2, axis=-1)


def rope_tables(h: int, w: int, frames: int, text_len: int, pt_seq_len: int, head_dim: int, three_d: bool):
    """cos and sin tables (S, head_dim) as float32 MLX arrays."""
    ang = rope_angles(token_positions(h, w, frames, text_len, pt_seq_len, three_d), head_dim, three_d)
    return mx.array(np.cos(ang)), mx.array(np.sin(ang))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate adjacent channel pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    xf = x.astype(mx.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos + rotated * sin).astype(x.dtype)
