"""Read an upstream STARFlow YAML config (``arguments:`` list) into a resolved :class:`FlowConfig`.

Keys the YAML leaves out take the upstream training parser's defaults. Every key that shapes
the model is typed and bounded by :class:`UpstreamArgs` (the project's one config validator),
so a damaged or hostile YAML fails with one line before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from starflow_mlx.config import ConfigError, FlowConfig
from starflow_mlx.jsonconfig import MAX_BYTES, MAX_DEPTH, JSONConfig, nesting_depth

FLAG = int | bool
MAX_VAE_FACTOR = 64
# Spatial downsampling of the VAEs upstream supports, by name prefix.
VAE_FACTORS = {
    "stabilityai/sd-vae": 8,
    "Wan-AI/Wan2.2": 16,
    "Wan-AI/Wan2.1": 8,
}


@dataclass
class UpstreamArgs(JSONConfig):
    """The upstream training parser's keys that shape inference, with its defaults."""

    LABEL = "upstream config"

    img_size: int = field(default=32, metadata={"min": 1, "max": 16384})
    vid_size: str | int | None = None
    fps_cond: FLAG = 0
    mix_aspect: FLAG = 0
    vae: str | None = None
    text: str | None = None
    channel_size: int = 3
    txt_size: int = 0
    sos: FLAG = 0
    seq_order: str = "R2L"
    patch_size: int = 4
    channels: int = 512
    top_block_channels: int | None = None
    blocks: int = field(default=4, metadata={"min": 1, "max": 64})
    layers_per_block: list[int] | int | str = field(default_factory=lambda: [8], metadata={"max_len": 64})
    rope: FLAG = 0
    pt_seq_len: int | None = None
    adaln: FLAG = 0
    use_softplus: FLAG = 0
    cond_top_only: FLAG = 0
    head_dim: int = 64
    num_heads: int | None = None
    num_kv_heads: int | None = None
    use_swiglu: FLAG = 0
    use_qk_norm: FLAG = 0
    use_post_norm: FLAG = 0
    use_final_norm: FLAG = 0
    use_bias: FLAG = 1
    norm_type: str = "layer_norm"
    use_pretrained_lm: str | FLAG | None = None
    soft_clip: float = 0.0
    learnable_self_denoiser: FLAG = 0
    conditional_denoiser: FLAG = 0
    noise_embed_denoiser: FLAG = 0
    temporal_causal: int = 0
    shallow_block_local: FLAG = 0
    denoiser_window: int | None = None
    local_attn_window: int | None = None
    noise_std: float = 0.3
    cond_noise_level: FLAG = 0
    cfg: list[float] | float = field(default_factory=lambda: [0.0], metadata={"max_len": 16})
    finetuned_vae: str | None = None

    def layers(self) -> list[int]:
        """Layers per block: a list, one count for every block, or a space-separated string."""
        value = self.layers_per_block
        if isinstance(value, str):
            parts = value.split()
            if not parts or len(parts) > 64 or not all(p.isdigit() and len(p) <= 9 for p in parts):
                raise ConfigError(f"upstream config: layers_per_block {value[:40]!r} must be counts like '2 2 24'")
            value = [int(p) for p in parts]
        elif isinstance(value, int):
            value = [value]
        if len(value) == 1:
            value = value * self.blocks
        return value


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors/aliases: a few aliases can make a tiny file expand to billions of items."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise ConfigError("uses YAML aliases (*name), which upstream configs never do")
        return super().compose_node(parent, index)


