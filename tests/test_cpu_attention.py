"""The CPU attention (multiply-add exp in the softmax) against MLX's fused attention, values and gradients."""

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.models.layers import attention, exp_nonpositive


def test_exp_matches_float64_over_its_range_and_stays_normal():
    x = mx.linspace(-80, 0, 200001)
    got, want = np.array(exp_nonpositive(x), dtype=np.float64), np.exp(np.array(x, dtype=np.float64))
    assert np.max(np.abs(got - want) / want) < 5e-6
    # Far below (and -inf, a masked score) it returns exp(-80): a normal float, never 0 or a denormal.
    low = np.array(exp_nonpositive(mx.array([-200.0, -mx.inf])))
    assert np.all(low > np.finfo(np.float32).tiny) and np.all(low < 1e-34)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("mask", ["array", "causal", None])
def test_attention_matches_mlx_fused_attention(heads, kv_heads, mask):
    key = mx.random.key(3)
    q = mx.random.normal((2, heads, 5, 16), key=key) * 3
    k = mx.random.normal((2, kv_heads, 9 if mask == "array" else 5, 16), key=mx.random.split(key)[0]) * 3
    v = mx.random.normal(k.shape, key=mx.random.split(key)[1])
    m = (mx.arange(k.shape[2])[None, :] <= (3 + mx.arange(5))[:, None]) if mask == "array" else mask
    with mx.stream(mx.cpu):
        got = attention(q, k, v, 0.25, m)
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m)
    assert mx.abs(got - want).max().item() < 1e-5


def test_gradients_flow_through_the_cpu_attention():
    q, k, v = (mx.random.normal((1, 2, 4, 8), key=mx.random.key(i)) for i in range(3))

    def loss(fn, q):
        return (fn(q) ** 2).sum()

    with mx.stream(mx.cpu):
        ours = mx.grad(lambda q: loss(lambda a: attention(a, k, v, 0.3, "causal"), q))(q)
        theirs = mx.grad(lambda q: loss(lambda a: mx.fast.scaled_dot_product_attention(a, k, v, scale=0.3,
                                                                                       mask="causal"), q))(q)
    assert mx.abs(ours - theirs).max().item() < 1e-4
