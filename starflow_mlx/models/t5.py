"""T5 encoder (T5 v1.1 / flan-t5, and original T5) in MLX.

Parameter names are Hugging Face's encoder names (``encoder.block.0.layer.0.SelfAttention.q.weight``),
so converting a checkpoint is dropping the decoder and renaming the shared embedding.

The residual stream and every norm stay in float32 whatever the weights' dtype:
flan-t5's activations outgrow float16 (Hugging Face keeps ``wo`` in float32 for the same reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from starflow_mlx.config import check_quantization
from starflow_mlx.jsonconfig import ConfigError, JSONConfig, read_json
from starflow_mlx.models.layers import compute_dtype

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_new": nn.gelu_approx, "silu": nn.silu}
# Hugging Face's T5Config defaults, applied when a config.json omits a key.
HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   layer_norm_epsilon=1e-6, feed_forward_proj="relu")
# mT5 is T5 v1.1 under another name; umT5 (a bias per layer) is not.
HF_MODEL_TYPES = ("t5", "mt5")
NORM_SUFFIX = "layer_norm.weight"


@dataclass
class T5Config(JSONConfig):
    """Shape of a T5 encoder; the defaults are google/flan-t5-xl's."""

    LABEL = "T5 config"

    # Upper bounds far above any T5 (mT5-xxl: 250k vocabulary, 4096 wide, 24 layers), so a hostile
    # config.json is refused before an encoder is built.
    vocab_size: int = field(default=32128, metadata={"min": 1, "max": 1 << 20})
    d_model: int = field(default=2048, metadata={"min": 1, "max": 1 << 15})
    d_kv: int = field(default=64, metadata={"min": 1, "max": 1024})
    d_ff: int = field(default=5120, metadata={"min": 1, "max": 1 << 17})
    num_layers: int = field(default=24, metadata={"min": 1, "max": 256})
    num_heads: int = field(default=32, metadata={"min": 1, "max": 1024})
    relative_attention_num_buckets: int = field(default=32, metadata={"min": 4, "max": 4096})
    relative_attention_max_distance: int = field(default=128, metadata={"min": 1, "max": 1 << 20})
    layer_norm_epsilon: float = field(default=1e-6, metadata={"min": 0, "max": 1})
    feed_forward_proj: str = "gated-gelu"
    dtype: str = "float32"  # how the weights (all but the norms) are stored
    quantization: dict[str, Any] | None = None  # which layers are quantized (see starflow_mlx.quantize.policy)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_quantization(self.quantization, self.LABEL)
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.activation not in ACTIVATIONS:
            raise ConfigError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not supported: "
                              f"use one of {', '.join(ACTIVATIONS)}, optionally as gated-<act>")

    def min_weight_bytes(self) -> int:
        """A lower bound on the weights' bytes (embedding and attention projections in 16 bits, or 8 when quantized)."""
        weights = self.vocab_size * self.d_model + self.num_layers * 4 * self.d_model * self.d_kv * self.num_heads
        return weights if self.quantization else weights * 2

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # Hugging Face maps "gated-gelu" to the tanh approximation, as T5 v1.1 was trained with it.
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> "T5Config":
        """Read a Hugging Face T5 config.json (of a T5 model, T5EncoderModel or T5ForConditionalGeneration)."""
        model_type = data.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(f"config.json describes a {model_type or 'model without model_type'}, not a T5 model")
        return cls.from_dict({**HF_DEFAULTS, **{k: v for k, v in data.items() if k in HF_DEFAULTS}})

    @classmethod
    def load(cls, path: str | Path) -> "T5Config":
        data = read_json(path, cls.LABEL)
        if isinstance(data, dict) and "model_type" in data:
            raise ConfigError(f"{path} is a Hugging Face config: convert the folder with convert_t5 first")
        return cls.from_dict(data, str(path))


def relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    """Bidirectional T5 buckets: half per direction, each half exact up to a point and logarithmic beyond."""
    half = num_buckets // 2
    buckets = (relative_position > 0).astype(mx.int32) * half
    distance = mx.abs(relative_position)
    max_exact = half // 2
    # The log is taken only where it is used, so distances below max_exact are clamped to keep it finite.
    # Same float32 operation order as Hugging Face, so bucket edges that fall on exact integers agree.
    scaled = mx.log(mx.maximum(distance, max_exact).astype(mx.float32) / max_exact)
    scaled = scaled / math.log(max_distance / max_exact) * (half - max_exact)
    large = mx.minimum(max_exact + scaled.astype(mx.int32), half - 1)
    return buckets + mx.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, computed and returned in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)


class T5Attention(nn.Module):
    """Multi-head self-attention without score scaling (T5 folds it into the initialisation)."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def compute_bias(self, length: int) -> mx.array:
        """(1, heads, length, length) float32 bias from each key's offset to each query."""
        positions = mx.arange(length)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).astype(mx.float32).transpose(2, 0, 1)[None]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        out = mx.fast.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                                   scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        h = self.layer_norm(x).astype(bias.dtype)
        return x + self.SelfAttention(h, bias).astype(mx.float32)


class T5DenseActDense(nn.Module):
    """Original T5's feed-forward: wo(act(wi(x)))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.activation]

    def __call__(self, x: mx.array) -> mx.array:
        # float32 into wo promotes its matmul to float32, where the outputs cannot overflow.
        return self.wo(self.act(self.wi(x)).astype(mx.float32))


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1's gated feed-forward: wo(act(wi_0(x)) * wi_1(x))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.activation]

    def __call__(self, x: mx.array) -> mx.array:
        # The gate product and wo run in float32, where flan-t5's large activations cannot overflow.
        return self.wo(self.act(self.wi_0(x)).astype(mx.float32) * self.wi_1(x).astype(mx.float32))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, dtype: mx.Dtype) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x).astype(dtype)).astype(mx.float32)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, bias), bias.dtype)


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        # Only the first block owns a relative position bias; every block reuses it.
        self.block = [T5Block(config, i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        dtype = compute_dtype(self.embed_tokens)
        x = self.embed_tokens(input_ids).astype(mx.float32)
        bias = self.block[0].layer[0].SelfAttention.compute_bias(input_ids.shape[1]).astype(dtype)
        if attention_mask is not None:
            # Masking by replacement, not addition, so float16 scores cannot overflow to -inf (and NaN).
            keep = attention_mask.astype(mx.bool_)[:, None, None, :]
            bias = mx.where(keep, bias, mx.array(mx.finfo(dtype).min, dtype))
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """Token ids (B, L) and an optional 1/0 padding mask (B, L) -> last hidden state (B, L, d_model), float32."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.encoder = T5Stack(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        return self.encoder(input_ids, attention_mask)

    def cast(self, dtype: mx.Dtype) -> None:
        """Cast every weight but the norms (kept in float32) to ``dtype``."""
        self.update(tree_unflatten([(name, w if name.endswith(NORM_SUFFIX) or not mx.issubdtype(w.dtype, mx.floating)
                                     else w.astype(dtype))
                                    for name, w in tree_flatten(self.parameters())]))
