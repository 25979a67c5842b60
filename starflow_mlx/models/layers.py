"""Transformer layers of a TARFlow block: norms, attention with RoPE and KV cache, MLP.

Parameter names follow the upstream PyTorch modules so that converting a
checkpoint is a matter of stripping wrapper prefixes.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx.models.kv_cache import LayerCache
from starflow_mlx.models.rope import apply_rope


class RMSNorm(nn.Module):
    """Gemma-style RMSNorm: weight starts at zero and scales by ``1 + weight``, in float32."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


def compute_dtype(linear: nn.Module) -> mx.Dtype:
    """Activation dtype of a layer: its weight dtype, or its scales' for quantized layers."""
    if "scales" in linear:
        return linear.scales.dtype
    return linear.weight.dtype


# erf(x) ~ x * P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 to float32 precision beyond): the float32 rational
# minimax approximation Eigen and XLA use, max error 4e-7. Only multiply-adds and one divide, so it
# vectorizes and fuses under mx.compile, where MLX's CPU erf is scalar and costs most of a Jacobi step.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf(x: mx.array) -> mx.array:
    """float32 erf from multiply-adds (see above)."""
    x = mx.clip(x.astype(mx.float32), -4.0, 4.0)
    x2 = x * x
    p = x2 * _ERF_P[0] + _ERF_P[1]
    for c in _ERF_P[2:]:
        p = p * x2 + c
    q = x2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q = q * x2 + c
    return x * p / q


# exp(x) = 2^n * 2^f with n = round(x / ln 2), |f| <= 1/2: 2^f from its degree-7 Taylor polynomial
# (relative error under 1e-8, below float32's), 2^n by writing the exponent bits. MLX's CPU exp is
# scalar and took most of the attention time of a Jacobi chunk; multiply-adds vectorize and fuse.
_EXP2 = tuple(math.log(2) ** k / math.factorial(k) for k in range(8))


@mx.custom_function
def exp_nonpositive(x: mx.array) -> mx.array:
    """float32 exp for x <= 0 from multiply-adds.

    Below -80 (and for masked -inf) it gives exp(-80): a normal float, where 0 or a
    denormal would slow every later op on x86.
    """
    t = mx.maximum(x, -80.0) * 1.4426950408889634
    n = mx.floor(t + 0.5)
    f = t - n
    p = f * _EXP2[7] + _EXP2[6]
    for c in _EXP2[5::-1]:
        p = p * f + c
    return p * mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)


@exp_nonpositive.vjp
def _exp_nonpositive_vjp(primals, cotangent, output):
    # The bit trick has no derivative of its own; exp's is its value.
    return cotangent * output


