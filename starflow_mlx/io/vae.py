"""Pixels <-> STARFlow latents through an SD-VAE: a converted folder (``config.json`` + ``model.safetensors``,
the fast path), or a diffusers folder or registered repo id converted in memory."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from starflow_mlx.io.weights import (ModelLoadError, cast_floats, load_checked, load_weights_strict, parse_dtype,
                                     read_config)
from starflow_mlx.models.sd_vae import AutoencoderKL, VAEConfig


class VAE:
    """Channels-last images in [-1, 1] <-> scaled latents, as the flow sees them."""

    def __init__(self, model: AutoencoderKL):
        self.model = model
        self.config = model.config

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def dtype(self):
        return self.model.encoder.conv_in.weight.dtype

    def _check(self, x, channels: int, what: str, multiple: int) -> mx.array:
        x = mx.array(x)
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be channels-last (B, H, W, {channels}), got shape {tuple(x.shape)}")
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple}, got {x.shape[1]}x{x.shape[2]}")
        return x.astype(self.dtype)

    def encode(self, images) -> mx.array:
        """(B, H, W, 3) images in [-1, 1] -> (B, H/8, W/8, 4) posterior mean, scaled (float32)."""
        x = self._check(images, self.config.in_channels, "images", self.factor)
        z = self.model.encode(x).astype(mx.float32)
        if self.config.shift_factor is not None:
            z = z - self.config.shift_factor
        return z * self.config.scaling_factor

    def decode(self, latents) -> mx.array:
        """(B, h, w, 4) scaled latents -> (B, 8h, 8w, 3) images, about [-1, 1] and not clipped (float32)."""
        z = mx.array(latents).astype(mx.float32) / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        z = self._check(z, self.config.latent_channels, "latents", 1)
        return self.model.decode(z).astype(mx.float32)


def is_diffusers_folder(folder: Path) -> bool:
    """A diffusers AutoencoderKL folder (or a pipeline folder with a ``vae/``) rather than a converted one."""
    for config in (folder / "config.json", folder / "vae" / "config.json"):
        try:
            return "_class_name" in json.loads(config.read_text())
        except (OSError, json.JSONDecodeError, TypeError):
            continue
    return False


def diffusers_vae(folder: Path, dtype: str) -> tuple[VAEConfig, dict[str, mx.array]]:
    """Config and weights of a diffusers VAE folder, converted in memory."""
    from starflow_mlx.convert import vae_weights as hf

    try:
        config_path, weights_path = hf.diffusers_folder(folder)
        config = hf.read_config(config_path)
        config.dtype = dtype
        shapes = {name: tuple(arr.shape) for name, arr in tree_flatten(AutoencoderKL(config).parameters())}
        state = hf.read_state(weights_path)
        hf.check_names(state, shapes, weights_path)
        weights = {name: hf.to_mlx(name, state[name], shape).astype(parse_dtype(dtype)) for name, shape in shapes.items()}
    except hf.VAEConversionError as exc:
        raise ModelLoadError(str(exc)) from None
    return config, weights


def load_vae(path: str | Path, dtype: str | None = None) -> VAE:
    """Load a converted VAE folder, a diffusers VAE folder (converted in memory), or a registered repo id.

    ``dtype`` casts the float weights; a diffusers folder loads as float16 by default.
    """
    from starflow_mlx.io.text_encoder import resolve_folder

    folder = resolve_folder(path, "VAE", "VAE")
    target = parse_dtype(dtype)
    if is_diffusers_folder(folder):
        config, weights = diffusers_vae(folder, dtype or "float16")
        model = AutoencoderKL(config)
        load_checked(model, list(weights.items()), str(folder))
        target = None  # already in the asked dtype
    else:
        config = read_config(VAEConfig, folder, "VAE", "a diffusers VAE folder")
        model = AutoencoderKL(config)
        load_weights_strict(model, folder / "model.safetensors")
    if target is not None:
        cast_floats(model, target)
        config.dtype = dtype
    mx.eval(model.parameters())
    model.eval()
    return VAE(model)
