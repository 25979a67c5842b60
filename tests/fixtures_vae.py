"""Tiny random diffusers AutoencoderKLs for tests (needs torch and diffusers; no network)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# Overrides for a tiny VAE with SD's 8x downsampling, for pipeline tests whose flow expects vae_factor 8.
FACTOR8 = dict(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)


def randomize(model: torch.nn.Module, seed: int, only: str = "") -> None:
    """Non-trivial norms and biases (defaults are 1 and 0), kernels kept at their default scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(only):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.add_(0.2 * p.std() * noise)


def tiny_autoencoder(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(**{**TINY, **overrides})
    randomize(model, seed)
    return model.eval()


def make_tiny_vae(folder: str | Path, seed: int = 0, safe_serialization: bool = True, **overrides) -> Path:
    """Save a tiny random AutoencoderKL as a diffusers folder; TINY downsamples 2x, ``**FACTOR8`` 8x."""
    folder = Path(folder)
    tiny_autoencoder(seed, **overrides).save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


def make_tiny_mlx_vae(folder: str | Path, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """A converted MLX VAE folder at ``folder/mlx`` (its diffusers source at ``folder/diffusers``)."""
    from starflow_mlx.convert.vae_weights import convert_vae

    folder = Path(folder)
    convert_vae(make_tiny_vae(folder / "diffusers", seed, **overrides), folder / "mlx", dtype=dtype)
    return folder / "mlx"
