"""``starflow score FILE --heatmap out.png``: each token's share of the bits/dim, drawn beside the input."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import typer


def write_heatmap(path: Path, prompt: str, model: str, lora, lora_scale: float, fps, output: Path) -> None:
    from starflow_mlx.image_input import open_image
    from starflow_mlx.pipelines.heatmap import render, token_map
    from starflow_mlx.pipelines.image import Pipeline
    from starflow_mlx.staging import write_file

    pipe = Pipeline.from_pretrained(model, lora=lora, lora_scale=lora_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the score above has already printed them
        tokens = token_map(pipe, path, prompt, fps)
    source = None
    if tokens.pixels is None:  # a latent model: show the input itself
        if path.suffix.lower() == ".mp4":
            from starflow_mlx.pipelines.video_io import read_video
            from PIL import Image

            frames, _ = read_video(path)
            source = [Image.fromarray(f) for f in frames]
        else:
            source = [open_image(path)]
    buffer = io.BytesIO()
    render(tokens, source).save(buffer, format="PNG")
    write_file(output, buffer.getvalue())
    typer.echo(f"wrote {output} (token shares {tokens.shares.min():.4f} to {tokens.shares.max():.4f} bits/dim, "
               f"black to white, summing to {tokens.shares.sum():.4f})")
