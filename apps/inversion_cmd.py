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

from starflow_mlx.apps.job_files import DEFAULT_MODEL

NOISE_SUFFIX = ".safetensors"
MAX_MASK_FRAMES = 10000  # frame numbers a --mask-frames list may name (far more than any clip has)


def _echo_warnings(caught) -> None:
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)


def _check_new(path: Path, overwrite: bool, suffixes: tuple[str, ...]) -> None:
    from starflow_mlx.apps.job_files import check_writable

    if path.suffix.lower() not in suffixes:
        raise ValueError(f"--output {path}: the file name must end in {' or '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists: pass --overwrite to replace it, or choose another name")
    check_writable(path)


def _read_source(source: Path, fps: Optional[int]):
    """The input, read before the model loads (a missing or broken file fails at once); whether it is a clip."""
    if source.suffix.lower() == ".mp4":
        from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS
        from starflow_mlx.pipelines.video_io import read_video

        return read_video(source, fps=fps or VIDEO_DEFAULTS["fps"])[0], True
    from starflow_mlx.io.image_input import open_image

    if fps is not None:
        raise ValueError("--fps is for an .mp4 input")
    return open_image(source), False


def _load(model: str, video: Optional[bool], dtype: Optional[str] = None):
    """The model's pipeline; ``video``: whether the input is a clip (None: not checked here)."""
    from starflow_mlx.pipelines.load import load_pipeline

    pipe = load_pipeline(model, dtype=dtype)
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
    from starflow_mlx.io.model_folder import model_record
    from starflow_mlx.pipelines.noise_file import save_noise
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
               and not getattr(pipe, "pixel_space", False), overwrite=overwrite)
    typer.echo(f"wrote {output} (noise of {source} as {prompt!r}, cfg {inverted.cfg:g})")


def generate_from_noise(*, path: Path, model: Optional[str], prompt: Optional[str], cfg: Optional[float],
                        jacobi: Optional[bool], output: Optional[Path], overwrite: bool, dtype: Optional[str],
                        unused: list[str]) -> None:
    """``starflow generate --from-noise FILE``: the noise decoded (under its prompt, the encoded input again)."""
    from starflow_mlx import __version__
    from starflow_mlx.io.model_folder import model_record
    from starflow_mlx.pipelines.noise_file import check_model, load_noise
    from starflow_mlx.pipelines.inversion import Inversion
    from starflow_mlx.pipelines.video_io import file_sha256

    if unused:
        raise ValueError(f"{unused[0]} has no effect with --from-noise: the noise fixes the image")
    arrays, meta = load_noise(path)
    if cfg is not None and cfg != meta["cfg"]:
        raise ValueError(f"{path} was encoded with cfg {meta['cfg']:g}: decoding it with --cfg {cfg:g} would not give "
                         "the input back (leave --cfg out, or use starflow edit to change the image)")
    from starflow_mlx.apps.metadata_paths import confirm_path

    model = confirm_path(meta["model"], model, "model", path)  # a local folder the file names: given again
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


def parse_frames(text: str, name: str = "--mask-frames") -> list[int]:
    """``0,2-4`` -> [0, 2, 3, 4]; ``name``: the option or field the text came from, for the error."""
    frames = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            span = range(int(first), int(last or first) + 1)
            if len(frames) + len(span) > MAX_MASK_FRAMES:  # before the list is made: "0-99999999999" is 14 bytes
                raise ValueError
            frames.extend(span)
    except ValueError:
        raise ValueError(f"{name} {text[:40]!r}: give frame numbers like 0,2-4") from None
    if not frames or min(frames) < 0:
        raise ValueError(f"{name} {text[:40]!r}: give frame numbers like 0,2-4")
    return sorted(set(frames))


