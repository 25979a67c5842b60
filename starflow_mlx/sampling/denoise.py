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
