"""Independent ground truth for rules a self-consistency test cannot see.

Forward-then-reverse and Jacobi-equals-sequential both pass when both sides share a bug (a flipped sign,
a residual read from the wrong slice, a guidance clip on the wrong side, a flip across frames). Here each
rule is checked against a value computed another way: a closed form (the Gaussian's score, a product of
Gaussians), hand-written index lists from /work/shared/reference/upstream-format.md, or a numpy/forward-pass
reference of upstream's Jacobi loop.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import IMAGE, VIDEO, random_flow
from starflow_mlx.config import FlowConfig
from starflow_mlx.models.starflow import Layout
from starflow_mlx.sampling.denoise import score_denoise
from starflow_mlx.sampling.guidance import guide
from starflow_mlx.sampling.jacobi import JacobiStats, invert_jacobi


# ---------------------------------------------------------------- the score step (Tweedie)


class GaussianFlow:
    """A 'flow' whose density is N(mu, s^2) per element, so the score is known: -(x - mu) / s^2."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def log_prob(self, v, y):
        d = (v - self.mu) / self.s
        return mx.sum(-0.5 * d * d - math.log(self.s) - 0.5 * math.log(2 * math.pi), axis=(1, 2, 3))


def test_score_step_is_the_posterior_mean_of_a_gaussian():
    """Data x0 ~ N(mu, tau^2), observed x = x0 + sigma * e: then x ~ N(mu, tau^2 + sigma^2) and the posterior mean
    is E[x0 | x] = mu + tau^2 / (tau^2 + sigma^2) * (x - mu) (conjugate Gaussians), which is what
    x + sigma^2 * grad log p(x) must give. A step of the wrong sign moves x away from mu instead."""
    mu, tau, sigma = 0.3, 0.8, 0.5
    x = np.random.default_rng(0).normal(mu, math.hypot(tau, sigma), (2, 4, 4, 3)).astype(np.float32)
    out = np.array(score_denoise(GaussianFlow(mu, math.hypot(tau, sigma)), mx.array(x), None, sigma))
    expected = mu + tau**2 / (tau**2 + sigma**2) * (x.astype(np.float64) - mu)
    # float32 throughout: a few roundings of values below 4, so 1e-6 absolute is generous and 1e-2 would not be.
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
    assert np.all(np.abs(out - mu) <= np.abs(x - mu) + 1e-6)  # shrinks toward the mean, never away


def test_score_step_raises_a_real_flows_likelihood():
    """On a real flow the step follows the gradient of log p: for a small enough step log p goes up (first
    order: by sigma^2 * |grad|^2 > 0); the wrong sign lowers it by the same amount."""
    flow = random_flow(seed=3, **IMAGE)
    mx.random.seed(5)
    x = mx.random.normal((2, 4, 4, 4))
    y = mx.random.normal((2, IMAGE["txt_size"], IMAGE["txt_dim"]))
    sigma = 0.05
    grad = mx.grad(lambda v: mx.sum(flow.log_prob(v, y)))(x)
    out = score_denoise(flow, x, y, sigma)
    np.testing.assert_allclose(np.array(out), np.array(x + sigma**2 * grad), rtol=0, atol=1e-6)
    gain = np.array(flow.log_prob(out, y) - flow.log_prob(x, y))
    predicted = sigma**2 * np.array(mx.sum(grad * grad, axis=(1, 2, 3)))
    assert np.all(gain > 0) and np.allclose(gain, predicted, rtol=0.2), (gain, predicted)


# ---------------------------------------------------------------- guidance


def guided_by_product_of_gaussians(a_c, b_c, a_u, b_u, w):
    """N(b_c, a_c^2)^(1+w) * N(b_u, a_u^2)^(-w), in float64 from precisions, with upstream's clip: the
    unconditional scale is taken no smaller than the conditional one (s = min(a_c/a_u, 1)^2), so the guided
    precision (1+w)/a_c^2 - w/a_u^2 stays at least 1/a_c^2 and the variance never grows."""
    a_c, b_c, a_u, b_u = (np.asarray(v, np.float64) for v in (a_c, b_c, a_u, b_u))
    a_u = np.maximum(a_u, a_c)
    precision = (1 + w) / a_c**2 - w / a_u**2
    mean = ((1 + w) * b_c / a_c**2 - w * b_u / a_u**2) / precision
    return 1 / np.sqrt(precision), mean


