"""Which linear layers are quantized, and how: the plan recorded in a model's config.

The plan lists every quantized layer explicitly, so loading a quantized folder
rebuilds exactly the layers that were saved and never re-quantizes anything.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import mlx.nn as nn

from starflow_mlx.advice import option_error
from starflow_mlx.config import QUANT_BITS, QUANT_GROUPS
from starflow_mlx.models.quantized_linear import use_row_aware_layers

# Errors in these layers are amplified (they set the flow's scale/shift or read raw inputs),
# so they stay in floating point unless a pattern overrides it.
DEFAULT_KEEP = ("*proj_in", "*proj_out", "*proj_txt", "*shared", "*relative_attention_bias")
SUPPORTED_BITS, SUPPORTED_GROUPS = QUANT_BITS, QUANT_GROUPS


class QuantizationError(ValueError):
    """A quantization request or a quantized folder is invalid."""


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def check_setting(bits: int, group_size: int, name: str = "bits") -> None:
    """``name``: the parameter the user gave the bits as (its option on the command line), for the message."""
    if bits not in SUPPORTED_BITS:
        raise option_error(QuantizationError, name, f" must be 4 or 8, got {bits}")
    if group_size not in SUPPORTED_GROUPS:
        raise option_error(QuantizationError, "group_size", f" must be 32, 64 or 128, got {group_size}")


def plan_quantization(model: nn.Module, bits: int, group_size: int = 64, keep=DEFAULT_KEEP,
                      overrides: dict[str, int] | None = None,
                      block_bits: dict[str, int] | None = None) -> dict[str, Any]:
    """Choose bits per linear layer.

    ``block_bits`` maps glob patterns to the bits that replace ``bits`` there (the deep and
    shallow blocks' own widths): layers in ``keep`` still stay float. ``overrides`` maps glob
    patterns over layer paths to bits (0 keeps the layer in float) and wins over both, kept
    layers included; the last matching pattern wins, e.g. ``{"blocks.5.*": 4, "blocks.[0-4].*": 8}``.
    """
    check_setting(bits, group_size)
    overrides, block_bits = overrides or {}, block_bits or {}
    for pattern, value in {**block_bits, **overrides}.items():
        if value not in (0, *SUPPORTED_BITS):
            raise QuantizationError(f"override {pattern}={value}: bits must be 0 (keep float), 4 or 8")
    layers: dict[str, dict[str, int]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        chosen = bits
        for pattern, value in block_bits.items():
            if fnmatch.fnmatchcase(path, pattern):
                chosen = value
        if _matches(path, keep):
            chosen = 0
        for pattern, value in overrides.items():
            if fnmatch.fnmatchcase(path, pattern):
                chosen = value
        in_dims = module.weight.shape[-1]
        if chosen and in_dims % group_size == 0:
            layers[path] = {"bits": chosen, "group_size": group_size}
    return {"bits": bits, "group_size": group_size, "layers": layers,
            "keep": list(keep), "overrides": dict(overrides), "block_bits": dict(block_bits)}


def apply_quantization(model: nn.Module, spec: dict[str, Any]) -> None:
    """Swap the planned layers for MLX quantized layers (weights are then loaded or quantized)."""
    layers = spec.get("layers")
    if not isinstance(layers, dict):
        raise QuantizationError("quantization record has no 'layers' map: the folder's config.json is damaged")
    known = {path for path, _ in model.named_modules()}
    unknown = sorted(set(layers) - known)
    if unknown:
        raise QuantizationError(f"quantization record names {unknown[0]}, which this model does not have")

    def predicate(path: str, module: nn.Module):
        setting = layers.get(path)
        if setting is None or not hasattr(module, "to_quantized"):
            return False
        return {"bits": int(setting["bits"]), "group_size": int(setting["group_size"])}

    nn.quantize(model, class_predicate=predicate)
    use_row_aware_layers(model)  # many rows on a CPU: through the BLAS (models/quantized_linear.py)


def describe(spec: dict[str, Any]) -> str:
    counts: dict[int, int] = {}
    for setting in spec["layers"].values():
        counts[setting["bits"]] = counts.get(setting["bits"], 0) + 1
    parts = [f"{n} layers at {b}-bit" for b, n in sorted(counts.items())]
    return ", ".join(parts) + f" (group size {spec['group_size']})"

