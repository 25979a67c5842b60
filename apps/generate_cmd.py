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


def run_with_progress(work):
    """``work(progress)`` under per-stage progress bars; warnings become one line each, stage times follow."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:>16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console) as bars:
        stages = StageProgress(bars)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = work(stages)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    console.print("  ".join(f"{label} {seconds:.2f}s" for label, seconds in stages.seconds.items()))
    return result


def run_generation(pipe, prompt: str, options: dict):
    return run_with_progress(lambda progress: pipe.generate(prompt, progress=progress, **options))


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
    aspect_ratio: Optional[str] = typer.Option(None, "--aspect-ratio", "-a",
                                               help="1:1, 2:3, 3:2, 16:9, 9:16, 4:5, 5:4, 21:9, 9:21 (default 1:1; "
                                                    "16:9 for video)."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images to generate (a grid with --output)."),
    jacobi: bool = typer.Option(True, "--jacobi/--no-jacobi", help="Block-wise Jacobi (fast) or sequential sampling."),
    jacobi_block_size: Optional[int] = typer.Option(None, help="Tokens solved together per Jacobi chunk "
                                                              "(default 64; 32 for video)."),
    jacobi_threshold: Optional[float] = typer.Option(None, help="Jacobi stops a chunk below this residual "
                                                               "(default 0.005; 0.001 for video)."),
    jacobi_max_iter: int = typer.Option(32, help="Most Jacobi iterations per chunk."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (a grid when -n > 1)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Folder for one PNG per image."),
    dtype: Optional[str] = typer.Option(None, help="Cast weights: float32, float16 or bfloat16."),
    from_metadata: Optional[Path] = typer.Option(None, "--from-metadata", help="Regenerate the PNG these parameters came from."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Video models: frames, 1 + 4k (default 81)."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Video models: frame rate in the prompt and the mp4 (default 16)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Video models: start the video from this image."),
    video: Optional[Path] = typer.Option(None, "--video", help="Video models: continue this clip (its frames come first)."),
) -> None:
    """Generate images (PNG) or, with a video model, mp4 videos; files carry their generation parameters."""
    from starflow_mlx import __version__
    from starflow_mlx.loading import parse_dtype
    from starflow_mlx.pipelines.image import Pipeline
    from starflow_mlx.pipelines.png import grid, save_pngs
    from starflow_mlx.pipelines.prompts import check_aspect_ratio

    index = None
    if from_metadata is not None and from_metadata.suffix.lower() == ".mp4":
        if prompt is not None:
            raise ValueError("give a prompt or --from-metadata VIDEO, not both")
        from starflow_mlx.apps.generate_video import video_options_from_metadata

        meta = video_options_from_metadata(from_metadata)
        prompt, model, seed, cfg, aspect_ratio = meta["prompt"], meta["model"], meta["seed"], meta["cfg"], meta["aspect_ratio"]
        num_images, frames, fps, jacobi = meta["num_videos"], meta["frames"], meta["fps"], meta["jacobi"]
        jacobi_block_size, jacobi_threshold = meta["jacobi_block_size"], meta["jacobi_threshold"]
        jacobi_max_iter, dtype, index = meta["jacobi_max_iter"], meta["dtype"], meta["index"]
        image = Path(meta["image"]) if meta["image"] else None
        video = Path(meta["video"]) if meta["video"] else None
        if output is None and output_dir is None:
            output = from_metadata.with_name(from_metadata.stem + "-again.mp4")
    elif from_metadata is not None:
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
    if aspect_ratio is not None:
        check_aspect_ratio(aspect_ratio)
    parse_dtype(dtype)
    pipe = Pipeline.from_pretrained(model, dtype=dtype)
    if pipe.VIDEO:
        return _generate_video(pipe, prompt, model, seed, cfg, aspect_ratio, num_images, jacobi, jacobi_block_size,
                               jacobi_threshold, jacobi_max_iter, output, output_dir, dtype, frames, fps, image, video,
                               index)
    aspect_ratio = aspect_ratio or "1:1"
    jacobi_block_size = 64 if jacobi_block_size is None else jacobi_block_size
    jacobi_threshold = 0.005 if jacobi_threshold is None else jacobi_threshold
    video_only = [name for name, value in (("--frames", frames), ("--fps", fps), ("--image", image), ("--video", video))
                  if value is not None]
    if video_only:
        raise ValueError(f"{video_only[0]} is for video models; {model} generates images")
    if output is not None and output.suffix.lower() != ".png":
        raise ValueError(f"--output {output}: the file name must end in .png")
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


def _generate_video(pipe, prompt, model, seed, cfg, aspect_ratio, num_videos, jacobi, jacobi_block_size,
                    jacobi_threshold, jacobi_max_iter, output, output_dir, dtype, frames, fps, image, video, index):
    from starflow_mlx import __version__
    from starflow_mlx.apps.generate_video import generate_video, output_items, report_memory, resolve_video_options

    chosen = resolve_video_options(cfg, aspect_ratio, frames, fps, jacobi_block_size, jacobi_threshold)
    options = dict(chosen, seed=seed, num_videos=num_videos, jacobi=jacobi, jacobi_max_iter=jacobi_max_iter,
                   image=str(image) if image else None, video=str(video) if video else None)
    params = dict(options, prompt=prompt, model=str(model), dtype=dtype, version=__version__)
    from starflow_mlx.pipelines.video import frame_count

    options["frames"] = params["frames"] = frame_count(options["frames"])
    items = output_items(params, num_videos, output, output_dir, index, f"{seed:06d}")
    written = run_with_progress(lambda progress: generate_video(pipe, prompt, options, items, progress))
    for path, _, _ in items:
        typer.echo(f"wrote {path} ({written} frames at {options['fps']} fps)")
    report_memory()


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