def read_arguments(path: str | Path) -> dict[str, Any]:
    """The ``arguments:`` list of an upstream YAML as one dict (size, nesting and aliases bounded)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} not found: pass the upstream YAML (e.g. configs/starflow_3B_t2i_256x256.yaml)")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(f"{path} is larger than any upstream config ({MAX_BYTES} bytes at most)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({type(exc).__name__})") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise ConfigError(f"{path} is nested more than {MAX_DEPTH} levels deep: it is not an upstream config")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path} {exc}") from None
    except (RecursionError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{path} cannot be parsed as YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("arguments"), list):
        raise ConfigError(f"{path} is not an upstream STARFlow config: expected a top-level 'arguments:' list")
    args: dict[str, Any] = {}
    for item in data["arguments"]:
        if not isinstance(item, dict) or len(item) != 1 or not isinstance(next(iter(item)), str):
            raise ConfigError(f"{path}: every entry under 'arguments:' must be a one-key map, got {type(item).__name__}")
        args.update(item)
    return args


def parse_arguments(args: dict[str, Any]) -> UpstreamArgs:
    """The keys that shape the model, typed and bounded; training-only keys are ignored."""
    known = {f.name for f in dataclasses.fields(UpstreamArgs)}
    return UpstreamArgs.from_dict({k: v for k, v in args.items() if k in known})


def block_count(args: dict[str, Any]) -> int:
    return len(parse_arguments(args).layers())


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
    a = parse_arguments(args)
    if a.use_pretrained_lm:
        raise ConfigError("use_pretrained_lm models (Gemma top blocks) are not supported")
    if a.adaln:
        raise ConfigError("adaln models are not supported (no released STARFlow checkpoint uses them)")
    if not a.rope:
        raise ConfigError("rope 0 (learned position tables) is not supported: upstream's own code fails on it")
    if factor is not None and not 1 <= factor <= MAX_VAE_FACTOR:
        raise ConfigError(f"--vae-factor must be between 1 and {MAX_VAE_FACTOR}, got {factor}")
    factor = factor or vae_factor(a.vae)
    if a.img_size % factor:
        raise ConfigError(f"img_size {a.img_size} is not a multiple of the VAE factor {factor}")
    frames = 0
    if a.vid_size:
        head = str(a.vid_size).split(":")[0]
        if not head.isdigit() or not 1 <= int(head) <= 100000:
            raise ConfigError(f"upstream config: vid_size {str(a.vid_size)[:40]!r} must start with a frame count")
        frames = (int(head) - 1) // 4 + 1
    vae_name, _, scale = str(a.vae or "").partition(":")
    try:
        temporal_scale = float(scale) if scale else None
    except ValueError:
        raise ConfigError(f"upstream config: vae {a.vae[:60]!r} has a bad scale after ':'") from None
    return FlowConfig(
        in_channels=a.channel_size,
        channels=a.channels,
        layers_per_block=a.layers(),
        latent_size=a.img_size // factor,
        patch_size=a.patch_size,
        head_dim=a.head_dim,
        num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads,
        top_block_channels=a.top_block_channels,
        pt_seq_len=a.pt_seq_len,
        txt_size=a.txt_size,
        txt_dim=txt_dim if a.txt_size > 0 else 0,
        sos=bool(a.sos),
        seq_order=a.seq_order,
        use_softplus=bool(a.use_softplus),
        cond_top_only=bool(a.cond_top_only),
        use_final_norm=bool(a.use_final_norm),
        soft_clip=a.soft_clip,
        use_swiglu=bool(a.use_swiglu),
        use_bias=bool(a.use_bias),
        use_qk_norm=bool(a.use_qk_norm),
        use_post_norm=bool(a.use_post_norm),
        norm_type=a.norm_type,
        temporal_causal=int(a.temporal_causal),
        shallow_block_local=bool(a.shallow_block_local),
        learnable_self_denoiser=bool(a.learnable_self_denoiser),
        conditional_denoiser=bool(a.conditional_denoiser),
        denoiser_window=a.denoiser_window,
        local_attn_window=a.local_attn_window,
        noise_std=a.noise_std,
        cfg=a.cfg[0] if isinstance(a.cfg, list) and a.cfg else (a.cfg if not isinstance(a.cfg, list) else 0.0),
        text_encoder=a.text,
        vae=vae_name or None,
        vae_factor=factor,
        num_frames=frames,
        fps_cond=bool(a.fps_cond),
        cond_noise_level=bool(a.cond_noise_level),
        mix_aspect=bool(a.mix_aspect),
        vae_temporal_scale=temporal_scale,
        extra={"finetuned_vae": a.finetuned_vae} if a.finetuned_vae not in (None, "none") else {},
    )
