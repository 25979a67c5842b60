"""A preallocated key/value cache that is written at an offset and rewound by index.

The buffers never change shape, so a step function traced once (``mx.compile``)
serves every position; attention reads the whole buffer and a position mask
hides entries that lie ahead of the queries.
"""

from __future__ import annotations

import mlx.core as mx


class LayerCache:
    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype=mx.float32):
        self.keys = mx.zeros((batch, kv_heads, length, head_dim), dtype=dtype)
        self.values = mx.zeros((batch, kv_heads, length, head_dim), dtype=dtype)
        self.offset = mx.array([0], dtype=mx.int32)

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def write(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store ``k``/``v`` at the current offset; return the full buffers."""
        self.keys = mx.slice_update(self.keys, k.astype(self.keys.dtype), self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, v.astype(self.values.dtype), self.offset, axes=(2,))
        return self.keys, self.values


class KVCache:
    """One :class:`LayerCache` per transformer layer of a block, sharing one write position."""

    def __init__(self, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype=mx.float32):
        self.layers = [LayerCache(batch, kv_heads, length, head_dim, dtype) for _ in range(layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def seek(self, position: int | mx.array) -> None:
        """Set where the next tokens are written (rewinding is seeking backwards)."""
        pos = position if isinstance(position, mx.array) else mx.array([position], dtype=mx.int32)
        for layer in self.layers:
            layer.offset = pos

    def state(self) -> list[mx.array]:
        return [a for layer in self.layers for a in (layer.keys, layer.values)]

    def set_state(self, arrays: list[mx.array]) -> None:
        for i, layer in enumerate(self.layers):
            layer.keys, layer.values = arrays[2 * i], arrays[2 * i + 1]

    @classmethod
    def from_state(cls, arrays: list[mx.array], layers: int) -> "KVCache":
        """A cache over existing buffers: what a compiled step receives as inputs."""
        cache = cls(layers, 0, 0, 0, 0)
        cache.set_state(arrays)
        return cache


def position_mask(start: mx.array, queries: int, length: int) -> mx.array:
    """Boolean (queries, length) mask: query i at ``start + i`` sees keys at positions <= its own."""
    q_pos = start + mx.arange(queries, dtype=mx.int32)[:, None]
    return mx.arange(length, dtype=mx.int32)[None, :] <= q_pos
