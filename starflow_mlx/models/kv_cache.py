"""A preallocated key/value cache that is written at an offset and rewound by index.

The buffers never change shape, so a step function traced once (``mx.compile``)
serves every position. Attention reads the first ``visible`` positions (the
whole buffer unless set) and a position mask hides entries that lie ahead of
the queries: reading only what a chunk can see keeps a Jacobi chunk at the
start of a long sequence from paying for the keys of the whole sequence.
"""

from __future__ import annotations

import mlx.core as mx


class LayerCache:
    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype=mx.float32):
        self.keys = mx.zeros((batch, kv_heads, length, head_dim), dtype=dtype)
        self.values = mx.zeros((batch, kv_heads, length, head_dim), dtype=dtype)
        self.offset = mx.array([0], dtype=mx.int32)
        self.visible: int | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def write(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store ``k``/``v`` at the current offset; return the first ``visible`` positions of the buffers."""
        self.keys = mx.slice_update(self.keys, k.astype(self.keys.dtype), self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, v.astype(self.values.dtype), self.offset, axes=(2,))
        if self.visible is None:
            return self.keys, self.values
        return self.keys[:, :, : self.visible], self.values[:, :, : self.visible]


class KVCache:
    """One :class:`LayerCache` per transformer layer of a block, sharing one write position."""

    def __init__(self, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype=mx.float32):
        self.layers = [LayerCache(batch, kv_heads, length, head_dim, dtype) for _ in range(layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def visible(self) -> int:
        """Leading positions attention reads."""
        return self.layers[0].visible or self.length

    @visible.setter
    def visible(self, count: int | None) -> None:
        for layer in self.layers:
            layer.visible = None if count is None or count >= layer.length else count

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
    def from_state(cls, arrays: list[mx.array], layers: int, visible: int | None = None) -> "KVCache":
        """A cache over existing buffers: what a compiled step receives as inputs."""
        cache = cls(layers, 0, 0, 0, 0)
        cache.set_state(arrays)
        cache.visible = visible
        return cache


def visible_length(end: int, length: int, buckets: int = 8) -> int:
    """Positions a step ending at ``end`` must read, rounded up to one of ``buckets`` sizes.

    Each size is one compiled trace, so rounding bounds the traces per cache while
    a chunk near the start still reads a fraction of a long cache.
    """
    quantum = -(-length // buckets)
    return min(length, -(-end // quantum) * quantum)


def position_mask(start: mx.array, queries: int, length: int) -> mx.array:
    """Boolean (queries, length) mask: query i at ``start + i`` sees keys at positions <= its own."""
    q_pos = start + mx.arange(queries, dtype=mx.int32)[:, None]
    return mx.arange(length, dtype=mx.int32)[None, :] <= q_pos
