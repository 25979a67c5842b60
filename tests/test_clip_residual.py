"""MLX's forward flow, teacher-forced on a sampled clip, gives back the noise it was sampled from.

The reference is ``STARFlow.reverse`` itself (cache path, Jacobi solved exactly), the residual runs the
training-time forward (``MetaBlock.affine`` over whole sequences): two code paths, so a window, guidance or
known-frame rule that the residual got wrong shows as a mismatch far above float32 rounding.
"""

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import VIDEO, random_flow, rel
from starflow_mlx.coreml.clip_residual import clip_noise, window_segments

TINY = {**VIDEO, "layers_per_block": [1, 1, 2]}  # two shallow blocks (one flipped), trained on 3 frames of 4 tokens
EXACT = 1e-5  # float32 rounding of one forward pass


@pytest.fixture(scope="module")
def flow():
    return random_flow(seed=0, **TINY)


def sample(flow, frames, known, context_frames, cfg=2.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((1, frames, 2, 2, 4)).astype(np.float32)
    y, y_u = (rng.standard_normal((1, 6, 24)).astype(np.float32) for _ in range(2))
    context = rng.standard_normal((1, known, 2, 2, 4)).astype(np.float32) if known else None
    x = flow.reverse(mx.array(z), mx.array(y), y_uncond=mx.array(y_u), cfg=cfg, jacobi=True, jacobi_block_size=4,
                     jacobi_threshold=0.0, jacobi_max_iter=16, context_frames=context_frames,
                     context=None if context is None else mx.array(context))
    return np.array(x), z, y, y_u


@pytest.mark.parametrize("frames,known,context_frames",
                         [(3, 0, None), (5, 0, 1), (6, 0, 2), (5, 1, 1), (5, 2, 1), (5, 3, 1)],
                         ids=["window", "one slide", "two slides", "known frame", "known frames", "known window"])
def test_the_forward_flow_gives_back_the_noise_of_every_sampled_frame(flow, frames, known, context_frames):
    x, z, y, y_u = sample(flow, frames, known, context_frames)
    back = clip_noise(flow, x, y, y_u, 2.0, known=known, context_frames=context_frames)
    assert back.shape == z[:, known:].shape and rel(back, z[:, known:]) < EXACT


def test_the_rules_of_sampling_are_really_followed(flow):
    """Another context or no guidance: each gives another noise."""
    x, z, y, y_u = sample(flow, 5, 1, 1)
    wrong = [clip_noise(flow, x, y, y_u, 2.0, known=1, context_frames=2),
             clip_noise(flow, x, y, y_u, 0.0, known=1, context_frames=1)]
    assert all(rel(w, z[:, 1:]) > 1000 * EXACT for w in wrong)


def test_window_segments_restart_after_the_context():
    # 5 frames of 4 tokens, a window of 3 frames, 1 context frame: slides at 12 and 20 ... the clip ends first.
    assert window_segments(20, 0, 4, 12, 4) == [(0, 0, 12), (8, 12, 20)]
    assert window_segments(24, 0, 4, 12, 8) == [(0, 0, 12), (4, 12, 16), (8, 16, 20), (12, 20, 24)]
    # A known frame stays whole while a frame fits after it; a known window keeps only the context.
    assert window_segments(20, 4, 4, 12, 4) == [(0, 4, 12), (8, 12, 20)]
    assert window_segments(20, 8, 4, 12, 4) == [(0, 8, 12), (8, 12, 20)]
    assert window_segments(20, 12, 4, 12, 4) == [(8, 12, 20)]
    assert window_segments(12, 4, 4, 12, 4) == [(0, 4, 12)]  # no window: one sequence
