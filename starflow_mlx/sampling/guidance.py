"""Classifier-free guidance on the affine parameters of a flow step.

The guided step is the product of the conditional Gaussian raised to ``1 + w``
and the unconditional one to ``-w``; the ratio of scales is clipped at one so
the effective variance never grows.
"""

from __future__ import annotations

import mlx.core as mx


def guide(a: mx.array, b: mx.array, weight: float) -> tuple[mx.array, mx.array]:
    """``a``/``b`` stack [cond; uncond] on axis 0; both halves get the guided values."""
    a_c, a_u = mx.split(a, 2, axis=0)
    b_c, b_u = mx.split(b, 2, axis=0)
    s = mx.square(mx.minimum(a_c / a_u, 1.0))
    denom = 1.0 + weight - weight * s
    a_eff = a_c / mx.sqrt(denom)
    b_eff = ((1.0 + weight) * b_c - weight * s * b_u) / denom
    return mx.concatenate([a_eff, a_eff], axis=0), mx.concatenate([b_eff, b_eff], axis=0)
