"""``starflow coreml-video``: an mp4 from a Core ML STARFlow-V export, the loop driven by the host.

Core ML on macOS 15+, or the numpy interpreter anywhere (``--interpreter``); the noise is drawn as
``starflow generate`` draws it, so a seed starts from the same noise as the MLX pipeline.
``--report`` prints each package's prediction seconds and how much of the other packages' time
ran while the deep block was predicting (the pipelining the export is shaped for).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS


def prompt_tokens(folder: Path, manifest, prompt: str, fps: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The training template filled in for [prompts; empty prompts] and tokenized with the export's tokenizer/."""
    from starflow_mlx.io.text_encoder import load_tokenizer

    v = manifest.video
    template = v.prompt_template if frames > 1 else v.image_prompt_template
    texts = [template.replace("{prompt}", p).replace("{fps}", str(fps)) for p in (prompt, "")]
    rows = [texts[0]] * manifest.batch + ([texts[1]] * manifest.batch if manifest.guided else [])
    tokens = load_tokenizer(folder / "tokenizer")(rows, padding="max_length", truncation=True,
                                                  max_length=manifest.text_length, return_tensors="np")
    return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)


def first_frame(path: Path, manifest, batch_keys: list) -> tuple[np.ndarray, np.ndarray]:
    """The picture covered and cropped to the frame, (batch, 1, H', W', 3) in [-1, 1], and its latent noise."""
    import mlx.core as mx
    from PIL import Image

    from starflow_mlx.io.image_input import open_image
    from starflow_mlx.pipelines.video import cover_crop

    f = manifest.video.pixel_factor
    h, w, c = manifest.latent_shape
    # A pixel-space model's frames are reduced by block averages, as VideoPipeline.resample does.
    resample = Image.BOX if manifest.video.pixel_space else Image.BILINEAR
    pixels, changed = cover_crop(open_image(path), h * f, w * f, resample)
    if changed:
        typer.echo(f"warning: the image is resized to cover {w * f}x{h * f} and centre-cropped", err=True)
    noise = np.concatenate([np.array(mx.random.normal((1, 1, h, w, c), key=k[1])) for k in batch_keys])
    return np.broadcast_to(pixels, (manifest.batch, 1, *pixels.shape)), noise


def to_uint8(chunk: np.ndarray) -> np.ndarray:
    return np.clip((chunk + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def coreml_video(
    folder: Path = typer.Argument(..., help="A folder written by starflow export-coreml from a full STARFlow-V "
                                            "model folder (text encoder and VAE packages), or from a class "
                                            "model in pixel space (demo-video)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="What the video shows (a class model: one of its "
                                                          "classes)."),
    output: Path = typer.Option(..., "--output", "-o", readable=False, help="The .mp4 to write."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Pixel frames, 1 + 4k (default 81); a pixel-space "
                                                                "model: any count (default its training length)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Start from this picture (image-to-video: the VAE "
                                                               "encoder package, then the known-frame prefix)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed (video i of a batch uses seed + i)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance weight (default: the export's)."),
    fps: int = typer.Option(VIDEO_DEFAULTS["fps"], "--fps", help="Frames per second (in the prompt and the file)."),
    interpreter: bool = typer.Option(False, "--interpreter", help="Run the packages with the numpy interpreter "
                                                                  "(any system, slow) instead of Core ML (macOS 15+)."),
    report: bool = typer.Option(False, "--report", help="Print prediction seconds per package and the overlap "
                                                        "with the deep block."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output instead of refusing."),
) -> None:
    """Make a video with the Core ML packages of a STARFlow-V export: text encoder, deep and shallow blocks,
    denoiser and VAE decoder (and the VAE encoder with --image), pipelined as the manifest describes."""
    import mlx.core as mx

    from starflow_mlx.apps.job_files import check_writable
    from starflow_mlx.apps.generate_video import check_mp4
    from starflow_mlx.coreml.driver import CoreMLBackend, DriverError, InterpreterBackend
    from starflow_mlx.coreml.manifest import ExportManifest
    from starflow_mlx.coreml.timing import TimedBackend
    from starflow_mlx.coreml.video_driver import VideoSampler
    from starflow_mlx.pipelines.video import frame_count
    from starflow_mlx.pipelines.video_io import write_videos
    from starflow_mlx.progress import StageProgress

    check_mp4(output)
    check_writable(output)
    manifest = ExportManifest.load(folder)
    if manifest.video is None:
        raise DriverError(f"{folder} is an image export: coreml-video drives STARFlow-V exports")
    roles = {p.role for p in manifest.packages}
    needed = set() if manifest.classes else {"text_encoder"}
    needed |= set() if manifest.video.pixel_space else {"video_vae_decoder"}
    if not needed <= roles:
        raise DriverError(f"{folder} has no text encoder or VAE decoder package: export a full STARFlow-V model "
                          "folder (converted with its T5 and VAE)")
    if not 0 <= seed <= 2**63 - manifest.batch:
        raise ValueError(f"--seed must be 0 or more and below 2**63 (video i uses seed + i), got {seed}")
    if cfg is not None and not 0 <= cfg < math.inf:  # NaN fails too
        raise ValueError(f"--cfg must be 0 or more, got {cfg}")
    if not 1 <= fps <= 120:
        raise ValueError(f"--fps must be a whole number from 1 to 120, got {fps}")
    if not interpreter and sys.platform != "darwin":
        raise DriverError("Core ML predictions need macOS 15+: pass --interpreter to run the packages with the "
                          "numpy interpreter")
    factor = manifest.video.frames_per_latent
    default = manifest.video.window_frames if manifest.video.pixel_space else VIDEO_DEFAULTS["frames"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = frame_count(default if frames is None else frames, factor)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    latent_frames = (frames - 1) // factor + 1
    if image is not None and latent_frames < 2:
        raise DriverError(f"--image is the first frame: ask for at least {factor + 1} --frames, got {frames}")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists: pass --overwrite to replace it, or choose another name")
    inner = InterpreterBackend(folder, manifest) if interpreter else CoreMLBackend(folder, manifest)
    backend = TimedBackend(inner)
    sampler = VideoSampler(folder, backend)
    if manifest.classes:
        conditioning = sampler.label_features(prompt)
    else:
        conditioning = sampler.prompt_features(*prompt_tokens(folder, manifest, prompt, fps, frames))
    # As VideoPipeline.sample: video i's noise from seed + i, its first key for z, its second for the known frames.
    keys = [mx.random.split(mx.random.key(seed + i)) for i in range(manifest.batch)]
    z = np.concatenate([np.array(mx.random.normal((1, latent_frames, *manifest.latent_shape), key=k[0]))
                        for k in keys])
    pixels, noise = first_frame(image, manifest, keys) if image is not None else (None, None)
    with StageProgress() as stages:
        _, chunks = sampler.stream(conditioning, z, cfg, frames=pixels, noise=noise, progress=stages)
    params = {"prompt": prompt, "seed": seed, "cfg": cfg, "frames": frames, "fps": fps, "coreml": str(folder),
              "image": str(image) if image else None}
    written = write_videos((to_uint8(c) for c in chunks), [(output, params, 0 if manifest.batch == 1 else None)],
                           fps, overwrite)
    if report:
        for line in backend.report().lines():
            typer.echo(line)
    typer.echo(f"wrote {output} ({written} frames at {fps} fps)")
