"""Properties of the MLX flow that need no upstream reference."""

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import IMAGE, NOTEXT, OPTIONS, VIDEO, flow_inputs, random_flow, rel, save_flow
from starflow_mlx.io.loading import ModelLoadError, load_flow
from starflow_mlx.models.kv_cache import position_mask, visible_length
from starflow_mlx.sampling.jacobi import SCHEDULES, JacobiStats


@pytest.mark.parametrize("fields,frames", [(IMAGE, 0), (OPTIONS, 0), (NOTEXT, 0), (VIDEO, 3)])
def test_forward_inverts_reverse(fields, frames):
    flow = random_flow(**fields)
    z, y, _ = flow_inputs(flow, frames=frames)
    x = flow.reverse(z, y)
    z_back, _ = flow.forward(x, y)
    assert rel(z_back, z) < 1e-4


def test_logdet_matches_numerical_jacobian():
    flow = random_flow(**NOTEXT, scale=0.08)
    x = mx.random.normal((1, 4, 4, 1))
    _, logdet = flow.forward(x)
    jac = mx.vmap(mx.grad(lambda v, i: flow.forward(v.reshape(1, 4, 4, 1))[0].reshape(-1)[i]),
                  in_axes=(None, 0))(x.reshape(-1), mx.arange(16))
    sign, expected = np.linalg.slogdet(np.array(jac, dtype=np.float64))
    assert sign > 0
    assert abs(float(logdet[0]) - expected) < 1e-3


def test_log_prob_includes_gaussian_constant():
    flow = random_flow(**NOTEXT)
    x = mx.random.normal((2, 4, 4, 1))
    z, logdet = flow.forward(x)
    zf = np.array(z).reshape(2, -1)
    expected = -0.5 * (zf**2).sum(1) - 0.5 * 16 * np.log(2 * np.pi) + np.array(logdet)
    assert np.allclose(np.array(flow.log_prob(x)), expected, rtol=1e-5)


@pytest.mark.parametrize("fields", [IMAGE, OPTIONS])
def test_kv_cache_step_equals_full_recomputation(fields):
    """Running tokens one at a time through the cache gives the same (a, b) as one causal pass."""
    flow = random_flow(**fields)
    block = flow.blocks[-1]
    x, y, _ = flow_inputs(flow, batch=1)
    layout = flow._layout(x, block.index)
    seq = layout.to_sequence(x)
    n, text_len = seq.shape[1], y.shape[1]
    cos, sin = flow.rope(layout, text_len)
    z_full, _ = block.forward(seq, y, (cos, sin))

    cache = block.new_cache(1, text_len + n)
    block.encode_text(y, cache, cos, sin)
    inp = mx.concatenate([block.start_token(1), seq[:, :-1]], 1) if block.use_sos else seq
    rows = []
    for t in range(n):
        a, b = block.step(inp[:, t : t + 1], cache, mx.array([text_len + t], dtype=mx.int32), cos, sin)
        rows.append((a, b))
    a = mx.concatenate([r[0] for r in rows], 1)
    b = mx.concatenate([r[1] for r in rows], 1)
    if not block.use_sos:
        a = mx.concatenate([mx.ones_like(a[:, :1]), a[:, :-1]], 1)
        b = mx.concatenate([mx.zeros_like(b[:, :1]), b[:, :-1]], 1)
    assert rel((seq - b) / a, z_full) < 1e-5


def test_position_mask_hides_future_and_stale_entries():
    m = np.array(position_mask(mx.array([2], dtype=mx.int32), 3, 7))
    assert m.tolist() == [[True, True, True, False, False, False, False],
                          [True, True, True, True, False, False, False],
                          [True, True, True, True, True, False, False]]


