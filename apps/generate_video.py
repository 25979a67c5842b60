"""The video branch of ``starflow generate``: mp4s streamed as the VAE decodes, parameters in their metadata."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from starflow_mlx.pipelines.video import VIDEO_DEFAULTS

NUMBER = (int, float)
OPTIONAL_STR = (str, type(None))
# Everything that decides the frames, as stored in each mp4 and read back by --from-metadata, with its type.
VIDEO_KEYS = {"prompt": str, "model": str, "seed": int, "cfg": NUMBER, "aspect_ratio": str, "num_videos": int,
              "frames": int, "fps": int, "jacobi": bool, "jacobi_block_size": int, "jacobi_threshold": NUMBER,
              "jacobi_max_iter": int, "image": OPTIONAL_STR, "video": OPTIONAL_STR, "dtype": OPTIONAL_STR,
              "index": (int, type(None))}
VIDEO_SUFFIXES = (".mp4",)


def video_options_from_metadata(path: Path) -> dict:
    from starflow_mlx.pipelines.video_io import read_metadata

    meta = read_metadata(path)
    wrong = [key for key, kind in VIDEO_KEYS.items() if not isinstance(meta.get(key), kind)
             or (kind is int and isinstance(meta.get(key), bool))]
    if wrong:
        raise ValueError(f"{path} has damaged starflow-mlx metadata ({', '.join(wrong)} missing or mistyped)")
    return {key: meta[key] for key in VIDEO_KEYS}


def resolve_video_options(cfg, aspect_ratio, frames, fps, jacobi_block_size, jacobi_threshold) -> dict:
    """The script's defaults (cfg 3.5, 16:9, 81 frames at 16 fps, Jacobi block 32, threshold 0.001) for unset options."""
    chosen = dict(cfg=cfg, aspect_ratio=aspect_ratio, frames=frames, fps=fps, jacobi_block_size=jacobi_block_size,
                  jacobi_threshold=jacobi_threshold)
    return {key: VIDEO_DEFAULTS[key] if value is None else value for key, value in chosen.items()}


def output_items(params: dict, count: int, output: Path | None, output_dir: Path | None, index: int | None,
                 name: str) -> list[tuple[Path, dict, int | None]]:
    """(path, params, which video) per file: one grid mp4 with --output, one mp4 per video with --output-dir."""
    if output is not None:
        if output.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"--output {output}: a video model writes .mp4 files")
        single = count == 1 or index is not None
        pick = index if index is not None else (0 if single else None)
        return [(output, dict(params, index=pick), pick)]
    return [(output_dir / f"{name}-{i:03d}.mp4", dict(params, index=i), i) for i in range(count)]


def check_writable(path: Path) -> None:
    """Fail before minutes of sampling, not after, when an output cannot be created."""
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder: give a file name ending in .mp4")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {parent} is not a writable folder")


def generate_video(pipe, prompt: str, options: dict, items: list[tuple[Path, dict, int | None]], progress) -> int:
    """Sample, denoise, then decode straight into the mp4s; returns the frames written per file."""
    from starflow_mlx.pipelines.video_io import write_videos

    for path, _, _ in items:
        check_writable(path)
    latents = pipe.sample(prompt, progress=progress, **options)
    if pipe.release_if_short(latents.shape[1], latents.shape[0], options["aspect_ratio"]):
        typer.echo("memory is short: the flow was released before the VAE decode", err=True)
    return write_videos(pipe.decode_frames(latents, progress), items, options["fps"])


def report_memory() -> None:
    """MLX's peak allocation and the process's peak resident memory (what the OS had to give)."""
    import resource
    import sys

    import mlx.core as mx

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    typer.echo(f"peak memory: {mx.get_peak_memory() / 2**30:.2f} GB in MLX arrays, {rss / 2**30:.2f} GB resident",
               err=True)
