"""The adaptive Jacobi schedule and the exactness cap every chunk schedule shares."""

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import IMAGE, VIDEO, flow_inputs, random_flow, rel
from starflow_mlx.sampling.jacobi import ChunkSizer, JacobiStats, converged


def test_adaptive_past_training_length_with_context_matches_the_chunk_schedule():
    flow = random_flow(**VIDEO)
    z, y, y_u = flow_inputs(flow, batch=1, frames=5)  # trained on 3 latent frames: the window restarts
    known = flow.reverse(z[:, :1], y, y_uncond=y_u, cfg=1.0)
    options = dict(y_uncond=y_u, cfg=1.0, context_frames=1, context=known, jacobi=True, jacobi_block_size=4,
                   jacobi_threshold=1e-14, jacobi_max_iter=64)
    chunks = flow.reverse(z, y, **options)
    stats = JacobiStats()
    got = flow.reverse(z, y, jacobi_schedule="adaptive", stats=stats, **options)
    assert stats.reencodes > 0
    assert len({c.size for c in stats.chunks}) > 1  # the sizes did adapt
    assert rel(got, chunks) < 1e-4
    assert np.allclose(np.array(got[:, :1]), np.array(known), atol=1e-6)


@pytest.mark.parametrize("schedule", ["chunk", "adaptive"])
def test_a_chunk_stops_once_every_token_is_exact(schedule):
    # Threshold 0 never converges, yet a chunk of k tokens takes k iterations (not max_iter) and is exact.
    flow = random_flow(**IMAGE)
    z, y, y_u = flow_inputs(flow)
    stats = JacobiStats()
    got = flow.reverse(z, y, y_uncond=y_u, cfg=1.5, jacobi=True, jacobi_schedule=schedule, jacobi_block_size=3,
                       jacobi_threshold=0.0, jacobi_max_iter=32, stats=stats)
    assert rel(got, flow.reverse(z, y, y_uncond=y_u, cfg=1.5)) < 1e-5
    assert all(c.iterations == c.size for c in stats.chunks)


def test_video_chunks_past_the_first_frame_take_one_more_iteration():
    # Their first iteration reads the previous frame's tokens, so it is not exact.
    flow = random_flow(**VIDEO)
    z, y, y_u = flow_inputs(flow, batch=1, frames=3)
    stats = JacobiStats()
    got = flow.reverse(z, y, y_uncond=y_u, cfg=1.0, jacobi=True, jacobi_block_size=2, jacobi_threshold=0.0,
                       stats=stats)
    assert rel(got, flow.reverse(z, y, y_uncond=y_u, cfg=1.0)) < 1e-5
    deep = flow.config.num_blocks - 1
    frame = flow.config.latent_size ** 2
    for c in (c for c in stats.chunks if c.block == deep):
        assert c.iterations == c.size + (c.start > frame)


def test_sizer_halves_to_sequential_steps_and_probes_back():
    sizer = ChunkSizer(16)
    assert sizer.size(16) == 4
    sizer.update(4, 4)  # no gain over sequential: halve
    assert sizer.size(16) == 2
    sizer.update(2, 2)
    assert sizer.size(16) == 1
    for _ in range(ChunkSizer.PROBE - 1):
        sizer.update(1, 1)
        assert sizer.size(16) == 1
    sizer.update(1, 1)
    assert sizer.size(16) == 4  # after PROBE sequential steps, try a chunk again


def test_sizer_doubles_where_a_block_converges_fast_up_to_the_block_size():
    sizer = ChunkSizer(16)
    sizer.update(4, 1)
    assert sizer.size(99) == 8
    sizer.update(8, 3)
    assert sizer.size(99) == 16
    sizer.update(16, 3)
    assert sizer.size(99) == 16  # never past the block size
    assert sizer.size(5) == 5  # nor past the caller's limit
    sizer.update(16, 6)  # 6 iterations for 16 tokens: keep
    assert sizer.size(99) == 16


def test_converged_needs_upstreams_rule_and_a_small_remaining_error():
    assert not converged(0.01, None, 0.005)  # above the threshold
    assert converged(0.001, None, 0.005)  # first check: upstream's rule alone
    assert converged(0.001, 0.1, 0.005)  # fast contraction (rho 0.1)
    # Slow contraction (rho 0.9): the change is small but about 9x as much error remains.
    assert not converged(0.004, 0.004 / 0.81, 0.005)
