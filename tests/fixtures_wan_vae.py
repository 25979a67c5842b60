"""A tiny Wan2.2 VAE in upstream's ``Wan2.2_VAE.pth`` format: upstream key names, PyTorch layouts, torch.save.

Real topology (z 48, dim_mult [1, 2, 4, 4], 2 residual blocks, temporal downsampling
[False, True, True]) at reduced widths, random weights.
"""

from pathlib import Path

from mlx.utils import tree_flatten

from starflow_mlx.models.wan_vae import WanVAE, WanVAEConfig


def torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Inverse of the converter's layout change: MLX (O, ..., I) -> PyTorch (O, I, ...), gamma unsqueezed."""
    if name.endswith(".gamma"):
        # The attention norm is the 2-D (C, 1, 1) variant; every other one is (C, 1, 1, 1).
        return (shape[0], 1, 1) if ".middle.1." in name else (shape[0], 1, 1, 1)
    if len(shape) in (4, 5):
        return (shape[0], shape[-1], *shape[1:-1])
    return tuple(shape)


def wan_vae_shapes(config: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint upstream would save for ``config``, with its PyTorch shape."""
    return {name: torch_shape(name, tuple(a.shape)) for name, a in tree_flatten(WanVAE(config).parameters())}


def random_state(config: WanVAEConfig, seed: int = 0) -> dict:
    """Random weights: kernels N(0, 1/fan_in), biases 0.05 N(0, 1), norm scales 1 + 0.1 N(0, 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(wan_vae_shapes(config).items()):  # sorted: independent of module order
        noise = torch.randn(shape, generator=gen)
        if name.endswith(".gamma"):
            state[name] = 1 + 0.1 * noise
        elif name.endswith(".bias"):
            state[name] = 0.05 * noise
        else:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            state[name] = noise / fan_in ** 0.5
    return state


def make_tiny_wan_vae(folder, dim: int = 4, dec_dim: int = 4, seed: int = 0) -> Path:
    """Write ``folder/Wan2.2_VAE.pth`` (a torch.save'd state dict) and return its path."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Wan2.2_VAE.pth"
    torch.save(random_state(WanVAEConfig(dim=dim, dec_dim=dec_dim), seed), path)
    return path
