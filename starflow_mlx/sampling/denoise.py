"""Cleaning the flow's noisy samples with one score step through the flow itself.

STARFlow learns the density of data with Gaussian noise of ``noise_std`` added,
so its samples carry that noise. Tweedie's formula removes it in one step:
``x + noise_std^2 * grad_x log p(x)``, with the exact gradient from ``mx.grad``.
"""

from __future__ import annotations

import mlx.core as mx


def score_denoise(flow, x: mx.array, y: mx.array | None, noise_std: float) -> mx.array:
    def total_log_prob(v):
        return mx.sum(flow.log_prob(v, y))

    grad = mx.grad(total_log_prob)(x.astype(mx.float32))
    return x + (noise_std**2) * grad


DENOISER_STEP = 0.3  # upstream's step for the learnable denoiser: x <- x - 0.3 * D(x)


def denoiser_chunks(frames: int, steps: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, stop, first written frame) of each chunk, as upstream walks a video.

    Chunks of ``steps`` frames advance by ``steps - overlap``; a chunk writes back only
    the frames after its overlap, and chunks that would write nothing are skipped.
    """
    if steps < 1 or not 0 <= overlap < steps:
        raise ValueError(f"denoiser chunks need 0 <= overlap < length, got {overlap} and {steps}")
    chunks, start, skip = [], 0, 0
    while start < frames:
        stop = min(start + steps, frames)
        if start + skip < stop:
            chunks.append((start, stop, start + skip))
        skip = overlap
        start += steps - overlap
    return chunks


def learnable_denoise(flow, x: mx.array, y: mx.array | None, steps: int, overlap: int,
                      on_chunk=None) -> mx.array:
    """Upstream's video denoising: each chunk sees frames already cleaned by the one before it.

    ``x`` (B, T, H, W, c) flow samples; ``y`` the conditional text features.
    """
    chunks = denoiser_chunks(x.shape[1], steps, overlap)
    for i, (start, stop, first) in enumerate(chunks):
        part = x[:, start:stop]
        cleaned = part - DENOISER_STEP * flow.denoiser(part, y)
        x = mx.concatenate([x[:, :first], cleaned[:, first - start:], x[:, stop:]], axis=1)
        mx.eval(x)
        if on_chunk is not None:
            on_chunk(i + 1, len(chunks))
    return x