def _recorded_input(given: Optional[Path], path: Optional[str], sha256: Optional[str], role: str,
                    made: Path) -> Optional[Path]:
    """The input an edit was made from, given again: a path from a file's metadata is never opened on its own
    (:mod:`starflow_mlx.apps.metadata_paths`), and the one given must hold the bytes the metadata records."""
    from starflow_mlx.pipelines.video_io import file_sha256
    from starflow_mlx.safe_text import printable

    if path is None:
        if given is not None:
            raise ValueError(f"{made} was made without a {role}: leave it out")
        return None
    if given is None:
        flag = "INPUT" if role == "input" else "--mask FILE"
        raise ValueError(f"{made}'s metadata names the {role} {printable(path, 300)}: a path from a file's metadata "
                         f"is opened only when given again, so pass {flag} with --from-metadata")
    if file_sha256(given) != sha256:
        raise ValueError(f"{given} is not the {role} {made} was made from (its sha256 differs): give that one")
    return given


def _read_mask(mask: Path, video: bool, job: dict):
    """The mask: an image, read before the model loads, or for a clip input an .mp4 of one mask frame per frame
    (checked to be a file here; the pipeline reads it at the input's frame rate)."""
    from starflow_mlx.pipelines.inversion import is_mask_clip

    if not is_mask_clip(mask):
        from starflow_mlx.io.image_input import open_image

        return open_image(mask, "mask")
    if not video:
        raise ValueError(f"--mask {mask}: a mask clip is for an .mp4 input; give an image mask for an image")
    if job["mask_frames"] is not None:
        raise ValueError("--mask-frames is for a mask image: a mask clip gives every frame its own mask already")
    from starflow_mlx.io.input_files import check_regular_file

    check_regular_file(mask, "mask")
    return mask


