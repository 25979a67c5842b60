"""Denoising steps against values worked out by hand (gaps found by mutation testing, benchmarks/README.md).

The learnable denoiser's test in test_video_pipeline.py builds its expected value from ``DENOISER_STEP`` and the
flow's own denoiser, so a wrong step constant, a chunk written from the wrong frame or a missing progress call
passes it. Here the denoiser is a known function and the step is upstream's number.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.sampling.denoise import DENOISER_STEP, denoiser_chunks, learnable_denoise, score_denoise


def test_the_learnable_denoisers_step_is_upstreams():
    assert DENOISER_STEP == 0.3  # upstream-format.md: x <- x - 0.3 * D(x)


class MeanDenoiser:
    """D(part) = the chunk's mean over its frames, broadcast: each chunk's output depends on every frame it reads,
    so a chunk that reads its overlap before the previous chunk cleaned it gives another value."""

    def denoiser(self, part, y):
        return mx.broadcast_to(mx.mean(part, axis=1, keepdims=True), part.shape) + y


def by_hand(x, y, steps, overlap):
    x = x.astype(np.float64).copy()
    for start, stop, first in denoiser_chunks(x.shape[1], steps, overlap):
        part = x[:, start:stop]
        cleaned = part - 0.3 * (part.mean(axis=1, keepdims=True) + y)
        x[:, first:stop] = cleaned[:, first - start:]
    return x


@pytest.mark.parametrize("frames,steps,overlap", [(5, 3, 1), (7, 3, 2), (4, 4, 0)])
def test_learnable_denoise_by_hand(frames, steps, overlap):
    rng = np.random.default_rng(frames)
    x = rng.normal(size=(2, frames, 2, 3, 4)).astype(np.float32)
    y = 0.25  # the text features reach the denoiser: a shift it must pass on
    calls = []
    out = learnable_denoise(MeanDenoiser(), mx.array(x), y, steps, overlap, on_chunk=lambda *a: calls.append(a))
    # float32 arithmetic on values of order 1: a few roundings, 1e-6; a frame cleaned twice or not at all is off by 0.1.
    np.testing.assert_allclose(np.array(out), by_hand(x, y, steps, overlap), rtol=0, atol=1e-6)
    chunks = len(denoiser_chunks(frames, steps, overlap))
    assert calls == [(i + 1, chunks) for i in range(chunks)]


def test_learnable_denoise_second_chunk_reads_the_first_chunks_output():
    """5 frames in chunks of 3 with overlap 1: chunk 2 reads frame 2 as chunk 1 cleaned it, not the input."""
    x = np.zeros((1, 5, 1, 1, 1), np.float32)
    x[0, :, 0, 0, 0] = [3, 0, 0, 0, 0]
    out = np.array(learnable_denoise(MeanDenoiser(), mx.array(x), 0.0, 3, 1))[0, :, 0, 0, 0]
    # Chunk [0, 3): mean 1, every frame -0.3. Chunk [2, 5) reads (-0.3, 0, 0): mean -0.1, frames 3, 4 get +0.03.
    np.testing.assert_allclose(out, [2.7, -0.3, -0.3, 0.03, 0.03], rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps,overlap", [(0, 0), (3, 3), (3, -1), (1, 1)])
def test_denoiser_chunks_refuse_an_overlap_that_never_advances(steps, overlap):
    with pytest.raises(ValueError, match=f"0 <= overlap < length, got {overlap} and {steps}"):
        denoiser_chunks(10, steps, overlap)


def test_denoiser_chunks_edges():
    assert denoiser_chunks(3, 1, 0) == [(0, 1, 0), (1, 2, 1), (2, 3, 2)]  # one frame a chunk, no overlap
    assert denoiser_chunks(4, 3, 2) == [(0, 3, 0), (1, 4, 3)]  # advances by one; the last writes one frame
    assert denoiser_chunks(0, 3, 1) == []


class GaussianWithText:
    """log p(x | y) = N(x; y, s^2) per element: the score is (y - x) / s^2, so the text must reach the flow."""

    def __init__(self, s):
        self.s = s

    def log_prob(self, v, y):
        d = (v - y) / self.s
        return mx.sum(-0.5 * d * d - math.log(self.s), axis=(1, 2, 3))


def test_score_step_by_hand_with_text():
    """x + sigma^2 * (y - x) / s^2, with sigma 0.5 and s 1: x + 0.25 (y - x). sigma * 2 or sigma^2 dropped would
    step by 1 or 0.5 times the score; a lost y steps toward 0."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
    y = rng.normal(size=(2, 3, 3, 2)).astype(np.float32) + 2
    out = np.array(score_denoise(GaussianWithText(1.0), mx.array(x), mx.array(y), 0.5))
    np.testing.assert_allclose(out, x + 0.25 * (y - x), rtol=0, atol=2e-6)


def test_score_step_of_a_half_precision_sample_is_taken_in_float32():
    """The gradient is taken at float32 (flow arithmetic stays float32), then added to the sample as given."""
    x = mx.array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 2, 3, 2)).astype(mx.float16)
    out = score_denoise(GaussianWithText(1.0), x, mx.zeros(x.shape), 0.5)
    assert out.dtype == mx.float32
    expected = np.array(x.astype(mx.float32)) * 0.75
    np.testing.assert_allclose(np.array(out), expected, rtol=0, atol=1e-6)
