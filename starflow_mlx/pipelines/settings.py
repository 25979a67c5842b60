"""What every pipeline shares below the pipelines themselves: the generation defaults (upstream's), the checks
of options, and the refusal of a non-finite sample."""

from __future__ import annotations

import math

import mlx.core as mx

from starflow_mlx.advice import with_cli_message
from starflow_mlx.io.generation_options import check_jacobi

IMAGE_JACOBI = dict(jacobi_block_size=64, jacobi_threshold=0.005, jacobi_max_iter=32)  # upstream's sample.py
VIDEO_DEFAULTS = dict(frames=81, fps=16, aspect_ratio="16:9", cfg=3.5, jacobi=None, jacobi_block_size=32,
                      jacobi_threshold=0.001, jacobi_max_iter=32)  # upstream's video script


class NonFiniteSampleError(ValueError):
    """A sample holds NaN or infinity."""


def check_finite(x: mx.array) -> mx.array:
    """``x``, unless it holds NaN or infinity: then damaged weights (or an overflow in a low-precision dtype)
    made it, and writing it would give a blank image or video instead of an error."""
    if not mx.all(mx.isfinite(x)).item():
        message = ("the model produced NaN or infinite values: its weights may be damaged (convert or download the "
                   "model again), or try ")
        raise with_cli_message(NonFiniteSampleError(message + "loading it with dtype='float32'"),
                               message + "--dtype float32")
    return x


def check_options(seed: int, cfg: float, num_images: int, jacobi_block_size: int, jacobi_threshold: float,
                  jacobi_max_iter: int) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be 0 or more and below 2**63, got {seed}")
    if seed + num_images > 2**63:
        raise ValueError(f"seed {seed} is too large: image i uses seed + i, which must stay below 2**63")
    if not 0 <= cfg < math.inf:  # NaN fails too: it would sample a blank image that cannot be made again
        raise ValueError(f"cfg must be a number 0 or more, got {cfg}")
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    check_jacobi(jacobi_block_size=jacobi_block_size, jacobi_threshold=jacobi_threshold,
                 jacobi_max_iter=jacobi_max_iter)
