"""Typed, fully resolved model configuration, stored as ``config.json`` in a model folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is missing, unreadable or inconsistent."""


@dataclass
class FlowConfig:
    """Everything the flow needs at inference, with every default already applied.

    Sizes are in latent tokens: ``latent_size`` is ``img_size / vae_factor``.
    """

    in_channels: int
    channels: int
    layers_per_block: list[int]
    latent_size: int
    patch_size: int = 1
    head_dim: int = 64
    num_heads: int | None = None
    num_kv_heads: int | None = None
    top_block_channels: int | None = None
    pt_seq_len: int | None = None
    txt_size: int = 0
    txt_dim: int = 0
    sos: bool = False
    seq_order: str = "R2L"
    use_softplus: bool = False
    cond_top_only: bool = False
    use_final_norm: bool = False
    soft_clip: float = 0.0
    use_swiglu: bool = False
    use_bias: bool = True
    use_qk_norm: bool = False
    use_post_norm: bool = False
    norm_type: str = "layer_norm"
    expansion: float = 4.0
    temporal_causal: int = 0
    shallow_block_local: bool = False
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    denoiser_window: int | None = None
    local_attn_window: int | None = None
    # Everything below describes how the model is used rather than its shape.
    noise_std: float = 0.3
    cfg: float = 0.0
    text_encoder: str | None = None
    vae: str | None = None
    vae_factor: int = 8
    num_frames: int = 0
    fps_cond: bool = False
    cond_noise_level: bool = False
    mix_aspect: bool = False
    vae_temporal_scale: float | None = None
    num_classes: int = 0
    dtype: str = "float32"
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers_per_block = [int(v) for v in self.layers_per_block]
        if self.pt_seq_len is None:
            self.pt_seq_len = self.latent_size // self.patch_size
        if self.seq_order not in ("L2R", "R2L"):
            raise ConfigError(f"seq_order must be L2R or R2L, got {self.seq_order!r}")
        if self.norm_type not in ("layer_norm", "rms_norm", "none"):
            raise ConfigError(f"norm_type must be layer_norm, rms_norm or none, got {self.norm_type!r}")
        if self.channels % self.head_dim:
            raise ConfigError(f"channels {self.channels} is not a multiple of head_dim {self.head_dim}")
        if self.txt_size > 0 and self.head_dim // 2 <= 8:
            raise ConfigError("models with text need head_dim > 16 (8 rotary dims are reserved for text/time)")
        if self.cond_top_only and self.txt_size <= 0:
            raise ConfigError("cond_top_only needs txt_size > 0")
        if self.shallow_block_local and not self.cond_top_only:
            raise ConfigError("shallow_block_local needs cond_top_only")
        if self.temporal_causal and self.seq_order != "L2R":
            raise ConfigError("temporal_causal needs seq_order L2R")

    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block)

    @property
    def token_channels(self) -> int:
        """Channels of one flow token: latent channels times the patch area."""
        return self.in_channels * self.patch_size**2

    @property
    def is_video(self) -> bool:
        return self.num_frames > 0

    def block_channels(self, index: int) -> int:
        if index == self.num_blocks - 1 and self.top_block_channels:
            return self.top_block_channels
        return self.channels

    def block_heads(self, index: int) -> int:
        """Query heads of block ``index`` (the wider top block gets more heads)."""
        if index == self.num_blocks - 1 and self.top_block_channels and self.top_block_channels != self.channels:
            if self.num_heads is None:
                return self.top_block_channels // self.head_dim
        return self.num_heads if self.num_heads is not None else self.channels // self.head_dim

    def block_kv_heads(self, index: int) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.block_heads(index)

    def block_sees_text(self, index: int) -> bool:
        if self.txt_dim <= 0:
            return False
        return index == self.num_blocks - 1 or not self.cond_top_only

    def block_flips(self, index: int) -> bool:
        """Whether block ``index`` reverses token order (in-frame for temporal-causal video)."""
        n = self.num_blocks
        top = index == n - 1
        if self.seq_order == "L2R":
            return bool(n % 2) if top else bool((index + 1) % 2)
        return bool((n - 1) % 2) if top else bool(index % 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FlowConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}: is this a starflow-mlx config.json?")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"incomplete config: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FlowConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} not found: expected the config.json of a converted model folder")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data)
