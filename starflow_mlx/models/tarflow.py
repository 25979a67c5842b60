"""One TARFlow block: an autoregressive affine flow over a token sequence.

Forward (data -> noise) maps ``x`` to ``z = (x - b) / a`` where ``(a, b)`` for
token t are predicted causally from tokens before t. The step functions used by
the samplers live here too: they run a chunk of tokens at a cache position and
return ``(a, b)``. Scales, shifts and residuals stay in float32.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx.config import FlowConfig
from starflow_mlx.models.kv_cache import KVCache, position_mask
from starflow_mlx.models.layers import AttentionBlock, RMSNorm, compute_dtype

INV_SOFTPLUS_1 = 0.541324854612918  # log(e - 1): the scale is exactly 1 when the network outputs 0


def make_layers(config: FlowConfig, channels: int, heads: int, kv_heads: int, count: int) -> list[AttentionBlock]:
    return [
        AttentionBlock(channels, config.head_dim, heads, kv_heads, expansion=config.expansion,
                       use_swiglu=config.use_swiglu, norm_type=config.norm_type, use_qk_norm=config.use_qk_norm,
                       use_post_norm=config.use_post_norm, use_bias=config.use_bias)
        for _ in range(count)
    ]


class IdentityBlock(nn.Module):
    """A block with zero layers: the identity map, no parameters."""

    is_identity = True


class MetaBlock(nn.Module):
    is_identity = False
    # Set when this process holds only some of the layers (pipeline parallel, starflow_mlx.io.distributed):
    # the hidden state then crosses from the ranks before and on to the ranks after.
    stage = None

    def __init__(self, config: FlowConfig, index: int):
        super().__init__()
        channels = config.block_channels(index)
        c = config.token_channels
        self.index = index
        self.channels = channels
        self.heads = config.block_heads(index)
        self.kv_heads = config.block_kv_heads(index)
        self.head_dim = config.head_dim
        self.use_sos = config.sos
        self.use_softplus = config.use_softplus
        self.soft_clip = float(config.soft_clip)
        self.sees_text = config.block_sees_text(index)
        self.flips = config.block_flips(index)
        self.proj_in = nn.Linear(c, channels)
        self.proj_out = nn.Linear(channels, 2 * c)
        if config.sos:
            self.sos_embed = mx.zeros((1, 1, c))
        if self.sees_text:
            self.proj_txt = nn.Linear(config.txt_dim, channels)
        self.attn_blocks = make_layers(config, channels, self.heads, self.kv_heads, config.layers_per_block[index])
        if config.use_final_norm:
            self.final_norm = RMSNorm(channels)

    # -- shared pieces -------------------------------------------------------------------
    @property
    def dtype(self) -> mx.Dtype:
        return compute_dtype(self.proj_in)

    def _head(self, h: mx.array) -> tuple[mx.array, mx.array]:
        """Final norm and output projection to float32 ``(a, b)``."""
        if "final_norm" in self:
            h = self.final_norm(h)
        out = self.proj_out(h).astype(mx.float32)
        if self.soft_clip > 0:
            out = self.soft_clip * mx.tanh(out / self.soft_clip)
        xa, xb = mx.split(out, 2, axis=-1)
        a = nn.softplus(xa + INV_SOFTPLUS_1) if self.use_softplus else mx.exp(xa)
        return a, xb

    def text_prefix(self, y: mx.array) -> mx.array:
        return self.proj_txt(y.astype(compute_dtype(self.proj_txt)))

    # -- forward: data -> noise ----------------------------------------------------------
    def forward(self, x: mx.array, y: mx.array | None, rope, elementwise: bool = False) -> tuple[mx.array, mx.array]:
        """``x`` (B, N, c) in this block's token order. Returns ``z`` (B, N, c) and log|det| (B,), or with
        ``elementwise`` each element's share of it (B, N, c)."""
        x = x.astype(mx.float32)
        a, b = self.affine(x, y, rope)
        z = (x - b) / a
        logdet = -mx.log(a)
        return z, logdet if elementwise else logdet.reshape(x.shape[0], -1).sum(axis=1)

    def affine(self, x: mx.array, y: mx.array | None, rope) -> tuple[mx.array, mx.array]:
        """Every token's float32 ``(a, b)`` (B, N, c), each predicted from the tokens of ``x`` before it."""
        x = x.astype(mx.float32)
        B = x.shape[0]
        if self.use_sos:
            shifted = mx.concatenate([mx.broadcast_to(self.sos_embed, (B, 1, x.shape[-1])).astype(x.dtype), x[:, :-1]], 1)
        else:
            shifted = x
        h = self.proj_in(shifted.astype(self.dtype))
        n_text = 0
        if self.sees_text and y is not None:
            prefix = self.text_prefix(y)
            n_text = prefix.shape[1]
            h = mx.concatenate([prefix.astype(h.dtype), h], axis=1)
        if self.stage is not None:
            h = self.stage.enter(h)
        for layer in self.attn_blocks:
            h = layer(h, rope, "causal")
        if self.stage is not None:
            h = self.stage.leave(h)
        a, b = self._head(h[:, n_text:])
        if not self.use_sos:
            # Without SOS token t is predicted from token t-1 and token 0 passes through.
            a = mx.concatenate([mx.ones_like(a[:, :1]), a[:, :-1]], axis=1)
            b = mx.concatenate([mx.zeros_like(b[:, :1]), b[:, :-1]], axis=1)
        return a, b

    # -- steps used by the samplers ------------------------------------------------------
    def new_cache(self, batch: int, length: int, bits: int | None = None) -> KVCache:
        """A cache for ``length`` positions; ``bits`` (8, 4) stores it quantized (see ``kv_cache``)."""
        return KVCache(len(self.attn_blocks), batch, self.kv_heads, length, self.head_dim, self.dtype, bits)

    def _run_cached(self, h: mx.array, cache: KVCache, start: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        count = h.shape[1]
        rope = (mx.slice(cos, start, (0,), (count, cos.shape[1])), mx.slice(sin, start, (0,), (count, sin.shape[1])))
        mask = position_mask(start, count, cache.visible)
        cache.seek(start)
        if self.stage is not None:
            h = self.stage.enter(h, cache)
        for layer, layer_cache in zip(self.attn_blocks, cache.layers):
            h = layer(h, rope, mask, layer_cache)
        return h if self.stage is None else self.stage.leave(h, cache)

    def encode_text(self, y: mx.array, cache: KVCache, cos: mx.array, sin: mx.array) -> None:
        """Write the text prefix into cache positions 0 .. L-1."""
        self._run_cached(self.text_prefix(y), cache, mx.array([0], dtype=mx.int32), cos, sin)

    def encode_known(self, tokens: mx.array, cache: KVCache, position: int, cos: mx.array, sin: mx.array) -> None:
        """Write known tokens (B, P, c) into the cache from ``position`` as a fresh sequence.

        The inputs are what sampling feeds: the start token, then ``tokens[:, :-1]``.
        """
        shifted = mx.concatenate([self.start_token(tokens.shape[0]), tokens[:, :-1]], axis=1)
        self._run_cached(self.proj_in(shifted.astype(self.dtype)), cache, mx.array([position], dtype=mx.int32),
                         cos, sin)

    def step(self, tokens: mx.array, cache: KVCache, start: mx.array, cos: mx.array, sin: mx.array):
        """Run input tokens (B, k, c) at cache position ``start``; return float32 ``(a, b)`` (B, k, c)."""
        h = self.proj_in(tokens.astype(self.dtype))
        return self._head(self._run_cached(h, cache, start, cos, sin))

    def start_token(self, batch: int) -> mx.array:
        return mx.broadcast_to(self.sos_embed.astype(mx.float32), (batch, 1, self.sos_embed.shape[-1]))
