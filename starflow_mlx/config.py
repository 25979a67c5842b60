"""Typed, fully resolved model configuration, stored as ``config.json`` in a model folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starflow_mlx.jsonconfig import ConfigError, JSONConfig

__all__ = ["ConfigError", "FlowConfig"]

POSITIVE = {"min": 1}
# Upper bounds far above any released model (3B: 3072 channels, 7 blocks, 30 layers), so a hostile config
# is refused before anything is built rather than by running out of memory.
WIDTH = {"min": 1, "max": 1 << 16}
SMALL = {"min": 1, "max": 1024}
TOKENS = {"min": 0, "max": 1 << 16}
MAX_LAYERS = 1024  # in all blocks together
QUANT_BITS = (4, 8)
QUANT_GROUPS = (32, 64, 128)


@dataclass
class LayerQuantization(JSONConfig):
    LABEL = "quantized layer"

    bits: int = field(metadata={"choices": QUANT_BITS})
    group_size: int = field(metadata={"choices": QUANT_GROUPS})


@dataclass
class QuantizationRecord(JSONConfig):
    """The ``quantization`` entry of a config.json: every quantized layer with its bits and group size."""

    LABEL = "quantization record"

    bits: int = field(metadata={"choices": QUANT_BITS})
    group_size: int = field(metadata={"choices": QUANT_GROUPS})
    layers: dict[str, LayerQuantization] = field(default_factory=dict, metadata={"max_len": 1 << 16})
    keep: list[str] = field(default_factory=list, metadata={"max_len": 1024})
    overrides: dict[str, int] = field(default_factory=dict, metadata={"max_len": 1024})
    block_bits: dict[str, int] = field(default_factory=dict, metadata={"max_len": 1024})


def check_quantization(record: dict[str, Any] | None, where: str) -> None:
    """Refuse a damaged quantization record (``group_size: 0`` would crash MLX) before any layer is built."""
    if record is not None:
        QuantizationRecord.from_dict(record, f"{where}: quantization")


@dataclass
class FlowConfig(JSONConfig):
    """Everything the flow needs at inference, with every default already applied.

    Sizes are in latent tokens: ``latent_size`` is ``img_size / vae_factor``.
    """

    LABEL = "model config"

    in_channels: int = field(metadata=SMALL)
    channels: int = field(metadata=WIDTH)
    layers_per_block: list[int] = field(metadata={"min": 0, "max": MAX_LAYERS, "max_len": 64})
    latent_size: int = field(metadata={"min": 1, "max": 4096})
    patch_size: int = field(default=1, metadata={"min": 1, "max": 64})
    head_dim: int = field(default=64, metadata=SMALL)
    num_heads: int | None = field(default=None, metadata=SMALL)
    num_kv_heads: int | None = field(default=None, metadata=SMALL)
    top_block_channels: int | None = field(default=None, metadata=WIDTH)
    pt_seq_len: int | None = field(default=None, metadata={"min": 1, "max": 1 << 16})
    txt_size: int = field(default=0, metadata=TOKENS)
    txt_dim: int = field(default=0, metadata=TOKENS)
    sos: bool = False
    seq_order: str = "R2L"
    use_softplus: bool = False
    cond_top_only: bool = False
    use_final_norm: bool = False
    soft_clip: float = field(default=0.0, metadata={"min": 0, "max": 1e4})
    use_swiglu: bool = False
    use_bias: bool = True
    use_qk_norm: bool = False
    use_post_norm: bool = False
    norm_type: str = "layer_norm"
    expansion: float = field(default=4.0, metadata={"min": 0.0625, "max": 64})
    temporal_causal: int = field(default=0, metadata={"min": 0, "max": 4096})
    shallow_block_local: bool = False
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    denoiser_window: int | None = field(default=None, metadata={"min": 1, "max": 1 << 16})
    local_attn_window: int | None = field(default=None, metadata={"min": 1, "max": 1 << 16})
    # Everything below describes how the model is used rather than its shape.
    noise_std: float = field(default=0.3, metadata={"min": 0, "max": 100})
    cfg: float = field(default=0.0, metadata={"min": 0, "max": 1000})
    text_encoder: str | None = None
    vae: str | None = None
    vae_factor: int = field(default=8, metadata={"min": 1, "max": 64})
    num_frames: int = field(default=0, metadata={"min": 0, "max": 4096})
    fps_cond: bool = False
    cond_noise_level: bool = False
    mix_aspect: bool = False
    vae_temporal_scale: float | None = field(default=None, metadata={"min": 1e-3, "max": 1e3})
    num_classes: int = field(default=0, metadata={"min": 0, "max": 1 << 16})
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float16", "bfloat16")})
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers_per_block:
            raise ConfigError("layers_per_block is empty: a flow needs at least one block")
        if self.layers_per_block[-1] == 0:  # only shallow blocks may be skipped: the deep block holds the cache
            raise ConfigError("layers_per_block ends in 0: the deep (last) block needs at least one layer")
        if sum(self.layers_per_block) > MAX_LAYERS:
            raise ConfigError(f"layers_per_block adds up to {sum(self.layers_per_block)} layers, "
                              f"more than {MAX_LAYERS}: not a real STARFlow model")
        check_quantization(self.quantization, self.LABEL)
        if self.pt_seq_len is None:
            self.pt_seq_len = self.latent_size // self.patch_size
        if self.seq_order not in ("L2R", "R2L"):
            raise ConfigError(f"seq_order must be L2R or R2L, got {self.seq_order!r}")
        if self.norm_type not in ("layer_norm", "rms_norm", "none"):
            raise ConfigError(f"norm_type must be layer_norm, rms_norm or none, got {self.norm_type!r}")
        if self.channels % self.head_dim:
            raise ConfigError(f"channels {self.channels} is not a multiple of head_dim {self.head_dim}")
        if self.top_block_channels and self.top_block_channels % self.head_dim:
            raise ConfigError(f"top_block_channels {self.top_block_channels} is not a multiple of head_dim {self.head_dim}")
        if self.patch_size > self.latent_size:
            raise ConfigError(f"patch_size {self.patch_size} is larger than the latent size {self.latent_size}")
        for i in range(self.num_blocks):
            if self.block_heads(i) % self.block_kv_heads(i):
                raise ConfigError(f"block {i} has {self.block_heads(i)} heads, not a multiple of its "
                                  f"{self.block_kv_heads(i)} key/value heads")
        if self.txt_size > 0 and self.head_dim // 2 <= 8:
            raise ConfigError("models with text need head_dim > 16 (8 rotary dims are reserved for text/time)")
        if self.cond_top_only and self.txt_size <= 0:
            raise ConfigError("cond_top_only needs txt_size > 0")
        if self.shallow_block_local and not self.cond_top_only:
            raise ConfigError("shallow_block_local needs cond_top_only")
        if self.temporal_causal and self.seq_order != "L2R":
            raise ConfigError("temporal_causal needs seq_order L2R")

    def min_weight_bytes(self) -> int:
        """A lower bound on the bytes of this model's weights: the query and output projections alone,
        at the fewest bytes per weight it may be stored with. More than the weights file holds means
        the config does not describe those weights (and is refused before a model is built)."""
        weights = sum(n * 2 * self.block_channels(i) * self.block_heads(i) * self.head_dim
                      for i, n in enumerate(self.layers_per_block))
        return weights // 2 if self.quantization else weights * 2  # 4-bit or 16-bit

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
