"""Compiled chunk steps are cached on each block: a second reverse call in the process traces nothing."""

import mlx.core as mx
import pytest

from flow_factory import IMAGE, random_flow
from starflow_mlx.sampling.stepper import compiled_steps


def traces(flow) -> int:
    return sum(compiled_steps(b).traces for b in flow.blocks if not b.is_identity)


def inputs(flow, shape, seed):
    cfg = flow.config
    z = mx.random.normal((2, *shape, cfg.in_channels), key=mx.random.key(seed))
    y = mx.random.normal((2, cfg.txt_size, cfg.txt_dim), key=mx.random.key(seed + 1))
    return z, y, mx.zeros_like(y)


@pytest.mark.parametrize("options", [dict(), dict(jacobi=True, jacobi_block_size=3)])
def test_second_reverse_traces_nothing(options):
    flow = random_flow(**IMAGE)
    z, y, y_u = inputs(flow, (4, 4), 0)
    first = flow.reverse(z, y, y_uncond=y_u, cfg=1.5, **options)
    mx.eval(first)
    after_first = traces(flow)
    assert after_first > 0
    z2, y2, _ = inputs(flow, (4, 4), 5)
    mx.eval(flow.reverse(z2, y2, y_uncond=y_u, cfg=1.5, **options))
    assert traces(flow) == after_first
    # Reused traces compute the same numbers as a fresh model with the same weights.
    fresh = random_flow(**IMAGE)
    assert mx.allclose(fresh.reverse(z, y, y_uncond=y_u, cfg=1.5, **options), first, atol=1e-6).item()


def test_rope_tables_are_inputs_not_constants():
    # 2x8 and 8x2 grids hold the same 16 tokens in the same order, so one trace serves both, and only
    # their RoPE tables differ: a baked-in table would give the tall grid the wide grid's output.
    flow = random_flow(scale=0.3, **IMAGE)
    z, y, _ = inputs(flow, (2, 8), 0)
    wide = flow.reverse(z, y)
    count = traces(flow)
    tall_z = z.reshape(2, 8, 2, -1)
    tall = flow.reverse(tall_z, y)
    assert traces(flow) == count
    fresh = random_flow(scale=0.3, **IMAGE)
    assert mx.allclose(fresh.reverse(tall_z, y), tall, atol=1e-5).item()
    assert mx.abs(tall.reshape(wide.shape) - wide).max().item() > 1e-3


def test_new_guidance_scale_traces_again_and_weights_are_not_stale():
    flow = random_flow(**IMAGE)
    z, y, y_u = inputs(flow, (4, 4), 0)
    mx.eval(flow.reverse(z, y, y_uncond=y_u, cfg=1.0))
    count = traces(flow)
    mx.eval(flow.reverse(z, y, y_uncond=y_u, cfg=3.0))
    assert traces(flow) > count
    other = random_flow(seed=7, **IMAGE)
    flow.update(other.parameters())  # new weights, same shapes: the cached steps must read them
    assert mx.allclose(flow.reverse(z, y, y_uncond=y_u, cfg=1.0), other.reverse(z, y, y_uncond=y_u, cfg=1.0),
                       atol=1e-6).item()
