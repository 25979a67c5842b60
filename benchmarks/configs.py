"""Named model shapes for benchmarks, and random weights to fill them.

The two real sizes copy the released upstream YAMLs (``starflow_3B_t2i_256x256``
and ``starflow-v_7B_t2v_caus_480p``) as resolved by ``starflow convert``: the
image model sees 32x32 SD-VAE latents (256 px / 8), the video model 21 latent
frames of 40x40 Wan2.2 latents (81 frames, 640 px / 16). Weights are random:
timing does not depend on their values, and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from starflow_mlx.config import ConfigError, FlowConfig
from starflow_mlx.models.starflow import STARFlow

# The options every released STARFlow model shares.
_RELEASED = dict(head_dim=64, sos=True, seq_order="L2R", use_softplus=True, cond_top_only=True,
                 use_final_norm=True, soft_clip=4.0, patch_size=1)

NAMED: dict[str, dict] = {
    "tiny": dict(_RELEASED, in_channels=4, channels=64, head_dim=32, layers_per_block=[1, 2], latent_size=4,
                 txt_size=4, txt_dim=32),
    "small": dict(_RELEASED, in_channels=4, channels=384, layers_per_block=[2, 2, 6], latent_size=16,
                  txt_size=16, txt_dim=256, cfg=2.5),
    # Class-conditional 8x8 grayscale digits in pixel space: one-hot class "text" (10 digits + unconditional).
    "digits-demo": dict(_RELEASED, in_channels=1, channels=128, head_dim=32, layers_per_block=[2, 2, 4],
                        latent_size=8, txt_size=1, txt_dim=11, num_classes=10, vae_factor=1, cfg=2.0),
    "starflow-3b": dict(_RELEASED, in_channels=4, channels=3072, layers_per_block=[2, 2, 2, 2, 2, 24],
                        latent_size=32, txt_size=128, txt_dim=2048, noise_std=0.3, cfg=2.5,
                        text_encoder="google/flan-t5-xl", vae="stabilityai/sd-vae-ft-ema", vae_factor=8),
    "starflow-v-7b": dict(_RELEASED, in_channels=48, channels=3072, top_block_channels=4096,
                          layers_per_block=[2, 2, 2, 2, 2, 24], latent_size=40, pt_seq_len=32, txt_size=256,
                          txt_dim=2048, temporal_causal=2, shallow_block_local=True, learnable_self_denoiser=True,
                          conditional_denoiser=True, denoiser_window=10, noise_std=0.5, cfg=2.5, num_frames=21,
                          fps_cond=True, cond_noise_level=True, mix_aspect=True, text_encoder="google/flan-t5-xl",
                          vae="Wan-AI/Wan2.2-TI2V-5B-Diffusers", vae_factor=16, vae_temporal_scale=0.6),
}


def load_config(name_or_path: str) -> FlowConfig:
    """A named shape, or a ``config.json`` file (or a model folder holding one)."""
    if name_or_path in NAMED:
        return FlowConfig(**NAMED[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"unknown config {name_or_path!r}: use one of {', '.join(NAMED)} or a config.json path")
    return FlowConfig.load(path)


def build_flow(config: FlowConfig, dtype: mx.Dtype = mx.float32, seed: int = 0, std: float = 0.02) -> STARFlow:
    """A flow with random weights: matrices N(0, std), 1-D parameters (norms, biases) as initialised.

    A config with ``quantization`` gets its layers quantized from those weights.
    Parameters are made one at a time in ``dtype``, so a multi-billion-parameter
    model never holds a float32 copy beside the target one.
    """
    mx.random.seed(seed)
    flow = STARFlow(config)
    params = []
    for name, value in tree_flatten(flow.parameters()):
        if value.ndim >= 2:
            value = mx.random.normal(value.shape) * std
        value = value.astype(dtype)
        mx.eval(value)
        params.append((name, value))
    flow.update(tree_unflatten(params))
    if config.quantization:
        from starflow_mlx.quantize.policy import apply_quantization

        apply_quantization(flow, config.quantization)
        mx.eval(flow.parameters())
    flow.eval()
    return flow
