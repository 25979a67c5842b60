"""A complete tiny text-to-image model: upstream-style .pth + YAML, a T5 folder and an SD-VAE folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from mlx.utils import tree_flatten

from fixtures_t5 import make_tiny_t5
from fixtures_vae import FACTOR8, make_tiny_vae
from flow_factory import random_flow

FLOW = dict(in_channels=4, channels=64, layers_per_block=[1, 2], latent_size=4, head_dim=32, txt_size=8, txt_dim=32,
            sos=True, seq_order="L2R", use_softplus=True, cond_top_only=True, use_final_norm=True, soft_clip=4.0)
ARGS = [{"img_size": 32}, {"vae": "stabilityai/sd-vae-ft-ema"}, {"text": "google/flan-t5-xl"}, {"txt_size": 8},
        {"channel_size": 4}, {"patch_size": 1}, {"channels": 64}, {"head_dim": 32}, {"blocks": 2},
        {"layers_per_block": "1 2"}, {"noise_std": 0.3}, {"rope": 1}, {"sos": 1}, {"seq_order": "L2R"},
        {"use_softplus": 1}, {"cond_top_only": 1}, {"use_final_norm": 1}, {"cfg": 2.0}, {"soft_clip": 4}]


def make_upstream_sources(folder: Path) -> dict[str, Path]:
    """What a user downloads: a STARFlow checkpoint + YAML, a T5 repo folder, an SD-VAE repo folder."""
    folder.mkdir(parents=True, exist_ok=True)
    flow = random_flow(**FLOW)
    state = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(flow.parameters())}
    torch.save(state, folder / "starflow.pth")
    (folder / "starflow.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    return {
        "checkpoint": folder / "starflow.pth",
        "config": folder / "starflow.yaml",
        "text_encoder": make_tiny_t5(folder / "t5"),
        "vae": make_tiny_vae(folder / "vae", **FACTOR8),
    }


def make_model_folder(folder: Path) -> Path:
    """Convert the tiny sources into a complete model folder (through the real conversion path)."""
    from starflow_mlx.convert.full_model import build_model_folder

    src = make_upstream_sources(folder / "sources")
    out = folder / "model"
    build_model_folder(src["checkpoint"], src["config"], out, text_encoder=src["text_encoder"], vae=src["vae"],
                       dtype="float32")
    return out
