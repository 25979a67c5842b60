"""Which sampler ``jacobi=None`` ("auto") runs: the one measured to be faster on the device.

The rule, and what it rests on:

- CPU: sequential. MLX's CPU backend runs one op at a time, so Jacobi's extra
  token evaluations (3-12 iterations of a whole chunk per chunk) cost time
  one-for-one. Measured on a 2-core x86-64 Linux machine with MKL:
  ``starflow generate 7 --model demo -n 16`` took 1.4-1.7 s sequential against
  3.9-4.7 s Jacobi, and ``starflow bench --config small`` shows the same order
  (benchmarks/README.md).
- GPU (Metal, CUDA): Jacobi, when the model has a start-of-sequence token
  (Jacobi needs one). A GPU runs a chunk of tokens in about the time of one, so
  fewer host round-trips win; this is upstream's own setting for its GPUs. It
  has not been timed with MLX on a GPU yet: ``starflow bench`` shows the choice
  next to both timings so it can be checked on any machine.
"""

from __future__ import annotations

import mlx.core as mx


def choose_jacobi(config, device: mx.Device | None = None) -> bool:
    """True when Jacobi is the faster sampler for a model with ``config`` on ``device``."""
    device = mx.default_device() if device is None else device
    return bool(config.sos) and device.type != mx.DeviceType.cpu


def resolve_jacobi(jacobi: bool | None, config, device: mx.Device | None = None) -> bool:
    """An explicit choice as given; ``None`` (auto) by :func:`choose_jacobi`."""
    return choose_jacobi(config, device) if jacobi is None else bool(jacobi)


def choose_pipeline(config, device: mx.Device | None = None) -> bool:
    """True when pipelining deep and shallow blocks over video frames pays off on ``device``."""
    return True


def resolve_pipeline(pipeline: bool | None, config, device: mx.Device | None = None) -> bool:
    """An explicit choice as given; ``None`` (auto) by :func:`choose_pipeline`."""
    return choose_pipeline(config, device) if pipeline is None else bool(pipeline)
