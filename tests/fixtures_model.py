"""Tiny complete models for pipeline tests (need torch and diffusers for the T5 and VAE sources; no network).

``make_model_folder``: a text-to-image folder built directly (random flow, converted T5 and
SD-VAE, manifest). ``make_class_model_folder``: a pixel-space class-to-image folder like the
digits demo. ``make_upstream_sources``: what a user downloads (a .pth + YAML, a T5 repo, an
SD-VAE repo), for the conversion and Hugging Face paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from mlx.utils import tree_flatten

from fixtures_t5 import make_tiny_t5
from fixtures_vae import FACTOR8, make_tiny_vae
from flow_factory import random_flow, save_flow

# A 32x32-pixel model on 4x4 SD-VAE latents that reads 32 T5 tokens and allows every aspect ratio.
FLOW = dict(in_channels=4, channels=64, layers_per_block=[1, 2], latent_size=4, head_dim=32, txt_size=32, txt_dim=32,
            sos=True, seq_order="L2R", use_softplus=True, cond_top_only=True, use_final_norm=True, soft_clip=4.0,
            cfg=2.0, mix_aspect=True, vae_factor=8)
# The same model as an upstream YAML (the text width comes from the checkpoint).
ARGS = [{"img_size": 32}, {"vae": "stabilityai/sd-vae-ft-ema"}, {"text": "google/flan-t5-xl"}, {"txt_size": 32},
        {"channel_size": 4}, {"patch_size": 1}, {"channels": 64}, {"head_dim": 32}, {"blocks": 2},
        {"layers_per_block": "1 2"}, {"noise_std": 0.3}, {"rope": 1}, {"sos": 1}, {"seq_order": "L2R"},
        {"use_softplus": 1}, {"cond_top_only": 1}, {"use_final_norm": 1}, {"cfg": 2.0}, {"soft_clip": 4},
        {"mix_aspect": 1}]
CLASSES = ["0", "1", "2"]
# Shaped as the trainer shapes the digits demo: one-hot classes as a one-token "text".
CLASS_FLOW = dict(in_channels=1, channels=64, layers_per_block=[1, 1], latent_size=8, head_dim=32, txt_size=1,
                  txt_dim=len(CLASSES) + 1, sos=True, seq_order="L2R", use_softplus=True, cond_top_only=True,
                  use_final_norm=True, soft_clip=4.0, cfg=1.5, vae_factor=1, num_classes=len(CLASSES))


def make_model_folder(folder: Path, seed: int = 0) -> Path:
    """``folder/model``: config.json + model.safetensors, text_encoder/, vae/ and starflow.json."""
    from starflow_mlx.convert.t5_weights import convert_t5
    from starflow_mlx.convert.vae_weights import convert_vae
    from starflow_mlx.io.model_folder import Manifest

    model = folder / "model"
    save_flow(random_flow(seed, **FLOW), model)
    convert_t5(make_tiny_t5(folder / "hf_t5"), model / "text_encoder", dtype="float32")
    convert_vae(make_tiny_vae(folder / "hf_vae", **FACTOR8), model / "vae", dtype="float32")
    Manifest(kind="text-to-image", text_encoder="text_encoder", vae="vae",
             source={"text_encoder": "tiny T5", "vae": "tiny VAE", "finetuned_decoder": None}).save(model)
    return model


def make_class_model_folder(folder: Path, seed: int = 0) -> Path:
    """A pixel-space class-conditional folder (no text encoder, no VAE), like the digits demo."""
    from starflow_mlx.io.model_folder import Manifest

    save_flow(random_flow(seed, **CLASS_FLOW), folder)
    Manifest(kind="class-to-image", classes=CLASSES).save(folder)
    return folder


def make_upstream_sources(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A STARFlow checkpoint (torch.save of an upstream-named state dict) + YAML, a T5 repo, an SD-VAE repo."""
    folder.mkdir(parents=True, exist_ok=True)
    flow = random_flow(seed, **FLOW)
    state = {"module." + k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(flow.parameters())}
    torch.save(state, folder / "starflow.pth")
    (folder / "starflow.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    return {
        "checkpoint": folder / "starflow.pth",
        "config": folder / "starflow.yaml",
        "text_encoder": make_tiny_t5(folder / "t5"),
        "vae": make_tiny_vae(folder / "vae", **FACTOR8),
    }
