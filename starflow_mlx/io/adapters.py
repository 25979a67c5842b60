"""LoRA adapter folders: written, read, checked against their base, and loaded, one or several at once.

Several adapters on one flow, each with its own scale, add up their updates. A layer several adapters target becomes one :class:`LoRALinear` whose A stacks theirs
(rows) and whose B stacks theirs times their scales (columns), with scale 1:
``[s1 B1, s2 B2] @ [A1; A2] = s1 B1 A1 + s2 B2 A2``. It runs and fuses like any adapter;
a layer only some adapters target stacks only theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx.config import FlowConfig
from starflow_mlx.jsonconfig import ConfigError
from starflow_mlx.io.model_folder import model_record
from starflow_mlx.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, AdapterError, LoRALinear, _get,
                                      _set, apply_lora, base_identity, check_scale, lora_layers, lora_weights)
from starflow_mlx.io.weights import ModelLoadError, load_weights_strict


def as_adapter_list(lora, lora_scale) -> tuple[list, list[float]]:
    """(folders, scales) from one folder or a list, and one scale, a list of one (for every adapter) or one each."""
    folders = [] if lora is None else list(lora) if isinstance(lora, (list, tuple)) else [lora]
    scales = list(lora_scale) if isinstance(lora_scale, (list, tuple)) else [lora_scale]
    if not folders:
        if scales not in ([], [1.0]):
            raise AdapterError("lora_scale is given without a LoRA adapter: add --lora ADAPTER")
        return [], []
    if len(scales) in (0, 1):
        scales = [scales[0] if scales else 1.0] * len(folders)
    if len(scales) != len(folders):
        raise AdapterError(f"{len(folders)} LoRA adapters but {len(scales)} scales: give one --lora-scale for all "
                           "or one per --lora, in the same order")
    return folders, [float(s) for s in scales]


def adapter_options(lora: Sequence[str | Path] | None, lora_scale: Sequence[float] | None
                    ) -> tuple[str | list[str] | None, float | list[float]]:
    """Repeated ``--lora`` / ``--lora-scale`` options as a job records them: one adapter as a folder and a scale,
    several as lists (checked by :func:`as_adapter_list`)."""
    folders, scales = as_adapter_list([str(p) for p in lora or []], list(lora_scale or [1.0]))
    if len(folders) == 1:
        return folders[0], scales[0]
    return (folders or None), (scales or 1.0)


def adapter_record(lora: str | list[str] | None) -> str | list[str] | None:
    """How a file's metadata names the adapter(s): local folders by absolute path."""
    return None if lora is None else model_record(lora) if isinstance(lora, str) else [model_record(p) for p in lora]


def load_adapters(model: nn.Module, folders: Sequence[str | Path], scales: Sequence[float]) -> list[AdapterConfig]:
    """Add every adapter (checked and loaded as :func:`load_adapter` does) to ``model``, summed."""
    if len(folders) == 1:
        return [load_adapter(model, folders[0], scales[0])]
    parts: dict[str, list[tuple[mx.array, mx.array]]] = {}
    configs = []
    for folder, scale in zip(folders, scales):
        configs.append(load_adapter(model, folder, scale))
        for path, layer in lora_layers(model):  # take this adapter's matrices out; the next one finds plain linears
            parts.setdefault(path, []).append((layer.lora_a, layer.scale * layer.lora_b))
            _set(model, path, layer.base)
    for path, pieces in parts.items():
        layer = LoRALinear(_get(model, path), sum(a.shape[0] for a, _ in pieces), 1.0)
        layer.lora_a = mx.concatenate([a for a, _ in pieces], axis=0)
        layer.lora_b = mx.concatenate([b for _, b in pieces], axis=1)
        _set(model, path, layer)
    model.freeze()
    mx.eval(model.parameters())
    return configs


def save_adapter(model: nn.Module, config: AdapterConfig, folder: Path) -> None:
    """Write ``adapter.safetensors`` and ``adapter.json`` into an existing (staging) folder."""
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), lora_weights(model), metadata={"format": "mlx"})
    config.save(folder / ADAPTER_CONFIG)


def read_adapter_config(folder: str | Path) -> AdapterConfig:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"LoRA adapter {folder} not found: pass the folder starflow train --lora wrote")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder} has no {name}: it is not a complete LoRA adapter (train it again)")
    try:
        return AdapterConfig.load(folder / ADAPTER_CONFIG)
    except ConfigError as exc:  # the config's own checks (of its targets) cannot know the file: name it here
        message = str(exc).removeprefix(f"{AdapterConfig.LABEL}: ")
        raise AdapterError(message if message == str(exc) else f"{folder / ADAPTER_CONFIG}: {message}") from None


def check_base(config: AdapterConfig, flow_config: FlowConfig, where: str) -> None:
    digest, shape = base_identity(flow_config)
    if config.base_hash != digest:
        raise AdapterError(f"LoRA adapter {where} was trained for another base model ({config.base_shape or 'unknown'}; "
                           f"this one: {shape}): load it with the model it was made for")


def check_adapter(folder: str | Path, flow_config: FlowConfig, scale: float = 1.0) -> AdapterConfig:
    """The adapter's config, once it is known to fit a model of ``flow_config`` (before any weights are read)."""
    check_scale(scale)
    config = read_adapter_config(folder)
    check_base(config, flow_config, str(folder))
    return config


def load_adapter(model: nn.Module, folder: str | Path, scale: float = 1.0) -> AdapterConfig:
    """Add the adapter in ``folder`` to ``model`` (a loaded flow), its update multiplied by ``scale``."""
    folder = Path(folder).expanduser()
    config = check_adapter(folder, model.config, scale)
    apply_lora(model, config.targets, config.rank, config.scale * scale)
    try:
        load_weights_strict(model, folder / ADAPTER_WEIGHTS, only=lora_weights(model))
    except ModelLoadError as exc:
        raise AdapterError(str(exc).replace("config.json", ADAPTER_CONFIG)) from None
    mx.eval(model.parameters())
    return config