def _group_axis(parts: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
    """Quantized key/value parts (B, kv, L, .) as (B, kv, 1, L, .), shared by the heads of a group."""
    return tuple(a[:, :, None] for a in parts)


def attention(q: mx.array, k, v, scale: float, mask: mx.array | str | None) -> mx.array:
    """Scaled dot-product attention; on a CPU with :func:`exp_nonpositive` in a float32 softmax.

    ``k``/``v`` are arrays, or ``(packed, scales, biases)`` from a quantized KV cache, read
    through ``mx.quantized_matmul`` without a float copy.
    """
    quantized = isinstance(k, tuple)
    cpu = mx.default_device().type == mx.DeviceType.cpu
    if not quantized and not cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, T, D = q.shape
    _, kv_heads, length, _ = (k[0] if quantized else k).shape
    # Grouped heads share their key/value head without copying it: (B, kv, H/kv, T, D).
    dtype = k[1].dtype if quantized else mx.float32
    qg = (q.astype(mx.float32) * scale).astype(dtype).reshape(B, kv_heads, H // kv_heads, T, D)
    if quantized:
        bits, group = k[0].shape[-1] * 32 // D, D // k[1].shape[-1]
        scores = mx.quantized_matmul(qg, *_group_axis(k), transpose=True, group_size=group, bits=bits)
    else:
        scores = qg @ k.astype(mx.float32)[:, :, None].swapaxes(-1, -2)
    scores = scores.astype(mx.float32)
    if isinstance(mask, str):
        mask = mx.arange(length)[None, :] <= (mx.arange(T) + length - T)[:, None]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    if cpu:
        weights = exp_nonpositive(scores - mx.max(scores, axis=-1, keepdims=True))
        weights = weights / mx.sum(weights, axis=-1, keepdims=True)
    else:
        weights = mx.softmax(scores, axis=-1, precise=True)
    if quantized:
        out = mx.quantized_matmul(weights.astype(dtype), *_group_axis(v), transpose=False, group_size=group, bits=bits)
    else:
        out = weights @ v.astype(mx.float32)[:, :, None]
    return out.reshape(B, H, T, D).astype(q.dtype)


_SQRT_HALF, _INV_SQRT_2PI = 0.7071067811865476, 0.3989422804014327


@mx.custom_function
def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU of float32 ``x``."""
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


@gelu.vjp
def _gelu_vjp(primals, cotangent, output):
    # From x alone: backpropagating through erf's multiply-adds would keep each of their results, a
    # dozen MLP-width tensors per layer (3 GB for the demo's training batch).
    x = primals  # one argument: the array itself
    return cotangent * (0.5 * (1.0 + erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * exp_nonpositive(-0.5 * x * x))


class GELU(nn.Module):
    """Exact (erf) GELU, as upstream's ``nn.GELU()``, computed in float32 with :func:`erf`."""

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(x.astype(mx.float32)).astype(x.dtype)


def make_norm(kind: str, dims: int) -> nn.Module:
    if kind == "layer_norm":
        return nn.LayerNorm(dims, eps=1e-5)
    if kind == "rms_norm":
        return RMSNorm(dims)
    return nn.Identity()


class Attention(nn.Module):
    attend = staticmethod(attention)  # a checkpointed training layer's goes a group of heads at a time

    def __init__(
        self,
        channels: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        norm_type: str = "layer_norm",
        use_qk_norm: bool = False,
        use_post_norm: bool = False,
        use_bias: bool = True,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim**-0.5
        self.norm = make_norm(norm_type, channels)
        self.qkv = nn.Linear(channels, (num_heads + 2 * num_kv_heads) * head_dim, bias=use_bias)
        self.proj = nn.Linear(num_heads * head_dim, channels, bias=use_bias)
        if use_qk_norm:
            self.query_norm = RMSNorm(head_dim)
            self.key_norm = RMSNorm(head_dim)
        if use_post_norm:
            self.post_norm = RMSNorm(channels)

    def __call__(
        self,
        x: mx.array,
        rope: tuple[mx.array, mx.array] | None,
        mask: mx.array | str | None = "causal",
        cache: LayerCache | None = None,
    ) -> mx.array:
        """``rope`` holds the cos/sin rows of the tokens in ``x``.

        With a cache, the new keys/values are written at the cache offset and the
        queries attend to the whole buffer; ``mask`` then hides what lies ahead.
        """
        B, T, _ = x.shape
        qkv = self.qkv(self.norm(x))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[..., :q_size].reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = qkv[..., q_size : q_size + kv_size].reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = qkv[..., q_size + kv_size :].reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if "query_norm" in self:
            q, k = self.query_norm(q), self.key_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(k, v)
        out = self.attend(q, k, v, self.scale, mask)
        out = self.proj(out.transpose(0, 2, 1, 3).reshape(B, T, q_size))
        if "post_norm" in self:
            out = self.post_norm(out)
        return out


class MLP(nn.Module):
    def __init__(
        self,
        channels: int,
        expansion: float = 4.0,
        use_swiglu: bool = False,
        norm_type: str = "layer_norm",
        use_post_norm: bool = False,
        use_bias: bool = True,
    ):
        super().__init__()
        hidden = int(channels * expansion)
        self.norm = make_norm(norm_type, channels)
        self.use_swiglu = use_swiglu
        if use_swiglu:
            self.gate_proj = nn.Linear(channels, hidden, bias=use_bias)
            self.up_proj = nn.Linear(channels, hidden, bias=use_bias)
            self.down_proj = nn.Linear(hidden, channels, bias=use_bias)
        else:
            # A list keeps upstream's Sequential names: main.0 and main.2 (GELU sits at 1).
            self.main = [nn.Linear(channels, hidden, bias=use_bias), GELU(), nn.Linear(hidden, channels, bias=use_bias)]
        if use_post_norm:
            self.post_norm = RMSNorm(channels)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x)
        if self.use_swiglu:
            x = self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))
        else:
            for layer in self.main:
                x = layer(x)
        if "post_norm" in self:
            x = self.post_norm(x)
        return x


class AttentionBlock(nn.Module):
    """Pre-norm transformer layer: ``h + Attn(norm(h))`` then ``h + MLP(norm(h))``."""

    def __init__(self, channels: int, head_dim: int, num_heads: int, num_kv_heads: int, *, expansion: float,
                 use_swiglu: bool, norm_type: str, use_qk_norm: bool, use_post_norm: bool, use_bias: bool):
        super().__init__()
        self.attention = Attention(channels, head_dim, num_heads, num_kv_heads, norm_type, use_qk_norm,
                                   use_post_norm, use_bias)
        self.mlp = MLP(channels, expansion, use_swiglu, norm_type, use_post_norm, use_bias)

    def __call__(self, x, rope, mask="causal", cache=None):
        x = x + self.attention(x, rope, mask, cache)
        return x + self.mlp(x)
