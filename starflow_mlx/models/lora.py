"""LoRA for the flow: low-rank updates of the attention and MLP linears, their adapter files, and fusing.

A LoRA layer computes ``base(x) + scale * (x A^T) B^T`` with A (rank, in) and B (out, rank),
so it adds ``scale * B @ A`` to the base weight (``nn.Linear`` layout). B starts at zero: a
fresh adapter leaves the model exactly as it was. ``scale`` is ``alpha / rank`` times the
user's ``lora_scale``. The base may be quantized (QLoRA): it is only read.

An adapter folder holds ``adapter.safetensors`` (the A and B matrices, nothing else) and
``adapter.json`` (:class:`AdapterConfig`): rank, alpha, the layers it targets, and the identity
of the base model it was trained on (a hash of the base's architecture, so a float base and its
quantized copy share it; an adapter for another model shape is refused).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from starflow_mlx.advice import option_error
from starflow_mlx.config import FlowConfig
from starflow_mlx.jsonconfig import ConfigError, JSONConfig

ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
BLOCK_CHOICES = ("deep", "shallow", "all")
MAX_RANK = 4096
# The linears of a transformer layer that LoRA adapts (GELU MLP as main.0 / main.2, or SwiGLU).
_TARGET = re.compile(r"blocks\.(\d+)\.attn_blocks\.\d+\.(attention\.(qkv|proj)|mlp\.(main\.[02]|gate_proj|up_proj|down_proj))")
# How a model is stored or sampled by default, not what it computes: an adapter fits a float model and its
# quantized copy alike.
_NOT_IDENTITY = ("dtype", "quantization", "cfg", "extra")


ADAPTER_FORMAT = 1  # the adapter.json layout; a reader refuses any other


class AdapterError(ValueError):
    """A LoRA adapter is missing, damaged, or made for another model."""


@dataclass
class AdapterConfig(JSONConfig):
    LABEL = "LoRA adapter config"

    rank: int = field(metadata={"min": 1, "max": MAX_RANK})
    alpha: float = field(metadata={"min": 0, "max": 1e6})
    targets: list[str] = field(metadata={"max_len": 1 << 16})
    base_hash: str = field(metadata={"max_len": 64})
    blocks: str = field(default="deep", metadata={"choices": BLOCK_CHOICES})
    base_shape: str = field(default="", metadata={"max_len": 1000})  # for messages: "channels 64, layers [2, 2, 4]"
    source: dict[str, Any] = field(default_factory=dict)  # how it was trained (base name, data, steps, bits/dim)
    format: int = ADAPTER_FORMAT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format != ADAPTER_FORMAT:  # a later layout read as this one would load the wrong matrices silently
            raise ConfigError(f"{self.LABEL}: format {self.format!r} is not the format {ADAPTER_FORMAT} this "
                              f"starflow-mlx reads: update starflow-mlx, or train the adapter again with this one")
        bad = [t for t in self.targets if not _TARGET.fullmatch(t)]
        if bad:
            raise ConfigError(f"{self.LABEL}: target {bad[0][:80]!r} is not an attention or MLP linear of a flow")
        if not self.targets:
            raise ConfigError(f"{self.LABEL}: targets is empty: the adapter changes nothing")
        twice = [t for t, n in Counter(self.targets).items() if n > 1]  # else refused later as "not a linear layer"
        if twice:
            raise ConfigError(f"{self.LABEL}: target {twice[0][:80]!r} is listed more than once")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_rank(rank: int, alpha: float | None = None) -> None:
    if not 1 <= rank <= MAX_RANK:
        raise option_error(AdapterError, "rank", f" must be between 1 and {MAX_RANK}, got {rank}")
    if alpha is not None and not 0 <= alpha < math.inf:
        raise option_error(AdapterError, "alpha", f" must be a number 0 or more, got {alpha}")


def check_blocks(blocks: str) -> None:
    if blocks not in BLOCK_CHOICES:
        raise option_error(AdapterError, "blocks", f" must be {', '.join(BLOCK_CHOICES[:-1])} or {BLOCK_CHOICES[-1]}, got {blocks!r}",
                           "--lora-blocks")


def check_scale(scale: float) -> None:
    if not -1e3 <= scale <= 1e3:  # NaN fails too
        raise option_error(AdapterError, "lora_scale", f" must be a number between -1000 and 1000, got {scale}")


def base_identity(config: FlowConfig) -> tuple[str, str]:
    """(hash, short description) of what a base model computes, ignoring how it is stored."""
    arch = {k: v for k, v in config.to_dict().items() if k not in _NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    shape = f"channels {config.channels}, layers {list(config.layers_per_block)}, {config.latent_size}x{config.latent_size}"
    return digest, shape


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a float or quantized linear layer."""
    out_dims, packed = layer.weight.shape
    return out_dims, packed * 32 // layer.bits if isinstance(layer, nn.QuantizedLinear) else packed


