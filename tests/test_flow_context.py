"""Known first frames (image- and video-to-video) enter the deep block as cached context.

A causal flow's later frames depend on earlier ones only through the deep block's cache,
so conditioning on the first frames of an exact sample must give that sample back.
"""

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import VIDEO, random_flow


@pytest.fixture(scope="module")
def setup():
    flow = random_flow(7, **{**VIDEO, "num_frames": 4})
    key = mx.random.key(3)
    z = mx.random.normal((2, 4, 2, 2, 4), key=key)
    y = mx.random.normal((2, 6, 24), key=mx.random.key(4))
    y_u = mx.zeros((2, 6, 24))
    return flow, z, y, y_u


@pytest.mark.parametrize("known", [1, 2])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_sequential_context_reproduces_the_exact_sample(setup, known, cfg):
    flow, z, y, y_u = setup
    x = flow.reverse(z, y, y_uncond=y_u, cfg=cfg)
    again = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, context=x[:, :known])
    np.testing.assert_allclose(np.array(again), np.array(x), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_jacobi_context_matches_sequential(setup, cfg):
    flow, z, y, y_u = setup
    x = flow.reverse(z, y, y_uncond=y_u, cfg=cfg)
    again = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, context=x[:, :1], jacobi=True, jacobi_block_size=2,
                         jacobi_threshold=1e-9, jacobi_max_iter=64)
    np.testing.assert_allclose(np.array(again), np.array(x), atol=2e-4, rtol=1e-4)


def test_context_frames_come_back_and_steer_the_rest(setup):
    flow, z, y, _ = setup
    image = mx.random.normal((2, 1, 2, 2, 4), key=mx.random.key(9))
    x = flow.reverse(z, y, context=image, jacobi=True, jacobi_block_size=2, jacobi_threshold=1e-9)
    np.testing.assert_allclose(np.array(x[:, :1]), np.array(image), atol=2e-4)
    free = flow.reverse(z, y, jacobi=True, jacobi_block_size=2, jacobi_threshold=1e-9)
    assert float(mx.abs(x[:, 1:] - free[:, 1:]).max()) > 1e-3  # later frames depend on the context


def test_context_past_the_window_keeps_only_context_frames(setup):
    """A clip longer than the deep block's window is re-encoded from its last context frames."""
    flow, _, y, _ = setup
    long_flow = random_flow(7, **{**VIDEO, "num_frames": 2})
    z = mx.random.normal((1, 5, 2, 2, 4), key=mx.random.key(5))
    ref = long_flow.reverse(z, y[:1], jacobi=True, jacobi_block_size=2, jacobi_threshold=1e-9, context_frames=1)
    again = long_flow.reverse(z, y[:1], jacobi=True, jacobi_block_size=2, jacobi_threshold=1e-9, context_frames=1,
                              context=ref[:, :3])
    np.testing.assert_allclose(np.array(again), np.array(ref), atol=5e-4, rtol=1e-3)


def test_bad_context_is_refused(setup):
    flow, z, y, _ = setup
    with pytest.raises(ValueError, match="fewer frames"):
        flow.reverse(z, y, context=z)
    with pytest.raises(ValueError, match="match the noise"):
        flow.reverse(z, y, context=z[:1, :1])


@pytest.mark.parametrize("known", [0, 1, 3])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_sequential_slides_the_window_as_exact_jacobi_does(setup, known, cfg):
    """Past the window the sequential sampler restarts the cache from the last context frames, as Jacobi does:
    the two solve the same equations, so at a vanishing threshold they agree (with and without known frames)."""
    _, _, y, y_u = setup
    long_flow = random_flow(7, **{**VIDEO, "num_frames": 2})
    z = mx.random.normal((1, 5, 2, 2, 4), key=mx.random.key(5))
    first = long_flow.reverse(z, y[:1], y_uncond=y_u[:1], cfg=cfg)[:, :known] if known else None
    options = dict(y_uncond=y_u[:1], cfg=cfg, context_frames=1, context=first)
    jacobi = long_flow.reverse(z, y[:1], jacobi=True, jacobi_block_size=2, jacobi_threshold=0.0,
                               jacobi_max_iter=8, **options)
    sequential = long_flow.reverse(z, y[:1], jacobi=False, **options)
    np.testing.assert_allclose(np.array(sequential), np.array(jacobi), atol=2e-4, rtol=1e-4)
    if not known:  # with all 5 frames in view (as if trained on 5) the sample differs: the window mattered
        long_flow.config.num_frames = 5
        try:
            wide = long_flow.reverse(z, y[:1], jacobi=False, **options)
        finally:
            long_flow.config.num_frames = 2
        assert float(mx.abs(wide - sequential).max()) > 1e-3
