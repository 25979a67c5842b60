"""A tiny pixel-space class-to-video model (like the built-in moving digits) for the inversion tests."""

from __future__ import annotations

from pathlib import Path

from flow_factory import random_flow, save_flow

WORDS = ["3", "8", "right", "left"]
CLASSES = ["3 moving right", "8 moving right", "3 moving left", "8 moving left"]
VIDEO_FLOW = dict(in_channels=1, channels=64, layers_per_block=[1, 1, 2], latent_size=8, patch_size=2, pt_seq_len=4,
                  head_dim=32, txt_size=2, txt_dim=len(WORDS) + 1, sos=True, seq_order="L2R", use_softplus=True,
                  cond_top_only=True, use_final_norm=True, soft_clip=4.0, temporal_causal=1,
                  shallow_block_local=True, num_frames=3, num_classes=len(CLASSES), cfg=1.5, vae_factor=1)


def make_class_video_folder(folder: Path, seed: int = 0) -> Path:
    from starflow_mlx.io.model_folder import Manifest

    save_flow(random_flow(seed, **VIDEO_FLOW), folder)
    Manifest(kind="class-to-video", classes=CLASSES, words=WORDS).save(folder)
    return folder
