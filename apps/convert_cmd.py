"""``starflow convert``: upstream checkpoint (+ text encoder and VAE) -> MLX model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def convert(
    checkpoint: Path = typer.Argument(..., readable=False, help="Upstream STARFlow checkpoint (.pth, a torch.save zip)."),
    config: Path = typer.Option(..., "--config", "-c", readable=False, help="Upstream YAML config of that checkpoint."),
    output: Path = typer.Option(..., "--output", "-o", readable=False, help="New folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if starflow-mlx wrote it (only when done)."),
    dtype: str = typer.Option("float16", help="Weight dtype: float32, float16 or bfloat16."),
    vae_factor: Optional[int] = typer.Option(None, help="VAE downsampling, if the config's VAE is not a known one."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="T5 folder or Hugging Face repo id to include."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE to include: an SD-VAE (diffusers) folder or repo id, or for video "
                                                          "the Wan2.2 VAE (Wan2.2_VAE.pth, a folder holding it, or "
                                                          "Wan-AI/Wan2.2-TI2V-5B)."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="Fine-tuned VAE decoder weights (file or folder)."),
    quantize: Optional[int] = typer.Option(None, "--quantize", help="Quantize the result to 4 or 8 bits."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size (32, 64, 128)."),
) -> None:
    """Convert an upstream checkpoint into an MLX model folder (streams tensors; never runs pickled code)."""
    from starflow_mlx.convert.full_model import build_model_folder

    if quantize is not None:
        from starflow_mlx.quantize.policy import check_setting

        check_setting(quantize, group_size, "quantize")
    summary = build_model_folder(checkpoint, config, output, text_encoder=text_encoder, vae=vae, decoder=decoder,
                                 dtype=dtype, vae_factor=vae_factor, quantize=quantize, group_size=group_size,
                                 force=force)
    typer.echo(f"{output}: {summary}")
