"""``starflow export-coreml``: Core ML packages (deep block for the GPU, shallow blocks for the Neural Engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export_coreml(
    model: str = typer.Argument(..., help="Model folder or name ('demo', 'demo-video')."),
    output: Path = typer.Option(..., "--output", "-o", readable=False, help="New folder for the .mlpackage files and manifest.json."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if starflow-mlx wrote it (only when done)."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="Quantize a float model to 4 or 8 bits on export."),
    group_size: int = typer.Option(64, "--group-size", help="With --bits: 32, 64 or 128 weights per scale and bias."),
    chunk: Optional[int] = typer.Option(None, "--chunk", help="Deep-block tokens per call: 1 sequential, more Jacobi "
                                                             "(default 64 capped at an image's or a frame's tokens, "
                                                             "or 1 without a start token)."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height in pixels (default: training size)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width in pixels (default: training size)."),
    aspect_ratio: Optional[str] = typer.Option(None, "--aspect-ratio", help="Video frames: e.g. 16:9 (default: 16:9, "
                                                                            "or 1:1 for square-only models)."),
    batch: int = typer.Option(1, "--batch", help="Images (videos) per call."),
    guidance: Optional[bool] = typer.Option(None, "--guidance/--no-guidance",
                                            help="Export classifier-free guidance (default: when the model's cfg > 0)."),
    verify: bool = typer.Option(False, "--verify", help="Run the saved packages with the numpy interpreter against "
                                                        "the MLX model; exit 1 past float16 tolerance."),
) -> None:
    """Export an image or STARFlow-V model to Core ML: a stateful deep-block package (GPU), one package per
    shallow block (Neural Engine; one frame per call for video), and the text encoder (and, for images, the VAE
    decoder) of a full model folder."""
    from starflow_mlx.coreml.export import ExportOptions, describe, export_coreml as run_export

    options = ExportOptions(bits=bits, group_size=group_size, chunk=chunk, height=height, width=width, batch=batch,
                            guidance=guidance, aspect_ratio=aspect_ratio)
    from starflow_mlx.progress import StageProgress

    with StageProgress() as stages:
        result = run_export(model, output, options, verify=verify, report=stages.log, progress=stages, force=force)
    typer.echo(f"{result.folder}: {len(result.manifest.packages)} packages + manifest.json")
    typer.echo(describe(result.manifest))
