"""Exact inversion of the flow, with guidance, and sampling with known tokens held (inpainting).

Guided encode: a guided sampling step computes token t's ``(a, b)`` from the conditional and
the unconditional predictions on the same prefix (both halves of the doubled batch continue
with the guided token), so each guided block is still an autoregressive affine map of its
input, and the forward pass inverts it exactly: run the block on ``[x; x]`` with
``[y; y_uncond]``, combine with :func:`~starflow_mlx.sampling.guidance.guide`, and
``z = (x - b) / a``. Blocks are guided exactly where :meth:`STARFlow.reverse` guides them.

Known tokens (:func:`reverse_known`): every block is inverted token by token, and a token whose
whole patch is known is replaced by its known value at that block's input (from the forward pass
of a filled-in image) instead of ``b + a * z``: what follows it in the block's order is
generated given it. What comes before it in one block's order sees it in the next, as the
blocks alternate their order.
"""

from __future__ import annotations

import mlx.core as mx

from starflow_mlx.models.kv_cache import KVCache
from starflow_mlx.models.starflow import STARFlow
from starflow_mlx.models.tarflow import MetaBlock
from starflow_mlx.sampling.guidance import guide
from starflow_mlx.sampling.sequential import REPORT_EVERY
from starflow_mlx.sampling.stepper import ChunkStepper


def _guided_text(flow: STARFlow, block: MetaBlock, y, y_uncond, cfg: float):
    """The block's text (stacked [cond; uncond] when it is guided), its length, and the guidance weight."""
    y_block, text_len = flow._text_for(block, y)
    if cfg > 0 and y_block is not None:
        if y_uncond is None:
            raise ValueError("cfg > 0 needs y_uncond (the features of the empty prompt)")
        return mx.concatenate([y_block, y_uncond.astype(y_block.dtype)], axis=0), text_len, cfg
    return y_block, text_len, 0.0


def encode_blocks(flow: STARFlow, x: mx.array, y: mx.array | None = None, y_uncond: mx.array | None = None,
                  cfg: float = 0.0) -> tuple[mx.array, list[mx.array | None]]:
    """Data ``x`` -> the noise ``z`` that guided sampling with weight ``cfg`` maps back to ``x``.

    Also returns each block's input (patchified grids; None for identity blocks), in block order.
    """
    flow._check_input(x, "x")
    h = flow._patchify(x.astype(mx.float32))
    inputs = []
    for block in flow.blocks:
        if block.is_identity:
            inputs.append(None)
            continue
        inputs.append(h)
        layout = flow._layout(h, block.index)
        y_block, text_len, weight = _guided_text(flow, block, y, y_uncond, cfg)
        seq = layout.permute(layout.to_sequence(h), block.flips, flow._in_frame)
        rope = flow.rope(layout, text_len)
        if weight > 0:
            a, b = block.affine(mx.concatenate([seq, seq], axis=0), y_block, rope)
            a, b = guide(a, b, weight)
            a, b = a[: seq.shape[0]], b[: seq.shape[0]]
        else:
            a, b = block.affine(seq, y_block, rope)
        h = layout.to_grid(layout.permute((seq - b) / a, block.flips, flow._in_frame))
    return flow._unpatchify(h), inputs


def encode(flow: STARFlow, x: mx.array, y: mx.array | None = None, y_uncond: mx.array | None = None,
           cfg: float = 0.0) -> mx.array:
    """Data -> noise, the exact inverse of ``flow.reverse(z, y, y_uncond=y_uncond, cfg=cfg)``."""
    return encode_blocks(flow, x, y, y_uncond, cfg)[0]


def token_mask(flow: STARFlow, mask: mx.array) -> mx.array:
    """A data-space mask (True = known), shaped like the data, -> per token (patchified grid, all channels):
    a token is known only when its whole patch is."""
    tokens = flow._patchify(mask.astype(mx.float32))
    return mx.broadcast_to(mx.min(tokens, axis=-1, keepdims=True) > 0.5, tokens.shape)


def reverse_known(flow: STARFlow, z: mx.array, known: list[mx.array | None], mask: mx.array,
                  y: mx.array | None = None, y_uncond: mx.array | None = None, cfg: float = 0.0,
                  progress=None) -> mx.array:
    """Noise -> data, every block inverted token by token with the known tokens held.

    ``known``: each block's input for an image whose known part is right (:func:`encode_blocks`);
    ``mask``: :func:`token_mask` of the known part. ``progress(label, done, total)`` is called as the sampler calls
    it: ``(0, total)`` as a block starts, then every ``REPORT_EVERY`` tokens and at its end.
    """
    flow._check_input(z, "z")
    x = flow._patchify(z.astype(mx.float32))
    for block in [flow.blocks[-1], *reversed(flow.blocks[:-1])]:
        if block.is_identity:
            continue
        layout = flow._layout(x, block.index)
        y_block, text_len, weight = _guided_text(flow, block, y, y_uncond, cfg)

        def order(grid):
            return layout.permute(layout.to_sequence(grid), block.flips, flow._in_frame)

        seq = order(x)
        report = flow.block_progress(block, progress, seq.shape[1])  # as the sampler reports
        cos, sin = flow.rope(layout, text_len)
        out = _invert_known(block, seq, order(known[block.index]), order(mask), y_block, weight, cos, sin, report)
        x = layout.to_grid(layout.permute(out, block.flips, flow._in_frame))
    return flow._unpatchify(x)


def _invert_known(block: MetaBlock, z: mx.array, known: mx.array, mask: mx.array, y: mx.array | None, cfg: float,
                  cos: mx.array, sin: mx.array, on_token=None) -> mx.array:
    """One block solved token by token (as the sequential sampler does), known tokens replacing computed ones."""
    def doubled(v):
        return mx.concatenate([v, v], axis=0) if cfg > 0 else v

    zz, kk, mm = doubled(z), doubled(known), doubled(mask)
    batch, n = zz.shape[0], zz.shape[1]
    text_len = y.shape[1] if (block.sees_text and y is not None) else 0
    cache: KVCache = block.new_cache(batch, text_len + n)
    if text_len:
        block.encode_text(y, cache, cos, sin)
    step = ChunkStepper(block, cache, cos, sin, cfg)
    if block.use_sos:
        tokens, prev, first, shift = [], block.start_token(batch), 0, 0
    else:  # token 0 passes through; step t predicts token t + 1 from token t
        prev = mx.where(mm[:, :1], kk[:, :1], zz[:, :1])
        tokens, first, shift = [prev], 1, 1
    for t in range(first, n):
        z_t = zz[:, t: t + 1]
        new, _, _ = step(prev, z_t, z_t, text_len + t - shift, 1)
        prev = mx.where(mm[:, t: t + 1], kk[:, t: t + 1], new)
        tokens.append(prev)
        mx.async_eval(prev, *cache.state())
        if on_token is not None and (t + 1 == n or (t + 1) % REPORT_EVERY == 0):
            on_token(t + 1, n)
    return mx.concatenate(tokens, axis=1)[: z.shape[0]]
