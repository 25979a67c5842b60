"""A compiled, fixed-shape chunk step shared by the sequential and Jacobi samplers.

One call runs ``k`` input tokens of a block at a cache position, applies
guidance, forms the update ``x = b + a * z`` and the Jacobi residual, and
returns the new cache buffers. Positions, the count of valid rows, the RoPE
tables and the cache buffers are all inputs, and the block's weights are read
as compiled state, so one compiled function per (block, guidance scale) serves
every call: MLX keeps one trace per input shape (chunk size, batch, cache
length) and, for chunks of several tokens, per attended length (at most eight
per cache, see :func:`~starflow_mlx.models.kv_cache.visible_length`), and later ``reverse``
calls in the process pay no tracing.
"""

from __future__ import annotations

import mlx.core as mx

from starflow_mlx.models.kv_cache import KVCache, visible_length
from starflow_mlx.models.tarflow import MetaBlock
from starflow_mlx.sampling.guidance import guide


class CompiledSteps:
    """The compiled steps of one block, kept on the block (``block._compiled_steps``)."""

    def __init__(self, block: MetaBlock):
        self.block = block
        self.fns: dict[float, object] = {}
        self.traces = 0  # Python traces so far, all guidance scales and shapes; tests use it to prove reuse

    def get(self, cfg: float, compile: bool):
        if not compile:
            return self._make(cfg)
        if cfg not in self.fns:
            # inputs=block.state: the weights are read at every call, so updated weights are never stale.
            self.fns[cfg] = mx.compile(self._make(cfg), inputs=self.block.state)
        return self.fns[cfg]

    def _make(self, cfg: float):
        block, layers = self.block, len(self.block.attn_blocks)

        def step(tokens, z_chunk, prev, start, valid, visible, bits, cos, sin, *state):
            self.traces += 1
            cache = KVCache.from_state(list(state), layers, visible, bits)
            a, b = block.step(tokens, cache, start, cos, sin)
            if cfg > 0:
                a, b = guide(a, b, cfg)
            new = b + a * z_chunk
            rows = (mx.arange(new.shape[1]) < valid)[None, :, None]
            change = mx.sum(mx.where(rows, mx.square(new - prev), 0.0), axis=(0, 2))
            size = mx.sum(mx.where(rows, mx.square(new), 0.0), axis=(0, 2))
            # The chunk's residual (upstream's rule) and each token's own, for the sliding-window schedule.
            residual = mx.sum(change) / mx.sum(size)
            per_token = change / mx.maximum(size, 1e-30)
            return (new, residual, per_token, *cache.state())

        return step


def compiled_steps(block: MetaBlock) -> CompiledSteps:
    steps = getattr(block, "_compiled_steps", None)
    if steps is None:
        steps = CompiledSteps(block)
        block._compiled_steps = steps  # a plain object, so nn.Module keeps it out of the parameters
    return steps


class ChunkStepper:
    """The step of ``block`` bound to one cache and RoPE table for one sampling call."""

    def __init__(self, block: MetaBlock, cache: KVCache, cos: mx.array, sin: mx.array, cfg: float, compile: bool = True):
        self.cache, self.cos, self.sin = cache, cos, sin
        self._fn = compiled_steps(block).get(float(cfg), compile)

    def __call__(self, tokens: mx.array, z_chunk: mx.array, prev: mx.array, start: int, valid: int):
        """Returns ``(new, residual, per_token_residual)``; the cache holds the chunk's keys/values afterwards."""
        # A chunk reads only the keys it can see; a single token (sequential) reads the whole cache in
        # one trace, as its attention is a small part of its step.
        count = tokens.shape[1]
        visible = visible_length(start + count, self.cache.length) if count > 1 else self.cache.length
        out = self._fn(tokens, z_chunk, prev, mx.array([start], dtype=mx.int32), mx.array(valid, dtype=mx.int32),
                       visible, self.cache.bits, self.cos, self.sin, *self.cache.state())
        self.cache.set_state(list(out[3:]))
        return out[0], out[1], out[2]
