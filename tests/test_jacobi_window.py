"""The sliding-window Jacobi schedule: exact at a tiny threshold, and its commit/rewind bookkeeping."""

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import IMAGE, VIDEO, flow_inputs, random_flow, rel
from starflow_mlx.sampling.jacobi import JacobiStats


def window(flow, z, y, y_u, cfg, stats=None, **options):
    return flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=True, jacobi_schedule="window", stats=stats, **options)


def test_threshold_zero_commits_one_token_per_step_and_is_exact():
    # Nothing converges by the threshold, so only the window's first token (exact) is committed each step:
    # the cache is rewound by one position every time, and the last windows are padded (16 tokens, size 3).
    flow = random_flow(**IMAGE)
    z, y, y_u = flow_inputs(flow)
    stats = JacobiStats()
    got = window(flow, z, y, y_u, 1.5, stats, jacobi_block_size=3, jacobi_threshold=0.0)
    assert rel(got, flow.reverse(z, y, y_uncond=y_u, cfg=1.5)) < 1e-5
    blocks = [b.index for b in flow.blocks if not b.is_identity]
    for b in blocks:
        starts = [c.start for c in stats.chunks if c.block == b]
        assert starts == list(range(16))  # one committed token per host round-trip
        assert stats.token_evaluations(b) == sum(min(3, 16 - s) for s in range(16))  # padding not counted


def test_huge_threshold_commits_whole_windows():
    flow = random_flow(**IMAGE)
    z, y, y_u = flow_inputs(flow)
    stats = JacobiStats()
    window(flow, z, y, y_u, 1.5, stats, jacobi_block_size=5, jacobi_threshold=1e9)
    first = [c for c in stats.chunks if c.block == stats.chunks[0].block]
    assert [c.start for c in first] == [0, 5, 10, 15] and [c.size for c in first] == [5, 5, 5, 1]


def test_max_iter_bounds_every_token():
    flow = random_flow(**IMAGE)
    z, y, y_u = flow_inputs(flow)
    stats = JacobiStats()
    window(flow, z, y, y_u, 1.5, stats, jacobi_block_size=4, jacobi_threshold=0.0, jacobi_max_iter=2)
    # With nothing converging, a token is committed once it has taken part in max_iter iterations.
    for b in {c.block for c in stats.chunks}:
        rounds = np.zeros(16, int)
        for c in (c for c in stats.chunks if c.block == b):
            rounds[c.start : c.start + c.size] += 1
        assert rounds.max() <= 2


def test_window_restarts_past_training_length_match_the_chunk_schedule():
    flow = random_flow(**VIDEO)
    z, y, y_u = flow_inputs(flow, batch=1, frames=5)  # trained on 3 latent frames: the cache restarts
    options = dict(jacobi=True, jacobi_block_size=2, jacobi_threshold=1e-14, jacobi_max_iter=64, context_frames=1)
    chunk_stats, window_stats = JacobiStats(), JacobiStats()
    chunk = flow.reverse(z, y, y_uncond=y_u, cfg=1.0, stats=chunk_stats, **options)
    got = flow.reverse(z, y, y_uncond=y_u, cfg=1.0, stats=window_stats, jacobi_schedule="window", **options)
    assert window_stats.reencodes == chunk_stats.reencodes >= 1
    assert rel(got, chunk) < 1e-4


def test_unknown_schedule_is_one_clear_error():
    flow = random_flow(**IMAGE)
    z, y, y_u = flow_inputs(flow)
    with pytest.raises(ValueError, match="unknown Jacobi schedule 'fast'"):
        flow.reverse(z, y, jacobi=True, jacobi_schedule="fast")
