"""Quantize a model folder: group-wise affine INT8 / 4-bit weights for the linear layers.

The flow's plan (which layers, how many bits) is written into its config, so
loading rebuilds the same quantized layers and never re-quantizes. With a full
model folder the T5 encoder is quantized too (8-bit by default); the VAE is
copied unchanged.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from starflow_mlx.advice import option_error
from starflow_mlx.config import FlowConfig
from starflow_mlx.io.memory import check_memory
from starflow_mlx.io.model_folder import MANIFEST, local_model
from starflow_mlx.quantize.policy import (DEFAULT_KEEP, SUPPORTED_BITS, QuantizationError, apply_quantization,
                                          check_setting, describe, plan_quantization)
from starflow_mlx.io.staging import check_output, staged_folder
from starflow_mlx.io.weights import build_flow, cast_floats

FLOW_FILES = ("config.json", "model.safetensors")


def block_bits(num_blocks: int, deep_bits: int | None, shallow_bits: int | None) -> dict[str, int]:
    """Patterns giving the deep block and the shallow blocks their own bit widths (kept layers stay float)."""
    overrides: dict[str, int] = {}
    if shallow_bits is not None:
        for i in range(num_blocks - 1):
            overrides[f"blocks.{i}.*"] = shallow_bits
    if deep_bits is not None:
        overrides[f"blocks.{num_blocks - 1}.*"] = deep_bits
    return overrides


def parse_overrides(items: list[str]) -> dict[str, int]:
    """``PATTERN=BITS`` strings (BITS 0 keeps the layers in float16)."""
    out: dict[str, int] = {}
    for item in items:
        pattern, sep, bits = item.partition("=")
        if not sep or not pattern or not bits.isdigit():
            raise QuantizationError(f"--override {item!r}: expected PATTERN=BITS, e.g. 'blocks.5.*=4'")
        out[pattern] = int(bits)
    return out


def check_overrides_match(model, overrides: dict[str, int]) -> None:
    """Refuse a pattern that names nothing in the model (a typo would otherwise change nothing, silently)."""
    paths = [path for path, _ in model.named_modules() if path]
    layers = [path for path, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Embedding))]
    for pattern in overrides:
        # "blocks.0.*" of a parameterless (identity) block names the block itself: nothing to quantize, no error.
        if not any(fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path + ".", pattern) for path in paths):
            example = layers[len(layers) // 2] if layers else "none"
            raise option_error(QuantizationError, "overrides", f" {pattern!r} matches no layer of this model "
                               f"(layers are named like {example})", "--override")


def quantize_flow(folder: str | Path, bits: int, group_size: int = 64, overrides: dict[str, int] | None = None,
                  keep=DEFAULT_KEEP, blocks: dict[str, int] | None = None):
    """Load a float flow folder and quantize it in memory; returns the model and its plan.

    ``blocks``: per-block bit widths from :func:`block_bits`; ``overrides`` win over them and over ``keep``.
    """
    check_memory(Path(folder), FlowConfig.load(Path(folder) / "config.json"))  # before the model is built
    flow = build_flow(Path(folder))
    cast_floats(flow, mx.float16)
    if flow.config.quantization:
        raise QuantizationError(f"{folder} is already quantized ({describe(flow.config.quantization)}): "
                                "quantize the float model instead")
    check_overrides_match(flow, overrides or {})
    plan = plan_quantization(flow, bits, group_size, keep, overrides, blocks)
    apply_quantization(flow, plan)
    flow.config.quantization = plan
    mx.eval(flow.parameters())
    return flow, plan


def save_flow(flow, folder: Path) -> None:
    flow.config.save(folder / "config.json")
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(flow.parameters())),
                        metadata={"format": "mlx"})


def _quantize_text_encoder(src: Path, dst: Path, bits: int, group_size: int) -> None:
    from starflow_mlx.io.text_encoder import quantize_text_encoder

    quantize_text_encoder(src, dst, bits=bits, group_size=group_size)


def write_quantized(src: Path, staging: Path, bits: int, group_size: int = 64, overrides=None,
                    text_bits: int | None = 8, blocks: dict[str, int] | None = None) -> str:
    """Write the quantized copy of the folder ``src`` into the existing (staging) folder ``staging``."""
    flow, plan = quantize_flow(src, bits, group_size, overrides, blocks=blocks)
    save_flow(flow, staging)
    summary = describe(plan)
    manifest = src / MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        for entry in sorted(src.iterdir()):
            if entry.name in FLOW_FILES or entry.name == MANIFEST or entry.name.startswith("."):
                continue
            if entry.is_dir() and entry.name == data.get("text_encoder") and text_bits:
                _quantize_text_encoder(entry, staging / entry.name, text_bits, group_size)
                summary += f"; text encoder {text_bits}-bit"
            elif entry.is_dir():
                shutil.copytree(entry, staging / entry.name)
            else:
                shutil.copy2(entry, staging / entry.name)
        shutil.copy2(manifest, staging / MANIFEST)
    return summary


def quantize_model_folder(src: str | Path, output: str | Path, bits: int, group_size: int = 64,
                          overrides: dict[str, int] | None = None, text_bits: int | None = 8,
                          force: bool = False, blocks: dict[str, int] | None = None) -> str:
    """Write a quantized copy of ``src`` (a folder or a built-in name) to ``output``; returns a one-line summary.

    A Hugging Face repo id is resolved first (``starflow_mlx.io.resolve.resolve_model``): conversion, which
    quantizes too, sits below name resolution.
    """

    check_setting(bits, group_size)
    if text_bits not in (None, 0, *SUPPORTED_BITS):  # before the flow is quantized, named by its own option
        raise option_error(QuantizationError, "text_bits", f" must be 0 (keep float16), 4 or 8, got {text_bits}")
    check_output(output, force, QuantizationError)
    folder = local_model(src)
    if folder is None:
        raise QuantizationError(f"{src} is not a model folder or a built-in model: pass a folder, or resolve a "
                                "repo id first with starflow_mlx.io.resolve.resolve_model")
    src = folder
    with staged_folder(output, force, QuantizationError) as staging:
        return write_quantized(src, staging, bits, group_size, overrides, text_bits, blocks)
