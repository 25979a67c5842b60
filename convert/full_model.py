"""Build a complete model folder: the converted flow plus the T5 encoder, the SD-VAE and a manifest.

Everything is assembled in a staging folder and renamed into place at the end (the rule of
:mod:`starflow_mlx.io.staging`), so a failure never leaves a half-written model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from starflow_mlx.config import FlowConfig
from starflow_mlx.convert.flow_checkpoint import ConversionError, write_flow
from starflow_mlx.convert.t5_weights import convert_t5
from starflow_mlx.convert.vae_weights import convert_vae
from starflow_mlx.io.model_folder import MANIFEST, Manifest
from starflow_mlx.io.staging import check_output, staged_folder

TEXT_ENCODER_DIR, VAE_DIR = "text_encoder", "vae"


def is_repo_id(source: str | Path) -> bool:
    text = str(source)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def local_component(source: str | Path, role: str) -> Path:
    """A component as a local path: an existing file or folder, or a Hugging Face repo fetched into its cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if is_repo_id(source):
        from starflow_mlx.io.hub import fetch_component

        return fetch_component(str(source), role)
    raise ConversionError(f"{role} {source} not found: pass a local folder or a Hugging Face repo id")


def is_video_vae(config: FlowConfig) -> bool:
    """Video flows on 16x latents take the Wan2.2 VAE; image flows the SD-VAE."""
    return config.is_video and config.vae_factor == 16


def convert_any_vae(config: FlowConfig, source: Path, out_dir: Path, dtype: str,
                    decoder_src: Path | None) -> tuple[int, int]:
    """Convert the VAE that ``config``'s flow was trained on; returns its latent channels and spatial factor."""
    if is_video_vae(config):
        if decoder_src is not None:
            raise ConversionError("a fine-tuned decoder is for SD-VAE image models: video models use the learnable "
                                  "denoiser")
        from starflow_mlx.convert.wan_vae_weights import convert_wan_vae

        # The VAE is small next to the flow and upstream runs it in float32: it is kept so.
        wan = convert_wan_vae(source, out_dir, dtype="float32")
        return wan.z_dim, wan.factor
    sd = convert_vae(source, out_dir, dtype=dtype, decoder_src=decoder_src)
    return sd.latent_channels, sd.factor


def check_fit(config: FlowConfig, text_width: int, vae: tuple[int, int]) -> None:
    """The text encoder and VAE must produce what the flow was trained on."""
    if text_width != config.txt_dim:
        raise ConversionError(f"the text encoder makes {text_width}-wide features but the flow reads {config.txt_dim}: "
                              "it is not the encoder this checkpoint was trained with")
    channels, factor = vae
    if channels != config.in_channels or factor != config.vae_factor:
        raise ConversionError(f"the VAE makes {channels}-channel latents at 1/{factor} scale but the flow "
                              f"models {config.in_channels} channels at 1/{config.vae_factor}: wrong VAE")


def add_components(folder: str | Path, text_encoder: str | Path, vae: str | Path, decoder: str | Path | None = None,
                   dtype: str = "float16", source: dict | None = None) -> Manifest:
    """Convert the text encoder and VAE into ``folder`` (a converted flow) and write its manifest.

    ``text_encoder`` and ``vae`` are Hugging Face folders or repo ids; ``decoder`` a fine-tuned
    VAE decoder (file, folder or repo id). ``source`` adds to what the manifest records about
    where the parts came from.
    """
    folder = Path(folder)
    config = FlowConfig.load(folder / "config.json")
    taken = [name for name in (TEXT_ENCODER_DIR, VAE_DIR, MANIFEST) if (folder / name).exists()]
    if taken:
        raise ConversionError(f"{folder} already has {taken[0]}: add components to a flow-only folder")
    staging = Path(tempfile.mkdtemp(prefix=".components.", dir=folder))
    try:
        t5 = convert_t5(local_component(text_encoder, "text encoder"), staging / TEXT_ENCODER_DIR, dtype=dtype)
        decoder_src = local_component(decoder, "fine-tuned decoder") if decoder is not None else None
        check_fit(config, t5.d_model, convert_any_vae(config, local_component(vae, "VAE"), staging / VAE_DIR, dtype,
                                                      decoder_src))
        manifest = Manifest(
            kind="text-to-video" if config.num_frames else "text-to-image",
            text_encoder=TEXT_ENCODER_DIR,
            vae=VAE_DIR,
            source={"text_encoder": str(text_encoder), "vae": str(vae),
                    "finetuned_decoder": str(decoder) if decoder is not None else None, **(source or {})},
        )
        manifest.save(staging)
        moved: list[str] = []
        try:
            for name in (TEXT_ENCODER_DIR, VAE_DIR, MANIFEST):
                (staging / name).rename(folder / name)
                moved.append(name)
        except BaseException:
            for name in moved:
                (folder / name).rename(staging / name)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_model_folder(checkpoint: str | Path, config_yaml: str | Path, output: str | Path, *,
                       text_encoder: str | Path | None = None, vae: str | Path | None = None,
                       decoder: str | Path | None = None, dtype: str = "float16", vae_factor: int | None = None,
                       quantize: int | None = None, group_size: int = 64, source: dict | None = None,
                       force: bool = False) -> str:
    """Convert everything into ``output`` atomically; returns a one-line summary.

    ``source`` adds to the manifest's record of where the parts came from; ``force`` lets a
    folder this project wrote be replaced (see :mod:`starflow_mlx.io.staging`).
    """
    check_output(output, force, ConversionError)
    if (text_encoder is None) != (vae is None):
        raise ConversionError("pass both a text encoder and a VAE for a full model folder, or neither")
    if decoder is not None and vae is None:
        raise ConversionError("a fine-tuned decoder needs a VAE (--vae) to go with it")
    with staged_folder(output, force, ConversionError) as staging:
        # A quantized folder is made from a float one, built first in a hidden sub-folder of the staging.
        model = staging / ".float" if quantize else staging
        model.mkdir(exist_ok=True)
        cfg = write_flow(checkpoint, config_yaml, model, dtype="float16" if quantize else dtype, vae_factor=vae_factor)
        summary = f"flow: {sum(cfg.layers_per_block)} layers in {cfg.num_blocks} blocks, {cfg.channels} channels"
        if text_encoder is not None:
            origin = {"checkpoint": str(checkpoint), "config": str(config_yaml), **(source or {})}
            add_components(model, text_encoder, vae, decoder, dtype, source=origin)
            summary += f"; text encoder {text_encoder}; VAE {vae}" + (f" with decoder {decoder}" if decoder else "")
        if quantize:
            from starflow_mlx.quantize.quantize_folder import write_quantized

            summary += f"; quantized: {write_quantized(model, staging, quantize, group_size)}"
            shutil.rmtree(model)
    return summary
