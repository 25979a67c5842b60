"""MLX's quantized linear layer, with many rows at once on a CPU taken through a dequantized weight.

MLX's CPU kernel for ``mx.quantized_matmul`` is fast for a few rows (a sequential step: one
token per image, doubled by guidance) but does not use the BLAS: measured on the 2-core x86-64
machine (mlx 0.32.4, MKL; /tmp timing of the demo's 64->256, 256->64 and 64->192 layers), it
was 0.1-1.2x the time of dequantizing the weight and multiplying at 2-8 rows, 2-5x at 32 rows
and 7-450x at 128-2048 rows (a Jacobi chunk, a batch of 16, the denoiser's whole images).
So from ``DEQUANTIZE_ROWS`` rows on, a CPU call dequantizes the weight for that call (a float
copy only while the product runs: the model stays quantized in memory) and lets the BLAS
multiply. GPUs keep MLX's own kernel.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

DEQUANTIZE_ROWS = 16  # the crossover measured above lies between 8 and 32 rows


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        if rows < DEQUANTIZE_ROWS or self.mode != "affine" or mx.default_device().type != mx.DeviceType.cpu:
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