def run_guide(a_c, b_c, a_u, b_u, w):
    a = mx.array(np.concatenate([a_c, a_u]).astype(np.float32))
    b = mx.array(np.concatenate([b_c, b_u]).astype(np.float32))
    a_eff, b_eff = guide(a, b, w)
    n = len(a_c)
    assert np.array_equal(np.array(a_eff[:n]), np.array(a_eff[n:]))  # both halves continue with the guided values
    assert np.array_equal(np.array(b_eff[:n]), np.array(b_eff[n:]))
    return np.array(a_eff[:n]), np.array(b_eff[:n])


def test_guidance_by_hand():
    # a_c < a_u: s = 0.25, 1 + w - w s = 1.75; a = 0.5 / sqrt(1.75), b = (2 * 2 - 0.25 * 1) / 1.75.
    # a_c > a_u: clipped, s = 1, denominator 1; a = a_c, b = (1 + w) b_c - w b_u = 4 - 1.
    a, b = run_guide(np.array([0.5, 2.0]), np.array([2.0, 2.0]), np.array([1.0, 1.0]), np.array([1.0, 1.0]), 1.0)
    np.testing.assert_allclose(a, [0.5 / math.sqrt(1.75), 2.0], rtol=1e-6)
    np.testing.assert_allclose(b, [3.75 / 1.75, 3.0], rtol=1e-6)
    # w = 0 is the conditional step, whatever the unconditional one says.
    a, b = run_guide(np.array([0.7, 1.3]), np.array([0.1, -0.4]), np.array([5.0, 0.2]), np.array([9.0, 9.0]), 0.0)
    np.testing.assert_allclose(a, [0.7, 1.3], rtol=1e-6) and np.testing.assert_allclose(b, [0.1, -0.4], rtol=1e-6)


@pytest.mark.parametrize("w", [0.5, 1.5, 4.0])
def test_guidance_is_a_product_of_gaussians(w):
    rng = np.random.default_rng(1)
    shape = (64, 3)
    a_c, a_u = rng.uniform(0.2, 2.0, shape), rng.uniform(0.2, 2.0, shape)  # both sides of the clip
    b_c, b_u = rng.normal(0, 1, shape), rng.normal(0, 1, shape)
    a, b = run_guide(a_c, b_c, a_u, b_u, w)
    ref_a, ref_b = guided_by_product_of_gaussians(a_c, b_c, a_u, b_u, w)
    # float32: a handful of roundings; the denominator 1 + w - w s >= 1 never cancels. 1e-5 relative.
    np.testing.assert_allclose(a, ref_a, rtol=1e-5)
    np.testing.assert_allclose(b, ref_b, rtol=1e-5, atol=1e-5)
    assert np.all(a <= a_c * (1 + 1e-6))  # the guided scale never exceeds the conditional one


# ---------------------------------------------------------------- block order (flips)


def test_block_flips_follow_upstreams_table():
    """upstream-format.md 3: L2R gives shallow block i [identity, flip][(i+1) % 2] and the top [..][n % 2];
    R2L [..][i % 2] and [..][(n-1) % 2]. The released 6-block L2R configs: top identity, shallow blocks
    0..4 flip, identity, flip, identity, flip."""
    def flips(n, order):
        cfg = FlowConfig(**{**IMAGE, "layers_per_block": [1] * n, "seq_order": order})
        return [cfg.block_flips(i) for i in range(n)]

    assert flips(6, "L2R") == [True, False, True, False, True, False]
    assert flips(6, "R2L") == [False, True, False, True, False, True]
    assert flips(5, "L2R") == [True, False, True, False, True]
    assert flips(5, "R2L") == [False, True, False, True, False]
    assert flips(4, "L2R") == [True, False, True, False]


