"""One verification check and its tolerance: how far a Core ML package may be from MLX in float32.

The tolerance is what float16 costs on this model: the same inputs also run
through MLX in float16, and a package may be at most ``FP16_FACTOR`` times as
far from float32 as that, never less than ``FLOOR`` and never more than ``CAP``.
The error model: float16 rounds at 2^-11 (4.9e-4) of a value, and a package's
ops compound that with its depth; MLX float16 measures 5e-4 to 7e-3 on the tiny
and demo packages (1 to 14 roundings' worth). ``FLOOR`` (about 40 roundings)
covers a package whose float16 happens to land closer than MLX's. ``CAP`` is a
tenth of the reference's peak: no rounding model reaches it, while an all-zero
output errs by 1, a negated one by 2 and one scaled by s by |1 - s|, so those
fail however far MLX's own float16 drifts.

A whole clip is checked step by step in the same way (``coreml/clip_residual.py``): MLX maps the package's own
clip back to the noise each step consumed, so the error of each step is one step's float16 error, never a chain's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from starflow_mlx.coreml.builder import ExportError

FLOOR = 2e-2
FP16_FACTOR = 4.0
CAP = 0.1
CHECK_CFG = 1.5  # guidance weight used to check guided packages


class VerificationError(ExportError):
    """The exported packages do not match the manifest or the MLX model."""


@dataclass
class Check:
    package: str
    what: str
    error: float  # vs MLX in float32
    fp16_error: float  # MLX in float16 vs MLX in float32, same inputs

    @property
    def tolerance(self) -> float:
        return min(CAP, max(FLOOR, FP16_FACTOR * self.fp16_error))

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance

    def line(self) -> str:
        return (f"{self.package:<16} {self.what:<47} worst error {self.error:.1e} "
                f"(MLX float16 {self.fp16_error:.1e}, tolerance {self.tolerance:.1e}) {'ok' if self.ok else 'FAILED'}")


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    scale = max(float(np.abs(ref).max()), 1e-12)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / scale)
