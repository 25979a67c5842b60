"""Read an upstream STARFlow YAML config (``arguments:`` list) into a resolved :class:`FlowConfig`.

Keys the YAML leaves out take the upstream training parser's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from starflow_mlx.config import ConfigError, FlowConfig

# The upstream parser's defaults for every key that shapes inference.
PARSER_DEFAULTS: dict[str, Any] = {
    "img_size": 32, "vid_size": None, "fps_cond": 0, "mix_aspect": 0, "vae": None, "text": None,
    "channel_size": 3, "txt_size": 0, "sos": 0, "seq_order": "R2L", "patch_size": 4, "channels": 512,
    "top_block_channels": None, "blocks": 4, "layers_per_block": [8], "rope": 0, "pt_seq_len": None,
    "adaln": 0, "use_softplus": 0, "cond_top_only": 0, "head_dim": 64, "num_heads": None, "num_kv_heads": None,
    "use_swiglu": 0, "use_qk_norm": 0, "use_post_norm": 0, "use_final_norm": 0, "use_bias": 1,
    "norm_type": "layer_norm", "use_pretrained_lm": None, "soft_clip": 0.0, "learnable_self_denoiser": 0,
    "conditional_denoiser": 0, "noise_embed_denoiser": 0, "temporal_causal": 0, "shallow_block_local": 0,
    "denoiser_window": None, "local_attn_window": None, "noise_std": 0.3, "cond_noise_level": 0, "cfg": [0.0],
    "finetuned_vae": None,
}

# Spatial downsampling of the VAEs upstream supports, by name prefix.
VAE_FACTORS = {
    "stabilityai/sd-vae": 8,
    "Wan-AI/Wan2.2": 16,
    "Wan-AI/Wan2.1": 8,
}


def read_arguments(path: str | Path) -> dict[str, Any]:
    """The ``arguments:`` list of an upstream YAML as one dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} not found: pass the upstream YAML (e.g. configs/starflow_3B_t2i_256x256.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("arguments"), list):
        raise ConfigError(f"{path} is not an upstream STARFlow config: expected a top-level 'arguments:' list")
    args: dict[str, Any] = {}
    for item in data["arguments"]:
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{path}: every entry under 'arguments:' must be a one-key map, got {item!r}")
        args.update(item)
    return args


def _int_list(value: Any) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in str(value).split()]


def vae_factor(vae: str | None) -> int:
    """Spatial downsampling of a VAE by name; a model without a VAE works on pixels (factor 1)."""
    if not vae:
        return 1
    name = vae.split(":")[0]
    for prefix, factor in VAE_FACTORS.items():
        if name.startswith(prefix):
            return factor
    raise ConfigError(f"unknown VAE {vae!r}: pass --vae-factor with its spatial downsampling (8 for SD-VAE)")


def resolve(args: dict[str, Any], txt_dim: int, factor: int | None = None) -> FlowConfig:
    """Apply parser defaults and derive every size the MLX model needs."""
    a = {**PARSER_DEFAULTS, **args}
    if a["use_pretrained_lm"]:
        raise ConfigError("use_pretrained_lm models (Gemma top blocks) are not supported")
    if int(a["adaln"]):
        raise ConfigError("adaln models are not supported (no released STARFlow checkpoint uses them)")
    if not int(a["rope"]):
        raise ConfigError("rope 0 (learned position tables) is not supported: upstream's own code fails on it")
    factor = factor or vae_factor(a["vae"])
    if int(a["img_size"]) % factor:
        raise ConfigError(f"img_size {a['img_size']} is not a multiple of the VAE factor {factor}")
    layers = _int_list(a["layers_per_block"])
    if len(layers) == 1:
        layers = layers * int(a["blocks"])
    latent = int(a["img_size"]) // factor
    cfg_value = a["cfg"][0] if isinstance(a["cfg"], (list, tuple)) else a["cfg"]
    frames = 0
    if a["vid_size"]:
        pixel_frames = int(str(a["vid_size"]).split(":")[0])
        frames = (pixel_frames - 1) // 4 + 1
    vae_name, _, scale = str(a["vae"] or "").partition(":")
    txt_size = int(a["txt_size"])
    return FlowConfig(
        in_channels=int(a["channel_size"]),
        channels=int(a["channels"]),
        layers_per_block=layers,
        latent_size=latent,
        patch_size=int(a["patch_size"]),
        head_dim=int(a["head_dim"]),
        num_heads=None if a["num_heads"] is None else int(a["num_heads"]),
        num_kv_heads=None if a["num_kv_heads"] is None else int(a["num_kv_heads"]),
        top_block_channels=None if a["top_block_channels"] is None else int(a["top_block_channels"]),
        pt_seq_len=None if a["pt_seq_len"] is None else int(a["pt_seq_len"]),
        txt_size=txt_size,
        txt_dim=txt_dim if txt_size > 0 else 0,
        sos=bool(int(a["sos"])),
        seq_order=str(a["seq_order"]),
        use_softplus=bool(int(a["use_softplus"])),
        cond_top_only=bool(int(a["cond_top_only"])),
        use_final_norm=bool(int(a["use_final_norm"])),
        soft_clip=float(a["soft_clip"]),
        use_swiglu=bool(int(a["use_swiglu"])),
        use_bias=bool(int(a["use_bias"])),
        use_qk_norm=bool(int(a["use_qk_norm"])),
        use_post_norm=bool(int(a["use_post_norm"])),
        norm_type=str(a["norm_type"]),
        temporal_causal=int(a["temporal_causal"]),
        shallow_block_local=bool(int(a["shallow_block_local"])),
        learnable_self_denoiser=bool(int(a["learnable_self_denoiser"])),
        conditional_denoiser=bool(int(a["conditional_denoiser"])),
        denoiser_window=None if a["denoiser_window"] is None else int(a["denoiser_window"]),
        local_attn_window=None if a["local_attn_window"] is None else int(a["local_attn_window"]),
        noise_std=float(a["noise_std"]),
        cfg=float(cfg_value),
        text_encoder=a["text"],
        vae=vae_name or None,
        vae_factor=factor,
        num_frames=frames,
        fps_cond=bool(int(a["fps_cond"])),
        cond_noise_level=bool(int(a["cond_noise_level"])),
        mix_aspect=bool(int(a["mix_aspect"])),
        vae_temporal_scale=float(scale) if scale else None,
        extra={"finetuned_vae": a["finetuned_vae"]} if a["finetuned_vae"] not in (None, "none") else {},
    )