def test_permutations_by_hand():
    seq = mx.arange(12).reshape(1, 12, 1)
    video = Layout(1, 3, 2, 2, 1, False)  # 3 frames of 4 tokens in one sequence (a deep block)
    assert np.array(video.permute(seq, True, True)).ravel().tolist() == [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8]
    assert np.array(video.permute(seq, True, False)).ravel().tolist() == list(range(11, -1, -1))
    assert np.array(video.permute(seq, False, True)).ravel().tolist() == list(range(12))
    image = Layout(1, 0, 3, 4, 1, False)
    assert np.array(image.permute(seq, True, True)).ravel().tolist() == list(range(11, -1, -1))
    local = Layout(1, 3, 2, 2, 1, True)  # frame-local shallow blocks: each frame its own sequence
    per_frame = mx.arange(12).reshape(3, 4, 1)
    assert np.array(local.permute(per_frame, True, True)).reshape(3, 4).tolist() == [[3, 2, 1, 0], [7, 6, 5, 4],
                                                                                     [11, 10, 9, 8]]


def test_a_flipped_video_deep_block_reverses_tokens_inside_each_frame():
    """The model's own forward through a flipped deep block of a temporally causal video model equals the block
    run on tokens reversed inside each frame by numpy (frames in order), the output un-reversed the same way."""
    flow = random_flow(seed=2, **{**VIDEO, "layers_per_block": [1, 1, 2], "seq_order": "L2R"})  # 3 blocks: top flips
    deep = flow.blocks[-1]
    assert deep.flips and flow.config.temporal_causal > 0
    mx.random.seed(4)
    b, t, h, w, c = 2, 3, 2, 2, flow.config.in_channels
    x = mx.random.normal((b, t, h, w, c))
    y = mx.random.normal((b, VIDEO["txt_size"], VIDEO["txt_dim"]))
    z, logdet = flow._forward_blocks(x, y, [deep])

    order = np.concatenate([f * h * w + np.arange(h * w)[::-1] for f in range(t)])  # reversed within each frame
    seq = np.ascontiguousarray(np.array(x).reshape(b, t * h * w, c)[:, order])
    layout = flow._layout(x, deep.index)
    z_seq, ld = deep.forward(mx.array(seq), y, flow.rope(layout, y.shape[1]))
    expected = np.empty_like(seq)
    expected[:, order] = np.array(z_seq)
    np.testing.assert_allclose(np.array(z).reshape(b, -1, c), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(logdet), np.array(ld), rtol=1e-6)
    # A flip across the whole video (frames reversed too) is a different model: it must not agree.
    whole = np.ascontiguousarray(np.array(x).reshape(b, -1, c)[:, ::-1])
    z_whole, _ = deep.forward(mx.array(whole), y, flow.rope(layout, y.shape[1]))
    assert np.abs(np.array(z_whole)[:, ::-1] - np.array(z).reshape(b, -1, c)).max() > 1e-2


# ---------------------------------------------------------------- Jacobi's residual


def reference_jacobi(block, rope, z, y, block_size, threshold, max_iter):
    """Upstream's block-wise Jacobi (upstream-format.md 4), with (a, b) from the block's full-sequence forward
    pass (no cache, no stepper): for an input sequence g, a = exp(-logdet) and b = g - z(g) * a, position t
    depending only on g before t. As upstream, the cache keeps the keys/values of the tokens a chunk was fed
    on its last iteration (before that iteration's update): earlier positions see those ``fed`` values.
    Returns the solution and (iterations, final residual) per chunk."""
    zz = np.array(z, np.float64)
    x = zz.copy()  # x_full = [sos; z]
    fed = x.copy()  # the token each cached position was computed from (position t reads token t - 1)
    n, record = zz.shape[1], []
    for s in range(0, n, block_size):
        k = min(block_size, n - s)
        for it in range(max_iter):
            guess = x.copy()
            guess[:, :max(s - 1, 0)] = fed[:, :max(s - 1, 0)]
            fed[:, max(s - 1, 0):s + k - 1] = x[:, max(s - 1, 0):s + k - 1]
            z_of, ld = block.forward(mx.array(guess.astype(np.float32)), y, rope, elementwise=True)
            a = np.exp(-np.array(ld, np.float64))
            b = guess - np.array(z_of, np.float64) * a
            new = b[:, s:s + k] + a[:, s:s + k] * zz[:, s:s + k]
            diff = np.mean((new - x[:, s:s + k]) ** 2) / np.mean(new**2)  # against the slice this chunk rewrites
            x[:, s:s + k] = new
            if diff < threshold:
                break
        record.append((it + 1, diff))
    return x, record


