"""The memory-bandwidth roofline of sampling: how close a step comes to reading the weights at full speed.

One sampling step (a token of the sequential sampler, an iteration of a Jacobi
chunk) reads every weight of its block once, whatever the batch, so a block
needs at least ``param_bytes * steps / bandwidth`` seconds. The bandwidth is
measured here, with MLX on its default device, by reducing and copying a large
array; the achieved fraction is that bound over the measured block time.
KV-cache and activation traffic come on top and are not counted.

On a CPU device MLX's own reduction and copy kernels run on one core and stop
well short of what the memory delivers, while the weights of a step are read by
the BLAS; so there the same sum and copy also run through numpy's SIMD loops,
and the bound uses the fastest of the four.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5) -> dict:
    """Best of a full reduction (bytes read) and a copy (bytes read + written), in GB/s (1e9 bytes).

    Each is timed ``repeats`` times after an untimed first run (page faults,
    kernel compilation) and the fastest kept: the attainable bandwidth, not what
    a busy machine left over.
    """
    if megabytes < 1:
        raise ValueError("the bandwidth array must be at least 1 MB")
    count = megabytes * 2**20 // 4
    result = _mlx_passes(count, repeats)
    mx.clear_cache()
    if mx.default_device() == mx.cpu:
        result.update(_numpy_passes(count, repeats))
    return {"gb_per_s": max(result.values()), **result, "array_mb": megabytes, "device": str(mx.default_device())}


def _mlx_passes(count: int, repeats: int) -> dict:
    data = mx.ones((count,), dtype=mx.float32)
    mx.eval(data)
    return {"sum_gb_per_s": data.nbytes / _best(lambda: mx.eval(mx.sum(data)), repeats) / 1e9,
            "copy_gb_per_s": 2 * data.nbytes / _best(lambda: mx.eval(data * 1.5), repeats) / 1e9}


def _numpy_passes(count: int, repeats: int) -> dict:
    data = np.ones(count, dtype=np.float32)
    out = np.empty_like(data)
    return {"numpy_sum_gb_per_s": data.nbytes / _best(data.sum, repeats) / 1e9,
            "numpy_copy_gb_per_s": 2 * data.nbytes / _best(lambda: np.copyto(out, data), repeats) / 1e9}


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def parameter_bytes(module) -> int:
    """Bytes of every parameter of ``module`` (packed integers and scales for quantized layers)."""
    return sum(a.nbytes for _, a in tree_flatten(module.parameters()))


def roofline(bytes_per_step: int, steps: int, seconds: float, gb_per_s: float) -> dict:
    """The weight-read bound of ``steps`` steps and the fraction of it a run of ``seconds`` achieved."""
    bound = bytes_per_step * steps / (gb_per_s * 1e9)
    return {
        "bytes_per_step": bytes_per_step,
        "steps": steps,
        "bound_seconds": bound,
        "achieved_gb_per_s": bytes_per_step * steps / seconds / 1e9 if seconds > 0 else 0.0,
        "bandwidth_fraction": bound / seconds if seconds > 0 else 0.0,
    }
