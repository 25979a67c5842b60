"""The compute floor of sampling: a run's matrix products alone, timed here.

Every token a sampler evaluates goes through each of its block's linear layers
(attention projections, MLP, input and output projections) once. Timing those
layers alone, at the rows each step feeds them, gives the seconds that the
products of a run cost on this machine's BLAS. Any sampler that evaluates the
same tokens with the same BLAS needs at least that long, whatever its other ops
cost, so the floor over upstream's time bounds the ratio any implementation of
upstream's schedule can reach here.

Upstream's schedule is counted with its own rows: the valid tokens of each
chunk (our padding rows are not), guidance doubling the batch. The text
projection runs once per sample, not per step, and is left out; so are the
attention products, whose shapes change with the cache.
"""

from __future__ import annotations

import time
from collections import Counter

import mlx.core as mx
import mlx.nn as nn


def step_layers(block) -> list[nn.Module]:
    """The linear layers one sampling step of ``block`` runs."""
    return [m for name, m in block.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not name.startswith("proj_txt")]


def _in_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[1]


def step_seconds(block, rows: int, repeats: int = 3) -> float:
    """Fastest time of ``rows`` tokens through every layer of :func:`step_layers`, summed over the layers."""
    total = 0.0
    for layer in step_layers(block):
        x = mx.random.normal((1, rows, _in_features(layer)), key=mx.random.key(0)).astype(block.dtype)
        mx.eval(x, layer(x))  # untimed first run: kernel set-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(layer(x))
            best = min(best, time.perf_counter() - start)
        total += best
    return total


def block_floor(block, steps: Counter) -> float:
    """Seconds of the products of ``steps`` ({rows per step: number of steps}) through ``block``."""
    return sum(count * step_seconds(block, rows) for rows, count in steps.items())
