"""Stable Diffusion's KL autoencoder (diffusers ``AutoencoderKL``) in MLX, channels-last.

Parameter names mirror diffusers' so that converting a checkpoint is renaming
old attention keys and transposing conv kernels (OIHW -> OHWI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx.jsonconfig import ConfigError, JSONConfig, read_json

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers' AutoencoderKL defaults, applied when an (old) config.json omits a key.
DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=[64], layers_per_block=1,
                          latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
                          shift_factor=None, use_quant_conv=True, use_post_quant_conv=True,
                          mid_block_add_attention=True, act_fn="silu")


@dataclass
class VAEConfig(JSONConfig):
    """Shape and latent scaling of an AutoencoderKL; the defaults are stabilityai/sd-vae-ft-ema's."""

    LABEL = "VAE config"

    # Upper bounds far above any AutoencoderKL, so a hostile config.json is refused before a VAE is built.
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512],
                                          metadata={"min": 1, "max": 8192, "max_len": 8})
    layers_per_block: int = field(default=2, metadata={"min": 1, "max": 16})
    latent_channels: int = field(default=4, metadata={"min": 1, "max": 1024})
    in_channels: int = field(default=3, metadata={"min": 1, "max": 64})
    out_channels: int = field(default=3, metadata={"min": 1, "max": 64})
    norm_num_groups: int = field(default=32, metadata={"min": 1, "max": 1024})
    scaling_factor: float = field(default=0.18215, metadata={"min": 1e-6, "max": 1e6})
    shift_factor: float | None = None
    sample_size: int = field(default=256, metadata={"min": 1, "max": 1 << 16})
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"  # how the weights are stored

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.block_out_channels:
            raise ConfigError("VAE block_out_channels is empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"VAE channels {bad[0]} are not divisible by norm_num_groups {self.norm_num_groups}")

    def min_weight_bytes(self) -> int:
        """A lower bound on the weights' bytes: the decoder's 3x3 convolutions alone, in 16 bits."""
        return sum(2 * self.layers_per_block * 9 * c * c for c in self.block_out_channels) * 2

    @property
    def factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_dict(cls, data: dict[str, Any]) -> "VAEConfig":
        """Read a diffusers ``AutoencoderKL`` config.json, refusing anything this module cannot build."""
        if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ConfigError(f"VAE config describes a {str(data['_class_name'])[:40]!r}, not an AutoencoderKL")
        merged = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in data.items() if k in DIFFUSERS_DEFAULTS}}
        if merged.pop("act_fn") != "silu":
            raise ConfigError(f"VAE act_fn {str(data['act_fn'])[:40]!r} is not supported (only silu)")
        config = cls.from_dict(merged)
        blocks = len(config.block_out_channels)
        for key, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = data.get(key, [kind] * blocks)
            if not isinstance(types, list) or len(types) != blocks or any(t != kind for t in types):
                raise ConfigError(f"VAE {key} is not supported: expected {blocks} x {kind}")
        return config

    @classmethod
    def load(cls, path: str | Path) -> "VAEConfig":
        data = read_json(path, cls.LABEL)
        if isinstance(data, dict) and "_class_name" in data:
            raise ConfigError(f"{path} is a diffusers config: convert the folder with convert_vae first")
        return cls.from_dict(data, str(path))


class GroupNorm(nn.GroupNorm):
    """PyTorch-ordered GroupNorm whose statistics are taken in float32 whatever the activations' dtype."""

    def __init__(self, num_groups: int, dims: int):
        super().__init__(num_groups, dims, eps=1e-6, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x.astype(mx.float32)).astype(x.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """One head attending over all H*W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, 1, h * w, c)
        y = mx.fast.scaled_dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y), scale=c**-0.5)
        return x + self.to_out[0](y).reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)]
        if attention:
            self.attentions = [AttentionBlock(channels, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # diffusers pads only bottom and right before the stride-2 conv.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                        for i in range(layers)]
        if downsample:
            self.downsamplers = [Downsample(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                        for i in range(layers)]
        if upsample:
            self.upsamplers = [Upsample(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            EncoderBlock(channels[max(i - 1, 0)], c, config.layers_per_block, groups, i < len(channels) - 1)
            for i, c in enumerate(channels)
        ]
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            DecoderBlock(channels[max(i - 1, 0)], c, config.layers_per_block + 1, groups, i < len(channels) - 1)
            for i, c in enumerate(channels)
        ]
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Unscaled latents in and out: ``encode`` gives the posterior mean, ``decode`` the image."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(moments, moments, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x: mx.array) -> mx.array:
        moments = self.encoder(x)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        return moments[..., : self.config.latent_channels]

    def decode(self, z: mx.array) -> mx.array:
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)
