"""``starflow score FILE --heatmap out.png``: the score's lines, and each token's share of the bits/dim drawn
beside the input (one model load for both)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import typer


def write_heatmap(path: Path, prompt: str, model: str, lora, lora_scale: float, fps, output: Path,
                  overwrite: bool) -> None:
    from starflow_mlx.io.image_input import open_image
    from starflow_mlx.pipelines.heatmap import render, token_map
    from starflow_mlx.pipelines.load import load_pipeline
    from starflow_mlx.io.staging import write_file

    pipe = load_pipeline(model, lora=lora, lora_scale=lora_scale)
    if fps is not None and not pipe.VIDEO:
        raise ValueError("--fps is for scoring .mp4 clips with a video model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = token_map(pipe, path, prompt, fps)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    source = None
    if tokens.pixels is None:  # a latent model: show the input itself
        if path.suffix.lower() == ".mp4":
            from starflow_mlx.pipelines.video_io import read_video
            from PIL import Image

            frames, _ = read_video(path)
            source = [Image.fromarray(f) for f in frames]
        else:
            source = [open_image(path)]
    if pipe.VIDEO:  # the score's own lines: each latent frame's bits/dim is its shares' sum times the frame count
        for k, share in enumerate(tokens.shares.sum(axis=(1, 2))):
            typer.echo(f"latent frame {k}: {share * len(tokens.shares):.4f} bits/dim")
    typer.echo(f"{tokens.bits_per_dim:.4f} bits/dim" + (" (all frames)" if pipe.VIDEO else ""))
    buffer = io.BytesIO()
    render(tokens, source).save(buffer, format="PNG")
    write_file(output, buffer.getvalue(), overwrite)
    typer.echo(f"wrote {output} (each token's share of the bits/dim, {tokens.shares.min():.4f} black to "
               f"{tokens.shares.max():.4f} white; they sum to {tokens.shares.sum():.4f})")
