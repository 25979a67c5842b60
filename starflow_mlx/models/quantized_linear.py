"""MLX's quantized linear layer, with many rows at once on a CPU taken through a dequantized weight.

MLX's CPU kernel for ``mx.quantized_matmul`` is fast for a few rows (a sequential step: one
token per image, doubled by guidance) but does not use the BLAS, and its time grows with every
row. ``python -m starflow_mlx.benchmarks.quantized_speed --products`` (the demo's 64->256 layer,
CPU time, 2-core x86-64 with MKL, load average 11) measured it against dequantizing the weight
and multiplying: 8-bit 0.04 against 0.22 ms at 2 rows, 0.21 against 0.09 at 16, 7.0 against
0.40 at 512; 4-bit 0.26 against 0.45 at 16, 0.48 against 0.30 at 32, 7.0 against 0.32 at 512.
So from ``DEQUANTIZE_ROWS[bits]`` rows on (a batch's sequential step, a Jacobi chunk, the
denoising step's whole images), a CPU call dequantizes the weight for that call (a float copy
only while the product runs: the model stays quantized in memory) and lets the BLAS multiply.
GPUs keep MLX's own kernel.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

DEQUANTIZE_ROWS = {8: 16, 4: 32}  # by bits: where dequantizing started to win above; other widths, 32
OTHER_BITS_ROWS = 32


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        many = rows >= DEQUANTIZE_ROWS.get(self.bits, OTHER_BITS_ROWS)
        if not many or self.mode != "affine" or mx.default_device().type != mx.DeviceType.cpu:
            return super().__call__(x)
        weight = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                               bits=self.bits)
        x = x @ weight.astype(x.dtype).T
        return x + self["bias"] if "bias" in self else x


def use_row_aware_layers(model: nn.Module) -> None:
    """Make every MLX ``QuantizedLinear`` of ``model`` this subclass (same parameters, no copy)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear  # only __call__ differs: nothing to rebuild or requantize