def edit(
    source: Optional[Path] = typer.Argument(None, readable=False, help="Image, or .mp4 for a video model (with "
                                                                       "--from-metadata: the input again, if it "
                                                                       "moved)."),
    to: Optional[str] = typer.Option(None, "--to", help="Prompt (class name) of the result."),
    source_prompt: Optional[str] = typer.Option(None, "--from", help="What the input shows (needed without --mask)."),
    mask: Optional[Path] = typer.Option(None, "--mask", readable=False, help="Image of the input's size: white is "
                                                                             "regenerated, every other pixel kept. "
                                                                             "Video: an image for every frame, or "
                                                                             "an .mp4 of one mask frame per input "
                                                                             "frame (cut at mid-grey)."),
    mask_frames: Optional[str] = typer.Option(None, "--mask-frames", help="Video: the frames a mask image applies "
                                                                          "to, e.g. 0,2-4 (default: all)."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Fresh noise mixed into the input's noise, "
                                                                      "0 (keep its structure) to 1 (a new sample); "
                                                                      "default 0."),
    method: Optional[str] = typer.Option(None, "--method", help="Inpainting: replace (known tokens held in every "
                                                                "block, default) or resample (known noise kept)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Inpainting: re-encode and redo this many times "
                                                                "(default 3 for replace, 4 for resample)."),
    seed: int = typer.Option(0, help="Seed of the fresh noise."),
    cfg: Optional[float] = typer.Option(None, help="Guidance weight (default: the model's)."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Video: the rate the clip is read and written at "
                                                          "(default 16)."),
    jacobi: bool = typer.Option(False, "--jacobi/--no-jacobi", help="Jacobi sampling (faster on a GPU, stops at a "
                                                                    "residual threshold) instead of sequential."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model folder, 'demo', 'demo-video', or a Hugging "
                                                                  "Face repo id."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Image file, or .mp4 (default: "
                                                                      "INPUT-edit.png or .mp4 here)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    from_metadata: Optional[Path] = typer.Option(None, "--from-metadata", readable=False,
                                                 help="Redo the edit this file records (its input and mask must "
                                                      "be the same files)."),
) -> None:
    """Edit an image or clip by prompt (--from A --to B), or regenerate the white part of --mask."""
    from starflow_mlx import __version__
    from starflow_mlx.io.edit_options import EditOptions
    from starflow_mlx.io.model_folder import model_record
    from starflow_mlx.pipelines import inversion
    from starflow_mlx.pipelines.video_io import file_sha256

    if from_metadata is not None:
        given = [flag for flag, value in (("--to", to), ("--from", source_prompt), ("--mask-frames", mask_frames),
                                          ("--strength", strength), ("--method", method), ("--rounds", rounds),
                                          ("--cfg", cfg), ("--fps", fps)) if value is not None]
        if given or seed != 0 or jacobi:
            raise ValueError(f"give {given[0] if given else '--seed or --jacobi'} or --from-metadata, not both "
                             "(the file records the edit's settings)")
        if from_metadata.suffix.lower() == ".mp4":
            from starflow_mlx.pipelines.video_io import read_metadata
        else:
            from starflow_mlx.pipelines.image_files import read_metadata
        meta = read_metadata(from_metadata)
        if "operation" not in meta:
            raise ValueError(f"{from_metadata} was not made by starflow edit: regenerate it with starflow generate "
                             "--from-metadata")
        job = EditOptions.from_metadata(meta, f"{from_metadata} has damaged edit metadata")
        source = _recorded_input(source, job["source"], job["source_sha256"], "input", from_metadata)
        mask = _recorded_input(mask, job["mask"], job["mask_sha256"], "mask", from_metadata)
        from starflow_mlx.apps.metadata_paths import confirm_path

        model = confirm_path(job["model"], None if model == DEFAULT_MODEL else model, "model", from_metadata)
    else:
        if source is None or to is None:
            raise ValueError("give the input and --to PROMPT (or --from-metadata FILE)")
        if mask is None:
            unused = [flag for flag, value in (("--mask-frames", mask_frames), ("--method", method),
                                               ("--rounds", rounds)) if value is not None]
            if unused:
                raise ValueError(f"{unused[0]} is for inpainting: give --mask too")
            if source_prompt is None:
                raise ValueError("give --from PROMPT: what the input shows (its noise is found under that prompt)")
        elif source_prompt is not None or strength is not None:
            raise ValueError(f"{'--from' if source_prompt is not None else '--strength'} has no effect with --mask: "
                             "the kept part is the input itself and the masked part is new")
        if method is not None and method not in inversion.METHODS:
            raise ValueError(f"--method must be {' or '.join(inversion.METHODS)}, got {method!r}")
        if strength is not None and not 0 <= strength <= 1:
            raise ValueError(f"--strength must be from 0 to 1, got {strength}")
        job = dict(operation="inpaint" if mask is not None else "edit", source_prompt=source_prompt, prompt=to,
                   strength=strength or 0.0, seed=seed, cfg=cfg, method=method, rounds=rounds, fps=fps,
                   mask_frames=parse_frames(mask_frames) if mask_frames is not None else None, jacobi=jacobi)
    picture, video = _read_source(source, job["fps"])
    if job["mask_frames"] is not None and not video:
        raise ValueError("--mask-frames is for an .mp4 input")
    if job["operation"] == "inpaint":
        mask_image = _read_mask(mask, video, job)
    output = output or Path(f"{source.stem}-edit{'.mp4' if video else '.png'}")
    _check_new(output, overwrite, (".mp4",) if video else (".png", ".jpg", ".jpeg", ".webp"))
    pipe = _load(model, video)
    job["cfg"] = inversion.guidance(pipe, job["cfg"])
    options = dict(seed=job["seed"], cfg=job["cfg"], fps=job["fps"], jacobi=job["jacobi"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if job["operation"] == "inpaint":
            job["method"] = job["method"] or "replace"
            job["rounds"] = job["rounds"] or inversion.DEFAULT_ROUNDS[job["method"]]
            result = pipe.inpaint(picture, mask_image, job["prompt"], method=job["method"], rounds=job["rounds"],
                                  mask_frames=job["mask_frames"], **options)
        else:
            result = pipe.edit(picture, job["source_prompt"], job["prompt"], strength=job["strength"], **options)
    _echo_warnings(caught)
    params = dict(job, model=model_record(model), source=str(source.resolve()), source_sha256=file_sha256(source),
                  mask=str(mask.resolve()) if mask is not None else None,
                  mask_sha256=file_sha256(mask) if mask is not None else None, version=__version__)
    from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

    _write(output, result, params, job["fps"] or VIDEO_DEFAULTS["fps"])
    typer.echo(f"wrote {output}")
