"""A preallocated key/value cache that is written at an offset and rewound by index.

The buffers never change shape, so a step function traced once (``mx.compile``)
serves every position. Attention reads the first ``visible`` positions (the
whole buffer unless set) and a position mask hides entries that lie ahead of
the queries: reading only what a chunk can see keeps a Jacobi chunk at the
start of a long sequence from paying for the keys of the whole sequence.

With ``bits`` (8 or 4) keys and values are stored quantized along the head
dimension (MLX's affine quantization: packed integers, a scale and a bias per
group), about half or a quarter of float16's size with the scales; attention then
reads them through ``mx.quantized_matmul`` and never holds a float copy. The
deep block's cache of a long video is what does not fit a 16 GB Mac otherwise.
"""

from __future__ import annotations

import mlx.core as mx

KV_BITS = (8, 4)


def kv_group(head_dim: int) -> int:
    """Quantization group along the head dimension: 64 where it divides, else 32."""
    return 64 if head_dim % 64 == 0 else 32


def kv_bytes_per_value(bits: int | None, itemsize: int, head_dim: int) -> float:
    """Bytes one cached key or value component takes, scales and biases included."""
    return itemsize if bits is None else bits / 8 + 2 * itemsize / kv_group(head_dim)


def check_kv_bits(bits: int | None, head_dim: int) -> None:
    if bits is not None and bits not in KV_BITS:
        raise ValueError(f"kv_bits must be 8, 4 or None (float cache), got {bits!r}")
    if bits is not None and head_dim % 32:
        raise ValueError(f"a quantized KV cache needs a head dimension divisible by 32, this model has {head_dim}")


class LayerCache:
    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype=mx.float32,
                 bits: int | None = None):
        self.bits = bits
        self.group = kv_group(head_dim) if bits else None
        self.keys = self._empty(batch, kv_heads, length, head_dim, dtype)
        self.values = self._empty(batch, kv_heads, length, head_dim, dtype)
        self.offset = mx.array([0], dtype=mx.int32)
        self.visible: int | None = None

    def _empty(self, batch, kv_heads, length, head_dim, dtype) -> list[mx.array]:
        if self.bits is None:
            return [mx.zeros((batch, kv_heads, length, head_dim), dtype=dtype)]
        lead = (batch, kv_heads, length)
        return [mx.zeros((*lead, head_dim * self.bits // 32), dtype=mx.uint32),
                mx.zeros((*lead, head_dim // self.group), dtype=dtype),
                mx.zeros((*lead, head_dim // self.group), dtype=dtype)]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def _store(self, parts: list[mx.array], x: mx.array) -> list[mx.array]:
        new = [x] if self.bits is None else mx.quantize(x.astype(parts[1].dtype), group_size=self.group,
                                                        bits=self.bits)
        return [mx.slice_update(p, n.astype(p.dtype), self.offset, axes=(2,)) for p, n in zip(parts, new)]

    def _read(self, parts: list[mx.array]):
        if self.visible is not None:
            parts = [p[:, :, : self.visible] for p in parts]
        return parts[0] if self.bits is None else tuple(parts)

    def write(self, k: mx.array, v: mx.array):
        """Store ``k``/``v`` at the current offset; return the first ``visible`` positions of the buffers.

        Quantized caches return ``(packed, scales, biases)`` for each (see :func:`layers.attention`).
        """
        self.keys, self.values = self._store(self.keys, k), self._store(self.values, v)
        return self._read(self.keys), self._read(self.values)


class KVCache:
    """One :class:`LayerCache` per transformer layer of a block, sharing one write position."""

    def __init__(self, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype=mx.float32,
                 bits: int | None = None):
        self.layers = [LayerCache(batch, kv_heads, length, head_dim, dtype, bits) for _ in range(layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def bits(self) -> int | None:
        """Quantization bits of the keys and values, None for a float cache."""
        return self.layers[0].bits

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
        return [a for layer in self.layers for a in (*layer.keys, *layer.values)]

    def set_state(self, arrays: list[mx.array]) -> None:
        per = len(arrays) // len(self.layers)
        for i, layer in enumerate(self.layers):
            mine = list(arrays[i * per : (i + 1) * per])
            layer.keys, layer.values = mine[: per // 2], mine[per // 2 :]

    @classmethod
    def from_state(cls, arrays: list[mx.array], layers: int, visible: int | None = None,
                   bits: int | None = None) -> "KVCache":
        """A cache over existing buffers: what a compiled step receives as inputs."""
        cache = cls(layers, 0, 0, 0, 0)
        cache.set_state(arrays)
        for layer in cache.layers:
            layer.bits = bits
            if bits:  # packed width and scale count give the group: head_dim = packed * 32 / bits
                layer.group = layer.keys[0].shape[-1] * 32 // bits // layer.keys[1].shape[-1]
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