def test_float16_weights_stay_close_to_float32(tmp_path):
    flow = random_flow(**IMAGE)
    save_flow(flow, tmp_path / "m")
    f32, f16 = load_flow(tmp_path / "m"), load_flow(tmp_path / "m", dtype="float16")
    x, y, y_u = flow_inputs(flow)
    z32, ld32 = f32.forward(x, y)
    z16, ld16 = f16.forward(x, y)
    assert z16.dtype == mx.float32  # flow arithmetic stays float32 whatever the weights
    assert rel(z16, z32) < 2e-2
    assert rel(ld16, ld32) < 2e-2
    zn = mx.random.normal(x.shape)
    assert rel(f16.reverse(zn, y, y_uncond=y_u, cfg=1.5), f32.reverse(zn, y, y_uncond=y_u, cfg=1.5)) < 5e-2


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("fields,frames", [(IMAGE, 0), (VIDEO, 3), (NOTEXT, 0)])
def test_jacobi_equals_sequential_at_tiny_threshold(fields, frames, schedule):
    flow = random_flow(**fields)
    z, y, y_u = flow_inputs(flow, frames=frames)
    cfg = 2.0 if y is not None else 0.0
    seq = flow.reverse(z, y, y_uncond=y_u, cfg=cfg)
    jac = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=True, jacobi_block_size=3, jacobi_threshold=1e-14,
                       jacobi_max_iter=64, jacobi_schedule=schedule)
    assert rel(jac, seq) < 1e-4


@pytest.mark.parametrize("schedule", ["chunk", "window"])
def test_zero_first_guess_past_the_first_frame_reaches_the_same_video(schedule):
    flow = random_flow(**VIDEO)
    z, y, y_u = flow_inputs(flow, frames=3)
    seq = flow.reverse(z, y, y_uncond=y_u, cfg=2.0)
    options = dict(jacobi=True, jacobi_block_size=3, jacobi_threshold=1e-14, jacobi_max_iter=64, jacobi_schedule=schedule)
    zero = flow.reverse(z, y, y_uncond=y_u, cfg=2.0, jacobi_init="zero", **options)
    assert rel(zero, seq) < 1e-4
    with pytest.raises(ValueError, match="unknown Jacobi first guess 'noise'"):
        flow.reverse(z, y, y_uncond=y_u, cfg=2.0, jacobi_init="noise", **options)


def test_jacobi_traces_each_chunk_shape_once():
    flow = random_flow(**IMAGE)
    z, y, y_u = flow_inputs(flow)
    stats = JacobiStats()
    flow.reverse(z, y, y_uncond=y_u, cfg=1.0, jacobi=True, jacobi_block_size=3, stats=stats)
    # 16 tokens in chunks of 3: six chunks per block (the last padded). Chunks share a trace when the
    # keys they may read round up to the same attended length.
    assert len(stats.chunks) == 6 * 3
    for block in (b for b in flow.blocks if not b.is_identity):
        text_len = y.shape[1] if block.sees_text else 0
        lengths = {visible_length(text_len + c.start + 3, text_len + 16 + 3) for c in stats.chunks
                   if c.block == block.index}
        assert stats.traces[block.index] == len(lengths)
    assert all(1 <= c.iterations <= 32 for c in stats.chunks)


def test_jacobi_check_every_still_converges():
    flow = random_flow(**IMAGE)
    z, y, _ = flow_inputs(flow)
    ref = flow.reverse(z, y)
    got = flow.reverse(z, y, jacobi=True, jacobi_block_size=4, jacobi_threshold=1e-12, jacobi_max_iter=64,
                       jacobi_check_every=4)
    assert rel(got, ref) < 1e-4


def test_long_video_past_training_length():
    flow = random_flow(**VIDEO)
    z, y, y_u = flow_inputs(flow, batch=1, frames=5)  # trained on 3 latent frames
    stats = JacobiStats()
    x = flow.reverse(z, y, y_uncond=y_u, cfg=1.0, jacobi=True, jacobi_block_size=2, context_frames=1, stats=stats)
    assert x.shape == z.shape
    assert stats.reencodes >= 1
    assert np.isfinite(np.array(x)).all()


def test_bad_inputs_raise_clear_errors(tmp_path):
    flow = random_flow(**IMAGE)
    with pytest.raises(ValueError, match="channels-last"):
        flow.forward(mx.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="pass y"):
        flow.forward(mx.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match="y_uncond"):
        flow.reverse(mx.zeros((1, 4, 4, 4)), mx.zeros((1, 6, 24)), cfg=1.0)
    with pytest.raises(ModelLoadError, match="not found"):
        load_flow(tmp_path / "nothing")
    save_flow(flow, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_flow(tmp_path / "m")


def test_visible_length_rounds_up_to_at_most_eight_sizes():
    sizes = {visible_length(end, 100) for end in range(1, 101)}
    assert len(sizes) <= 8 and max(sizes) == 100
    assert all(visible_length(end, 100) >= end for end in range(1, 101))
    assert visible_length(5, 100) == 13  # a chunk at the start reads an eighth of the cache