# Iterations per chunk of 8 tokens: stopped by the threshold (3, 3), at it and at the cap (5, 4), by the cap (5, 5).
@pytest.mark.parametrize("threshold,iterations", [(1e-2, [3, 3]), (1e-3, [5, 4]), (1e-6, [5, 5])])
def test_jacobi_residuals_match_a_forward_pass_reference(threshold, iterations):
    flow = random_flow(seed=6, scale=0.1, **IMAGE)  # larger weights than the default: chunks take several iterations
    block = flow.blocks[-1]
    mx.random.seed(7)
    z = mx.random.normal((2, 16, IMAGE["in_channels"]))
    y = mx.random.normal((2, IMAGE["txt_size"], IMAGE["txt_dim"]))
    layout = Layout(2, 0, 4, 4, IMAGE["in_channels"], False)
    # max_iter 5 < 8 tokens a chunk, so the solver's own stop (a chunk of k is exact after k) never decides.
    stats = JacobiStats()
    out = invert_jacobi(flow, block, layout, z, y, 0.0, block_size=8, threshold=threshold, max_iter=5, stats=stats,
                        compile=False)
    x, record = reference_jacobi(block, flow.rope(layout, IMAGE["txt_size"]), z, y, 8, threshold, 5)
    assert [it for it, _ in record] == iterations
    for (its, residual), chunk in zip(record, stats.chunks, strict=True):
        # Cached steps and the full forward differ by float32 rounding (1e-6 relative); a residual is a ratio of
        # squared changes of 1e-2 or more, so they agree to 1e-4 relative; 1e-3 leaves a margin.
        assert chunk.iterations == its and chunk.residual == pytest.approx(residual, rel=1e-3), (stats.chunks, record)
        assert abs(residual - threshold) > 0.1 * threshold  # the stop is not decided by rounding
    np.testing.assert_allclose(np.array(out), x, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- long videos: the window rule


@pytest.mark.parametrize("jacobi", [False, True], ids=["sequential", "jacobi"])
def test_a_video_past_the_training_length_restarts_from_its_context_frames(jacobi):
    """upstream-format.md 4: past the window (3 latent frames here) the deep block's cache restarts with the text
    and the last context frames, at position 0. So a 5-frame video is: its first 3 frames as a 3-frame video of
    the same noise; then frames 3 and 4 as a fresh video that starts from frame 2 as its known frame."""
    flow = random_flow(seed=0, **VIDEO)
    assert flow.config.num_frames == 3
    mx.random.seed(1)
    z = mx.random.normal((1, 5, 2, 2, VIDEO["in_channels"]))
    y, y_u = (mx.random.normal((1, VIDEO["txt_size"], VIDEO["txt_dim"])) for _ in range(2))
    options = dict(y_uncond=y_u, cfg=1.5, context_frames=1, jacobi=jacobi, jacobi_block_size=2, jacobi_threshold=1e-12,
                   jacobi_max_iter=64)
    long = flow.reverse(z, y, **options)
    first = flow.reverse(z[:, :3], y, **options)
    np.testing.assert_array_equal(np.array(long[:, :3]), np.array(first))  # the same computation (measured: equal)
    restarted = flow.reverse(z[:, 2:], y, context=long[:, 2:3], **options)
    np.testing.assert_allclose(np.array(restarted[:, 0]), np.array(long[:, 2]), rtol=0, atol=1e-6)  # kept as given
    # Frame 2 goes through the shallow blocks' forward before the deep block sees it: float32 roundings of values
    # up to 3 (measured 9e-7); 1e-5 leaves 10x, and a wrong restart (position, frames kept) is off by 1e-3 or more.
    np.testing.assert_allclose(np.array(restarted[:, 1:]), np.array(long[:, 3:]), rtol=0, atol=1e-5)
    # Without the restart (attending to all 5 frames) frames 3 and 4 differ: the check can see the rule.
    assert np.abs(np.array(long[:, 3:]) - np.array(flow.reverse(z[:, 1:], y, context=long[:, 1:3], **options)[:, 2:])).max() > 1e-3
