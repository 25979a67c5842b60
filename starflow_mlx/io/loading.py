"""Load a flow by name (a converted folder, a built-in model, or a Hugging Face repo id) into an MLX model."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from starflow_mlx.config import ConfigError, FlowConfig
from starflow_mlx.io.adapters import check_adapter
from starflow_mlx.io.adapters import as_adapter_list, load_adapters
from starflow_mlx.models.starflow import STARFlow
from starflow_mlx.io.resolve import resolve_model

# The weight-reading layer's names, importable from here as before.
from starflow_mlx.io.weights import (DTYPES, ModelLoadError, auto_dtype, build_flow, cast_floats,  # noqa: F401
                                  check_weight_bytes, load_weights_strict, parse_dtype, read_config)


def load_flow(path: str | Path, dtype: str | None = None, lora: str | Path | list | None = None,
              lora_scale: float | list[float] = 1.0, layers: range | None = None) -> STARFlow:
    """Load the flow of a model folder (or 'demo', or a repo id).

    ``dtype`` casts the float weights; by default :func:`auto_dtype` picks per device. ``lora`` adds a
    LoRA adapter folder (``starflow train --lora``), its update multiplied by ``lora_scale``, or a list of
    them with a scale each (their updates add up, :mod:`starflow_mlx.io.adapters`). ``layers``
    keeps only those layers of the deep block, and reads only their weights (one rank's share under
    pipeline parallelism, :mod:`starflow_mlx.io.distributed`).
    """
    try:
        folder = resolve_model(path)
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    config = read_config(FlowConfig, folder)
    adapters, scales = as_adapter_list(lora, lora_scale)
    for adapter, scale in zip(adapters, scales):  # a wrong or broken adapter is refused before the base weights are read
        check_adapter(adapter, config, scale)
    model = build_flow(folder, layers)
    if adapters:
        load_adapters(model, adapters, scales)
    target = parse_dtype(dtype) if dtype is not None else auto_dtype(bool(config.quantization))
    if target is not None:
        cast_floats(model, target)
    mx.eval(model.parameters())
    model.eval()
    return model
