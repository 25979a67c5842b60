"""A tiny STARFlow-V as a user downloads it: an upstream .pth + YAML, a T5 repo and a Wan2.2_VAE.pth.

The flow has the released video config's features at toy widths: 48 latent channels
(the Wan2.2 VAE's), temporal causality, frame-local shallow blocks, a wider deep block,
the text-conditioned learnable denoiser, fps / noise-level / aspect-ratio prompt
templates and the ``:0.6`` temporal scale. 32x48 pixels at 16:9, trained on 9 frames
(3 latents), so longer videos exercise the sliding window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from mlx.utils import tree_flatten

from fixtures_t5 import make_tiny_t5
from fixtures_wan_vae import make_tiny_wan_vae
from flow_factory import random_flow

FLOW = dict(in_channels=48, channels=64, top_block_channels=96, layers_per_block=[1, 1, 2], latent_size=2,
            pt_seq_len=4, head_dim=32, txt_size=64, txt_dim=32, sos=True, seq_order="L2R", use_softplus=True,
            cond_top_only=True, use_final_norm=True, soft_clip=4.0, temporal_causal=2, shallow_block_local=True,
            learnable_self_denoiser=True, conditional_denoiser=True, denoiser_window=1, num_frames=3,
            noise_std=0.5, cfg=2.5, vae_factor=16, fps_cond=True, cond_noise_level=True, mix_aspect=True,
            vae_temporal_scale=0.6)
ARGS = [{"img_size": 32}, {"vid_size": "9:16"}, {"fps_cond": 1}, {"cond_noise_level": 1}, {"noise_std": 0.5},
        {"mix_aspect": 1}, {"vae": "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6"}, {"text": "google/flan-t5-xl"},
        {"txt_size": 64}, {"channel_size": 48}, {"patch_size": 1}, {"channels": 64}, {"top_block_channels": 96},
        {"head_dim": 32}, {"blocks": 3}, {"layers_per_block": "1 1 2"}, {"rope": 1}, {"pt_seq_len": 4}, {"sos": 1},
        {"seq_order": "L2R"}, {"use_softplus": 1}, {"cond_top_only": 1}, {"use_final_norm": 1}, {"soft_clip": 4},
        {"temporal_causal": 2}, {"shallow_block_local": 1}, {"learnable_self_denoiser": 1},
        {"conditional_denoiser": 1}, {"denoiser_window": 1}, {"cfg": 2.5}, {"finetuned_vae": "none"}]


def make_video_sources(folder: Path, seed: int = 0, drop: str | None = None) -> dict[str, Path]:
    """Checkpoint (+ YAML), T5 repo and Wan VAE file in ``folder``; ``drop`` removes tensors with that prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    flow = random_flow(seed, scale=0.03, **FLOW)
    state = {"module." + k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(flow.parameters())
             if drop is None or not k.startswith(drop)}
    torch.save(state, folder / "starflow-v.pth")
    (folder / "starflow-v.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    return {"checkpoint": folder / "starflow-v.pth", "config": folder / "starflow-v.yaml",
            "text_encoder": make_tiny_t5(folder / "t5"), "vae": make_tiny_wan_vae(folder / "wan")}


def make_video_model(folder: Path, seed: int = 0) -> Path:
    """A converted video model folder (``starflow convert`` with --text-encoder and --vae)."""
    from starflow_mlx.convert.full_model import build_model_folder

    sources = make_video_sources(folder / "sources", seed)
    build_model_folder(sources["checkpoint"], sources["config"], folder / "model", dtype="float32",
                       text_encoder=sources["text_encoder"], vae=sources["vae"])
    return folder / "model"
