"""Tiny STARFlow models with random, non-zero weights for tests."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from starflow_mlx.config import FlowConfig
from starflow_mlx.models.starflow import STARFlow

IMAGE = dict(in_channels=4, channels=64, layers_per_block=[1, 0, 1, 2], latent_size=4, head_dim=32, txt_size=6,
             txt_dim=24, sos=True, seq_order="L2R", use_softplus=True, cond_top_only=True, use_final_norm=True,
             soft_clip=4.0)
OPTIONS = dict(in_channels=4, channels=64, layers_per_block=[1, 1, 2], latent_size=4, head_dim=32, num_heads=4,
               num_kv_heads=2, txt_size=5, txt_dim=24, sos=False, seq_order="R2L", use_softplus=False,
               use_swiglu=True, norm_type="rms_norm", use_qk_norm=True, use_post_norm=True, use_bias=False)
VIDEO = dict(in_channels=4, channels=64, top_block_channels=96, layers_per_block=[1, 1, 1, 2], latent_size=2,
             pt_seq_len=4, head_dim=32, txt_size=6, txt_dim=24, sos=True, seq_order="L2R", use_softplus=True,
             cond_top_only=True, use_final_norm=True, soft_clip=4.0, temporal_causal=2, shallow_block_local=True,
             learnable_self_denoiser=True, conditional_denoiser=True, denoiser_window=1, num_frames=3)
NOTEXT = dict(in_channels=1, channels=64, layers_per_block=[1, 2], latent_size=4, head_dim=32, sos=True,
              seq_order="L2R", use_softplus=True)


def random_flow(seed: int = 0, scale: float = 0.05, **fields) -> STARFlow:
    mx.random.seed(seed)
    flow = STARFlow(FlowConfig(**fields))
    flow.update(tree_map(lambda a: mx.random.normal(a.shape) * scale, flow.parameters()))
    mx.eval(flow.parameters())
    return flow


def save_flow(flow: STARFlow, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    flow.config.save(folder / "config.json")
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(flow.parameters())))


def flow_inputs(flow: STARFlow, batch: int = 2, frames: int = 0, seed: int = 1):
    """Noise of the flow's shape (video when ``frames``) and random text features (None without text)."""
    cfg = flow.config
    mx.random.seed(seed)
    grid = (frames, cfg.latent_size, cfg.latent_size) if frames else (cfg.latent_size, cfg.latent_size)
    y = mx.random.normal((batch, cfg.txt_size, cfg.txt_dim)) if cfg.txt_dim else None
    y_u = mx.random.normal((batch, cfg.txt_size, cfg.txt_dim)) if cfg.txt_dim else None
    return mx.random.normal((batch, *grid, cfg.in_channels)), y, y_u


def rel(a, b) -> float:
    """Largest difference relative to the largest value of ``b``."""
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