class LoRALinear(nn.Module):
    """``base(x) + scale * (x A^T) B^T``; only ``lora_a`` and ``lora_b`` are meant to train."""

    def __init__(self, base: nn.Module, rank: int, scale: float):
        super().__init__()
        out_dims, in_dims = linear_dims(base)
        self.base = base
        self.scale = scale
        bound = 1.0 / math.sqrt(in_dims)  # nn.Linear's own initialisation for A
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims))
        self.lora_b = mx.zeros((out_dims, rank))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        update = (x.astype(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return y + (self.scale * update).astype(y.dtype)

    def delta(self) -> mx.array:
        """What fusing adds to the base weight: ``scale * B @ A`` (out, in), float32."""
        return self.scale * (self.lora_b.astype(mx.float32) @ self.lora_a.astype(mx.float32))

    def fused(self) -> nn.Module:
        """The base layer with the update added (a quantized base is re-quantized with its own settings)."""
        base = self.base
        quantized = isinstance(base, nn.QuantizedLinear)
        if quantized:
            weight = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits)
            dtype = base.scales.dtype
        else:
            weight, dtype = base.weight, base.weight.dtype
        out_dims, in_dims = weight.shape
        layer = nn.Linear(in_dims, out_dims, bias="bias" in base)
        layer.weight = (weight.astype(mx.float32) + self.delta()).astype(dtype)
        if "bias" in base:
            layer.bias = base.bias
        return layer.to_quantized(group_size=base.group_size, bits=base.bits) if quantized else layer


def target_paths(model: nn.Module, blocks: str) -> list[str]:
    """The attention and MLP linears of the deep block (``deep``), of the others (``shallow``: frame-local in a
    video model) or of every block (``all``)."""
    check_blocks(blocks)
    deep = str(len(model.blocks) - 1)
    return [path for path, _ in model.named_modules()
            if (m := _TARGET.fullmatch(path)) and (blocks == "all" or (m.group(1) == deep) == (blocks == "deep"))]


def _parent(model: nn.Module, path: str) -> tuple[Any, str]:
    """The container holding the module at ``path`` (a module or a list) and its key in it."""
    *parts, last = path.split(".")
    node: Any = model
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, last


def _get(model: nn.Module, path: str) -> Any:
    """The module at ``path``, or None where the model has nothing there."""
    try:
        node, key = _parent(model, path)
        return node[int(key)] if isinstance(node, list) else node.get(key)
    except (KeyError, IndexError, ValueError, AttributeError):
        return None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    node, key = _parent(model, path)
    if isinstance(node, list):
        node[int(key)] = module
    else:
        setattr(node, key, module)


def apply_lora(model: nn.Module, targets: list[str], rank: int, scale: float) -> None:
    """Wrap each target linear in a :class:`LoRALinear`; freeze everything but the LoRA matrices."""
    for path in targets:
        layer = _get(model, path)
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise AdapterError(f"the adapter targets {path}, which this model does not have as a linear layer")
        _set(model, path, LoRALinear(layer, rank, scale))
    model.freeze()
    for path in targets:
        _get(model, path).unfreeze(keys=["lora_a", "lora_b"], recurse=False)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_weights(model: nn.Module) -> dict[str, mx.array]:
    """Just the A and B matrices, by parameter name."""
    return {f"{path}.{name}": getattr(m, name) for path, m in lora_layers(model) for name in ("lora_a", "lora_b")}


def fuse_lora(model: nn.Module) -> None:
    """Replace every LoRA layer by its base with the update added: an ordinary model again."""
    for path, layer in lora_layers(model):
        _set(model, path, layer.fused())
    model.unfreeze()


def trainable_count(model: nn.Module) -> int:
    return sum(a.size for _, a in tree_flatten(model.trainable_parameters()))
