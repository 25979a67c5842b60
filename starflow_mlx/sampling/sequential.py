"""Sequential inversion of one TARFlow block: one token per step through a KV cache."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from starflow_mlx.models.tarflow import MetaBlock
from starflow_mlx.sampling.frames import FrameHook
from starflow_mlx.sampling.stepper import ChunkStepper

REPORT_EVERY = 64  # tokens between progress reports: each report is also where a server job's cancel takes effect


def invert_sequential(
    block: MetaBlock,
    z: mx.array,
    y: mx.array | None,
    cos: mx.array,
    sin: mx.array,
    cfg: float = 0.0,
    on_token: Callable[..., None] | None = None,
    prefix: mx.array | None = None,
    kv_bits: int | None = None,
    on_frame: Callable[[int, mx.array], None] | None = None,
    frame_size: int = 0,
    window: int | None = None,
    context_frames: int = 1,
) -> mx.array:
    """Solve ``x`` from ``z`` (B, N, c) token by token.

    With ``cfg > 0``, ``y`` stacks [cond; uncond] text, the batch is doubled and
    every step is guided. ``cos``/``sin`` cover ``[text; tokens]``. ``prefix`` (B, P, c)
    holds tokens already known: they are encoded in one pass and kept as they are.
    ``kv_bits`` (8, 4) stores the KV cache quantized. ``on_frame(t, tokens)`` is called as each run of
    ``frame_size`` tokens (a video frame of the deep block) becomes final, known ones included.
    ``window`` (frames): the deep block of a video longer than it attends to that many frames at
    most; when they are full, the cache restarts after the text with the last ``context_frames``
    frames as a fresh sequence (as the Jacobi sampler slides, so both solve the same equations).
    """
    zz = mx.concatenate([z, z], axis=0) if cfg > 0 else z
    batch, n = zz.shape[0], zz.shape[1]
    text_len = y.shape[1] if (block.sees_text and y is not None) else 0
    span = n if window is None else min(n, window * frame_size)
    cache = block.new_cache(batch, text_len + span, kv_bits)
    if text_len:
        block.encode_text(y, cache, cos, sin)
    step = ChunkStepper(block, cache, cos, sin, cfg)
    if prefix is not None:
        if not block.use_sos or not 0 < prefix.shape[1] < n:
            raise ValueError("context needs a start-of-sequence token and must be shorter than the sequence")
        known = mx.concatenate([prefix, prefix], axis=0) if cfg > 0 else prefix
        # The cache keeps the whole known part while at least a frame still fits after it.
        keep = known.shape[1] if known.shape[1] + frame_size <= span else context_frames * frame_size
        block.encode_known(known[:, known.shape[1] - keep:], cache, text_len, cos, sin)
        tokens, prev, first, shift = [known], known[:, -1:], known.shape[1], known.shape[1] - keep
    elif block.use_sos:
        tokens, prev, first, shift = [], block.start_token(batch), 0, 0
    else:
        # Token 0 passes through; step t then predicts token t + 1 from token t.
        tokens, prev, first, shift = [zz[:, :1]], zz[:, :1], 1, 1
    hook = FrameHook(on_frame, frame_size, z.shape[0]) if on_frame is not None else None
    if hook is not None:
        for known_tokens in tokens:
            hook.add(known_tokens)
    for t in range(first, n):
        if t - shift == span:  # window full: the text stays, the last context frames are encoded again
            keep = context_frames * frame_size
            block.encode_known(mx.concatenate(tokens, axis=1)[:, t - keep:], cache, text_len, cos, sin)
            shift = t - keep
        z_t = zz[:, t : t + 1]
        prev, _, _ = step(prev, z_t, z_t, text_len + t - shift, 1)
        tokens.append(prev)
        mx.async_eval(prev, *cache.state())
        if hook is not None:
            hook.add(prev)
        if on_token is not None and (t + 1 == n or (t + 1) % REPORT_EVERY == 0):
            on_token(t + 1, n)
    x = mx.concatenate(tokens, axis=1)
    return x[: z.shape[0]]
