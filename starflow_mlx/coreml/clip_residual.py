"""The noise a sampled clip came from: MLX's forward flow, teacher-forced on the clip itself.

A flow is exactly invertible, so a clip that a program sampled from noise ``z`` maps back to ``z`` under the
forward flow, every token conditioned on the program's own earlier tokens. Mapping back sees each sampling step
once, with the inputs that step had: an error in one step stays in that step's tokens, where the difference
between two whole clips carries it down the chain, amplified by every step after it. So what comes back differs
from ``z`` by single-step float16 error only, and a broken step shows however long the clip.

The deep block follows ``STARFlow.reverse``: guided ``(a, b)`` when it sees text, known first frames before the
sampled ones, and past the window its sequence restarts after the text with the last context frames. The shallow
blocks are frame-local, and a frame-local block never sees text (the config's rule): one plain forward per frame.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from starflow_mlx.models.starflow import Layout
from starflow_mlx.sampling.guidance import guide
from starflow_mlx.sampling.jacobi import attention_window, window_context


def window_segments(tokens: int, known: int, frame: int, span: int, context: int) -> list[tuple[int, int, int]]:
    """``(base, start, stop)`` of each fresh sequence the deep block runs while sampling ``tokens`` tokens, the
    first ``known`` given: tokens start .. stop-1 are sampled after tokens base .. start-1 (known or re-encoded).

    ``span``: the tokens of the window; ``context``: the tokens re-encoded when it slides. The known tokens all
    stay while a frame still fits after them.
    """
    keep = known if known + frame <= span else context
    base, start, segments = known - keep, known, []
    while True:
        stop = min(base + span, tokens)
        segments.append((base, start, stop))
        if stop >= tokens:
            return segments
        base, start = stop - context, stop


def _deep_affine(block, seq: mx.array, y, y_uncond, cfg: float, rope) -> tuple[mx.array, mx.array]:
    """Every token's ``(a, b)`` from the tokens before it, guided as sampling guides the deep block."""
    if not block.sees_text:
        return block.affine(seq, None, rope)
    if cfg <= 0:
        return block.affine(seq, y, rope)
    a, b = guide(*block.affine(mx.concatenate([seq, seq]), mx.concatenate([y, y_uncond]), rope), cfg)
    return a[:seq.shape[0]], b[:seq.shape[0]]


def clip_noise(flow, x: np.ndarray, y: np.ndarray | None = None, y_uncond: np.ndarray | None = None,
               cfg: float = 0.0, *, known: int = 0, context_frames: int | None = None) -> np.ndarray:
    """The noise (B, T - known, H, W, C) of the sampled frames of the clip ``x`` (B, T, H, W, C), its first
    ``known`` frames given: the inverse of ``flow.reverse(z, y, y_uncond=..., cfg=..., context_frames=...,
    context=x[:, :known])`` on the frames it samples, computed in ``flow``'s own precision.

    Needs frame-local shallow blocks, as every STARFlow-V export has.
    """
    tokens = flow._patchify(mx.array(np.asarray(x, np.float32)))
    batch, frames, h, w, c = tokens.shape
    y = None if y is None else mx.array(y)
    y_uncond = None if y_uncond is None else mx.array(y_uncond)
    in_frame = flow._in_frame
    one = Layout(batch, 1, h, w, c, True)
    mapped = []
    for t in range(frames):  # the shallow blocks, frame by frame in index order
        frame = tokens[:, t:t + 1]
        for block in flow.blocks[:-1]:
            if block.is_identity:
                continue
            seq = one.permute(one.to_sequence(frame), block.flips, in_frame)
            a, b = block.affine(seq, None, flow.rope(one, 0))
            frame = one.to_grid(one.permute((seq - b) / a, block.flips, in_frame))
        mapped.append(frame)
    deep, n = flow.blocks[-1], h * w
    clip = Layout(batch, frames, h, w, c, False)
    seq = clip.permute(clip.to_sequence(mx.concatenate(mapped, axis=1)), deep.flips, in_frame)
    window = attention_window(flow, deep, clip)
    span = seq.shape[1] if window is None else window * n
    context = n * window_context(window, context_frames) if window is not None else 0
    text_len = y.shape[1] if deep.sees_text else 0
    noise = []
    for base, start, stop in window_segments(seq.shape[1], known * n, n, span, context):
        rope = flow.rope(Layout(batch, (stop - base) // n, h, w, c, False), text_len)
        a, b = _deep_affine(deep, seq[:, base:stop], y, y_uncond, cfg, rope)
        noise.append((seq[:, start:stop] - b[:, start - base:]) / a[:, start - base:])
    sampled = Layout(batch, frames - known, h, w, c, False)
    z = sampled.to_grid(sampled.permute(mx.concatenate(noise, axis=1), deep.flips, in_frame))
    return np.array(flow._unpatchify(z).astype(mx.float32))
