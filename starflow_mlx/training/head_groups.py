"""Attention computed a group of heads at a time, forward and backward, for the recomputation of a checkpointed layer.

Every head's float32 scores (and, in the backward pass, their softmax and gradients) alive at once are what a
checkpointed layer's working set grows with: at STARFlow-V's 3,456 tokens of a 5-frame clip, 64 heads of scores are
2.85 GB an array. Here the heads go through :func:`~starflow_mlx.models.layers.attention` and its gradient in
groups whose scores hold at most :data:`SCORE_BYTES`, each group's inputs made to depend on the previous group's
result so MLX computes and frees them one after another. The gradients are the unchunked ones: the same operations
on slices of the heads.
"""

from __future__ import annotations

import mlx.core as mx

from starflow_mlx.models.layers import Attention, attention

SCORE_BYTES = 2**28  # float32 scores of one group of heads


def heads_at_once(heads: int, kv_heads: int, queries: int, keys: int) -> int:
    """Query heads per group: as many as keep a group's scores within :data:`SCORE_BYTES`, in whole key/value
    heads (the query heads sharing one stay together), at least one key/value head's."""
    per_kv = heads // kv_heads
    fit = SCORE_BYTES // (4 * queries * keys * per_kv)
    return per_kv * max(1, min(kv_heads, fit))


def grouped_attention(q: mx.array, k, v, scale: float, mask: mx.array | str | None) -> mx.array:
    """:func:`~starflow_mlx.models.layers.attention` (same arguments; ``mask`` without a head axis) a group of
    heads at a time, its vjp too; a quantized cache's keys, or heads that fit one group, go to it unchanged."""
    if isinstance(k, tuple):
        return attention(q, k, v, scale, mask)
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads_at_once(heads, kv_heads, q.shape[2], k.shape[2])
    if group >= heads:
        return attention(q, k, v, scale, mask)
    per_kv = heads // kv_heads
    spans = [(lo, min(lo + group, heads)) for lo in range(0, heads, group)]

    def in_turn(step, q, k, v, *rest):
        """``step`` on each group's slices of q, k, v (and of ``rest``, per query head), after the previous
        group's results: a list of per-group result lists."""
        results = []
        for lo, hi in spans:
            args = [q[:, lo:hi], k[:, lo // per_kv:hi // per_kv], v[:, lo // per_kv:hi // per_kv],
                    *(r[:, lo:hi] for r in rest)]
            if results:
                args = mx.depends(args, results[-1])
            results.append(step(*args))
        return results

    def forward(q, k, v):
        return [attention(q, k, v, scale, mask)]

    @mx.custom_function
    def attend(q, k, v):
        return mx.concatenate([r[0] for r in in_turn(forward, q, k, v)], axis=1)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        def backward(q, k, v, cotangent):
            return mx.vjp(forward, [q, k, v], [cotangent])[1]

        grads = in_turn(backward, *primals, cotangent)
        return tuple(mx.concatenate([g[i] for g in grads], axis=1) for i in range(3))

    return attend(q, k, v)


class GroupedAttention(Attention):
    """:class:`~starflow_mlx.models.layers.Attention` through :func:`grouped_attention`; layers become this class in
    place (:func:`~starflow_mlx.training.lora.checkpoint_layers`), so parameter names do not change."""

    attend = staticmethod(grouped_attention)
