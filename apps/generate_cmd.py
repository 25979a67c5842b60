"""``starflow generate`` and ``starflow score``."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import typer

DEFAULT_MODEL = "apple/starflow"
# Everything that decides the pixels, as stored in each PNG and read back by --from-metadata, with its type.
NUMBER = (int, float)
GENERATION_KEYS = {"prompt": str, "model": str, "seed": int, "cfg": NUMBER, "aspect_ratio": str, "num_images": int,
                   "jacobi": bool, "jacobi_block_size": int, "jacobi_threshold": NUMBER, "jacobi_max_iter": int,
                   "dtype": (str, type(None)), "index": (int, type(None))}


class StageProgress:
    """Rich progress bars per stage (text, each flow block, denoising, decoding) that time each stage."""

    def __init__(self, progress):
        self.progress, self.tasks, self.started, self.seconds = progress, {}, {}, {}

    def __call__(self, label: str, done: int, total: int, **info) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total, info="")
            self.started[label] = time.perf_counter()
        extra = f"{info['iterations']} it, residual {info['residual']:.1e}" if "iterations" in info else ""
        self.progress.update(self.tasks[label], completed=done, total=total, info=extra)
        if done >= total:
            self.seconds[label] = time.perf_counter() - self.started[label]


def run_generation(pipe, prompt: str, options: dict):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:>16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console) as bars:
        stages = StageProgress(bars)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = pipe.generate(prompt, progress=stages, **options)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    console.print("  ".join(f"{label} {seconds:.2f}s" for label, seconds in stages.seconds.items()))
    return images


def options_from_metadata(path: Path) -> dict:
    from starflow_mlx.pipelines.png import read_metadata

    meta = read_metadata(path)
    wrong = [key for key, kind in GENERATION_KEYS.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise ValueError(f"{path} has damaged starflow-mlx metadata ({', '.join(wrong)} missing or mistyped)")
    return {key: meta[key] for key in GENERATION_KEYS}


def generate(
    prompt: Optional[str] = typer.Argument(None, help="Text prompt, or a class name for class models ('7' for the demo)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model folder, 'demo', or a Hugging Face repo id."),
    seed: int = typer.Option(0, help="Noise seed: same seed and options give the same PNG bytes."),
    cfg: Optional[float] = typer.Option(None, help="Guidance weight (default: the model's)."),
    aspect_ratio: str = typer.Option("1:1", "--aspect-ratio", "-a", help="1:1, 2:3, 3:2, 16:9, 9:16, 4:5, 5:4, 21:9, 9:21."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images to generate (a grid with --output)."),
    jacobi: Optional[bool] = typer.Option(None, "--jacobi/--no-jacobi", show_default=False,
                                          help="Block-wise Jacobi or sequential sampling (default: the faster one "
                                               "on this device: sequential on a CPU, Jacobi on a GPU)."),
    jacobi_block_size: int = typer.Option(64, help="Tokens solved together per Jacobi chunk."),
    jacobi_threshold: float = typer.Option(0.005, help="Jacobi stops a chunk below this residual."),
    jacobi_max_iter: int = typer.Option(32, help="Most Jacobi iterations per chunk."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (a grid when -n > 1)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Folder for one PNG per image."),
    dtype: Optional[str] = typer.Option(None, help="Cast weights: float32, float16 or bfloat16 (default: as stored; "
                                                   "float32 scales for quantized models on a CPU)."),
    from_metadata: Optional[Path] = typer.Option(None, "--from-metadata", help="Regenerate the PNG these parameters came from."),
) -> None:
    """Generate images and save PNGs that carry their generation parameters."""
    from starflow_mlx import __version__
    from starflow_mlx.loading import parse_dtype
    from starflow_mlx.pipelines.image import Pipeline
    from starflow_mlx.pipelines.png import grid, save_pngs
    from starflow_mlx.pipelines.prompts import check_aspect_ratio
    from starflow_mlx.sampling.auto import resolve_jacobi

    index = None
    if from_metadata is not None:
        if prompt is not None:
            raise ValueError("give a prompt or --from-metadata IMAGE, not both")
        meta = options_from_metadata(from_metadata)
        prompt, model, seed, cfg = meta["prompt"], meta["model"], meta["seed"], meta["cfg"]
        aspect_ratio, num_images, jacobi = meta["aspect_ratio"], meta["num_images"], meta["jacobi"]
        jacobi_block_size, jacobi_threshold = meta["jacobi_block_size"], meta["jacobi_threshold"]
        jacobi_max_iter, dtype, index = meta["jacobi_max_iter"], meta["dtype"], meta["index"]
        if index is not None and not 0 <= index < num_images:
            raise ValueError(f"{from_metadata} has damaged starflow-mlx metadata (index {index} of {num_images} images)")
        if output is None and output_dir is None:
            output = from_metadata.with_name(from_metadata.stem + "-again.png")
    if prompt is None:
        raise ValueError("give a prompt (or --from-metadata IMAGE)")
    if (output is None) == (output_dir is None):
        raise ValueError("give exactly one of --output FILE or --output-dir DIR")
    if output is not None and output.suffix.lower() != ".png":
        raise ValueError(f"--output {output}: the file name must end in .png")
    check_aspect_ratio(aspect_ratio)
    parse_dtype(dtype)
    pipe = Pipeline.from_pretrained(model, dtype=dtype)
    jacobi = resolve_jacobi(jacobi, pipe.config)  # the PNG records the sampler that ran
    options = dict(seed=seed, cfg=pipe.config.cfg if cfg is None else cfg, aspect_ratio=aspect_ratio,
                   num_images=num_images, jacobi=jacobi, jacobi_block_size=jacobi_block_size,
                   jacobi_threshold=jacobi_threshold, jacobi_max_iter=jacobi_max_iter)
    images = run_generation(pipe, prompt, options)
    params = dict(options, prompt=prompt, model=str(model), dtype=dtype, version=__version__)
    if index is not None:
        images = [images[index]]
    if output is not None:
        single = len(images) == 1
        if index is None:
            index = 0 if single else None
        items = [(images[0] if single else grid(images), output, dict(params, index=index))]
    else:
        items = [(image, output_dir / f"{seed:06d}-{i:03d}.png", dict(params, index=i if index is None else index))
                 for i, image in enumerate(images)]
    save_pngs(items)
    for _, path, _ in items:
        typer.echo(f"wrote {path}")


def score(
    image: Path = typer.Argument(..., help="Image to score."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt (or class name) to condition on."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model folder, 'demo', or a Hugging Face repo id."),
) -> None:
    """Print the image's exact negative log-likelihood under the flow, in bits per dimension."""
    from PIL import Image

    from starflow_mlx.pipelines.image import Pipeline

    if not image.is_file():
        raise FileNotFoundError(f"image {image} not found")
    try:
        with Image.open(image) as img:
            img.load()
            picture = img.copy()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {image} ({exc})") from None
    bpd = Pipeline.from_pretrained(model).score(picture, prompt)
    typer.echo(f"{bpd:.4f} bits/dim")
