"""``starflow encode``, ``starflow edit`` and ``starflow generate --from-noise``: the flow run backwards.

``encode`` writes an image's (or clip's) exact noise to a safetensors file; ``generate --from-noise``
decodes it (under its prompt: the input again); ``edit`` inverts an input and decodes it under
another prompt, or with ``--mask`` regenerates the mask's white part and keeps every other pixel.
Outputs record their inputs by path and sha256, so ``edit --from-metadata OUT`` redoes an edit.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from starflow_mlx.apps.generate_cmd import DEFAULT_MODEL

NOISE_SUFFIX = ".safetensors"
EDIT_KEYS = ("operation", "source_prompt", "prompt", "strength", "seed", "cfg", "method", "rounds", "mask_frames",
             "fps", "jacobi")


def _echo_warnings(caught) -> None:
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)


def _check_new(path: Path, overwrite: bool, suffixes: tuple[str, ...]) -> None:
    from starflow_mlx.apps.generate_cmd import check_writable

    if path.suffix.lower() not in suffixes:
        raise ValueError(f"--output {path}: the file name must end in {' or '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists: pass --overwrite to replace it, or choose another name")
    check_writable(path)


def _read_source(source: Path, fps: Optional[int]):
    """The input, read before the model loads (a missing or broken file fails at once); whether it is a clip."""
    if source.suffix.lower() == ".mp4":
        from starflow_mlx.pipelines.video import VIDEO_DEFAULTS
        from starflow_mlx.pipelines.video_io import read_video

        return read_video(source, fps=fps or VIDEO_DEFAULTS["fps"])[0], True
    from starflow_mlx.image_input import open_image

    if fps is not None:
        raise ValueError("--fps is for an .mp4 input")
    return open_image(source), False


def _load(model: str, video: Optional[bool], dtype: Optional[str] = None):
    """The model's pipeline; ``video``: whether the input is a clip (None: not checked here)."""
    from starflow_mlx.pipelines.image import Pipeline

    pipe = Pipeline.from_pretrained(model, dtype=dtype)
    if video is not None and video != pipe.VIDEO:
        raise ValueError(f"{model} is {'a video' if pipe.VIDEO else 'an image'} model: give it "
                         f"{'an .mp4' if pipe.VIDEO else 'an image'}")
    return pipe


def _write(path: Path, result, params: dict, fps: int) -> None:
    if isinstance(result, (list, tuple)) or getattr(result, "ndim", 0) == 4:
        from starflow_mlx.pipelines.video_io import write_mp4

        write_mp4(path, result, fps, params)
    else:
        from starflow_mlx.pipelines.image_files import save_images

        save_images([(result, path, params)])


def encode(
    source: Path = typer.Argument(..., readable=False, help="Image, or .mp4 for a video model."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="What the input shows (a class name for class models)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model folder, 'demo', 'demo-video', or a Hugging "
                                                                  "Face repo id."),
    cfg: Optional[float] = typer.Option(None, help="Guidance weight the noise is for (default: the model's); "
                                                   "decoding must use the same."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Video: the rate the clip is read at (default 16)."),
    output: Path = typer.Option(..., "--output", "-o", help="Noise file to write (.safetensors)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Write the exact noise that sampling PROMPT maps back to the input (the flow's forward pass)."""
    from starflow_mlx.model_folder import model_record
    from starflow_mlx.noise_file import save_noise
    from starflow_mlx.pipelines.video_io import input_record

    _check_new(output, overwrite, (NOISE_SUFFIX,))
    picture, video = _read_source(source, fps)
    path, sha = input_record(source, "input")
    pipe = _load(model, video)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inverted = pipe.invert(picture, prompt, cfg=cfg, fps=fps)
    _echo_warnings(caught)
    save_noise(output, inverted, model_record(model), pipe.folder, path, sha, latent=pipe.vae is not None
               and not getattr(pipe, "pixel_space", False))
    typer.echo(f"wrote {output} (noise of {source} as {prompt!r}, cfg {inverted.cfg:g})")


def generate_from_noise(*, path: Path, model: Optional[str], prompt: Optional[str], cfg: Optional[float],
                        jacobi: Optional[bool], output: Optional[Path], overwrite: bool, dtype: Optional[str],
                        unused: list[str]) -> None:
    """``starflow generate --from-noise FILE``: the noise decoded (under its prompt, the encoded input again)."""
    from starflow_mlx import __version__
    from starflow_mlx.model_folder import model_record
    from starflow_mlx.noise_file import check_model, load_noise
    from starflow_mlx.pipelines.inversion import Inversion
    from starflow_mlx.pipelines.video_io import file_sha256

    if unused:
        raise ValueError(f"{unused[0]} has no effect with --from-noise: the noise fixes the image")
    arrays, meta = load_noise(path)
    if cfg is not None and cfg != meta["cfg"]:
        raise ValueError(f"{path} was encoded with cfg {meta['cfg']:g}: decoding it with --cfg {cfg:g} would not give "
                         "the input back (leave --cfg out, or use starflow edit to change the image)")
    model = model or meta["model"]
    video = arrays["noise"].ndim == 5
    output = output or Path(path.name[: -len(NOISE_SUFFIX)] if path.name.endswith(NOISE_SUFFIX) else path.stem) \
        .with_suffix(".mp4" if video else ".png")
    _check_new(output, overwrite, (".mp4",) if video else (".png", ".jpg", ".jpeg", ".webp"))
    pipe = _load(model, None, dtype)
    check_model(path, meta, arrays["noise"], pipe, model)
    inverted = Inversion(arrays["noise"], arrays.get("latents"), meta["prompt"], meta["cfg"], meta["aspect_ratio"],
                         meta["fps"])
    prompt = meta["prompt"] if prompt is None else prompt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe.from_noise(inverted, prompt, jacobi=jacobi or False)
    _echo_warnings(caught)
    params = dict(operation="from-noise", prompt=prompt, model=model_record(model), cfg=meta["cfg"],
                  noise=str(path.resolve()), noise_sha256=file_sha256(path), jacobi=bool(jacobi), version=__version__)
    _write(output, result, params, meta["fps"] or 16)
    typer.echo(f"wrote {output}")
