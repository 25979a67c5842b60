"""A compiled, fixed-shape chunk step shared by the sequential and Jacobi samplers.

One call runs ``k`` input tokens of a block at a cache position, applies
guidance, forms the update ``x = b + a * z`` and the Jacobi residual, and
returns the new cache buffers. Positions and the count of valid rows are
arrays, so the function is traced once per chunk size and reused everywhere;
the KV cache is threaded through as explicit state and never reallocated.
"""

from __future__ import annotations

import mlx.core as mx

from starflow_mlx.models.kv_cache import KVCache
from starflow_mlx.models.tarflow import MetaBlock
from starflow_mlx.sampling.guidance import guide


class ChunkStepper:
    def __init__(self, block: MetaBlock, cache: KVCache, cos: mx.array, sin: mx.array, cfg: float, compile: bool = True):
        self.block, self.cache, self.cos, self.sin, self.cfg = block, cache, cos, sin, float(cfg)
        self.traces = 0  # how many times the step was traced; tests use it to prove reuse
        self._fn = mx.compile(self._step) if compile else self._step

    def _step(self, tokens, z_chunk, prev, start, valid, *state):
        self.traces += 1
        self.cache.set_state(list(state))
        a, b = self.block.step(tokens, self.cache, start, self.cos, self.sin)
        if self.cfg > 0:
            a, b = guide(a, b, self.cfg)
        new = b + a * z_chunk
        rows = (mx.arange(new.shape[1]) < valid)[None, :, None]
        residual = mx.sum(mx.where(rows, mx.square(new - prev), 0.0)) / mx.sum(mx.where(rows, mx.square(new), 0.0))
        return (new, residual, *self.cache.state())

    def __call__(self, tokens: mx.array, z_chunk: mx.array, prev: mx.array, start: int, valid: int):
        """Returns ``(new, residual)``; the cache holds the chunk's keys/values afterwards."""
        out = self._fn(tokens, z_chunk, prev, mx.array([start], dtype=mx.int32), mx.array(valid, dtype=mx.int32),
                       *self.cache.state())
        self.cache.set_state(list(out[2:]))
        return out[0], out[1]
