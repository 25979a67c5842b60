"""Build a complete model folder: the converted flow plus the T5 encoder, the SD-VAE and a manifest.

Everything is assembled in a temporary folder beside the output and renamed
into place at the end, so a failure never leaves a half-written model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from starflow_mlx.config import FlowConfig
from starflow_mlx.convert.flow_checkpoint import ConversionError, convert_checkpoint
from starflow_mlx.convert.t5_weights import convert_t5
from starflow_mlx.convert.vae_weights import convert_vae
from starflow_mlx.model_folder import Manifest

TEXT_ENCODER_DIR, VAE_DIR = "text_encoder", "vae"


def local_component(source: str | Path, role: str) -> Path:
    """A component as a local folder: an existing path, or a Hugging Face repo fetched through the hub cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if "/" in str(source) and not str(source).startswith((".", "/", "~")):
        from starflow_mlx.hub import fetch_component

        return fetch_component(str(source), role)
    raise ConversionError(f"{role} {source} not found: pass a local folder or a Hugging Face repo id")


def add_components(folder: str | Path, text_encoder: str | Path, vae: str | Path, decoder: str | Path | None = None,
                   dtype: str = "float16") -> Manifest:
    """Convert the text encoder and VAE into ``folder`` (a converted flow) and write its manifest."""
    folder = Path(folder)
    config = FlowConfig.load(folder / "config.json")
    convert_t5(local_component(text_encoder, "text encoder"), folder / TEXT_ENCODER_DIR, dtype=dtype)
    convert_vae(local_component(vae, "VAE"), folder / VAE_DIR, dtype=dtype, decoder_src=decoder)
    manifest = Manifest(
        kind="text-to-video" if config.num_frames else "text-to-image",
        text_encoder=TEXT_ENCODER_DIR,
        vae=VAE_DIR,
        source={"text_encoder": str(text_encoder), "vae": str(vae),
                "finetuned_decoder": str(decoder) if decoder else None},
    )
    manifest.save(folder)
    return manifest


def build_model_folder(checkpoint: str | Path, config_yaml: str | Path, output: str | Path, *,
                       text_encoder: str | Path | None = None, vae: str | Path | None = None,
                       decoder: str | Path | None = None, dtype: str = "float16", vae_factor: int | None = None,
                       quantize: int | None = None, group_size: int = 64) -> str:
    """Convert everything into ``output`` atomically; returns a one-line summary."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConversionError(f"output {output} already exists and is not empty: choose a new folder or delete it")
    if (text_encoder is None) != (vae is None):
        raise ConversionError("pass both a text encoder and a VAE for a full model folder, or neither")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model = staging / "model"
        cfg = convert_checkpoint(checkpoint, config_yaml, model, dtype="float16" if quantize else dtype,
                                 vae_factor=vae_factor)
        summary = f"flow: {sum(cfg.layers_per_block)} layers in {cfg.num_blocks} blocks, {cfg.channels} channels"
        if text_encoder is not None:
            add_components(model, text_encoder, vae, decoder, dtype)
            summary += f"; text encoder {text_encoder}; VAE {vae}" + (f" with decoder {decoder}" if decoder else "")
        if quantize:
            from starflow_mlx.quantize.quantize_folder import quantize_in_place

            summary += f"; quantized: {quantize_in_place(model, bits=quantize, group_size=group_size)}"
        if output.exists():
            output.rmdir()
        model.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
