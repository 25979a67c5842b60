"""The video branch of ``starflow generate``: mp4s streamed as the VAE decodes, parameters in their metadata."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

# Upstream's video script's values for options every video model shares (frames, cfg and aspect ratio depend on it).
SCRIPT_DEFAULTS = ("fps", "jacobi")
SAMPLING_KEYS = ("seed", "cfg", "aspect_ratio", "num_videos", "frames", "fps", "jacobi", "jacobi_block_size",
                 "jacobi_threshold", "jacobi_max_iter", "image", "video", "kv_bits")


def video_options_from_metadata(path: Path) -> dict:
    """The job an mp4's metadata describes, through the typed, bounded validator (files come from anyone)."""
    from starflow_mlx.io.generation_options import VideoOptions
    from starflow_mlx.pipelines.video_io import read_metadata

    from starflow_mlx.apps.job_files import refuse_edits

    meta = read_metadata(path)
    refuse_edits(path, meta)
    return VideoOptions.from_metadata(meta, f"{path} has damaged starflow-mlx metadata")


def check_mp4(path: Path) -> None:
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--output {path}: a video model writes .mp4 files")
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder: give a file name ending in .mp4")


def report_memory() -> str:
    """MLX's peak allocation and the process's peak resident memory (what the OS had to give)."""
    import resource
    import sys

    import mlx.core as mx

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"peak memory: {mx.get_peak_memory() / 2**30:.2f} GB in MLX arrays, {rss / 2**30:.2f} GB resident"


def generate_video(*, prompt, model, seed, cfg, aspect_ratio, num_videos, jacobi, jacobi_block_size,
                   jacobi_threshold, jacobi_max_iter, output, output_dir, overwrite, dtype, from_metadata,
                   frames, fps, image, video, vae_tile, kv_bits, pipeline=False, lora=None, lora_scale=1.0,
                   model_given=True) -> None:
    """``starflow generate`` on a video model: options (or an mp4's metadata) -> sampled, decoded, streamed mp4s.

    ``model_given``: whether --model was given (not its default), which a model folder from metadata needs."""
    from starflow_mlx import __version__
    from starflow_mlx.apps import generate_distributed as dist
    from starflow_mlx.apps.job_files import check_model_kind, check_writable, plan_outputs, ran_settings
    from starflow_mlx.io.loading import parse_dtype
    from starflow_mlx.io.model_folder import model_record
    from starflow_mlx.sampling.auto import JACOBI_SETTINGS, jacobi_settings
    from starflow_mlx.pipelines.prompts import check_aspect_ratio
    from starflow_mlx.apps.metadata_paths import confirm_adapters, confirm_input, confirm_path
    from starflow_mlx.io.adapters import adapter_record
    from starflow_mlx.pipelines.video import VideoPipeline, frame_count
    from starflow_mlx.pipelines.video_io import grid_layout, input_record, write_videos

    chosen = dict(prompt=prompt, model=model, seed=seed, cfg=cfg, aspect_ratio=aspect_ratio, num_videos=num_videos,
                  frames=frames, fps=fps, jacobi=jacobi, jacobi_block_size=jacobi_block_size,
                  jacobi_threshold=jacobi_threshold, jacobi_max_iter=jacobi_max_iter, kv_bits=kv_bits,
                  image=None, video=None, image_sha256=None, video_sha256=None, dtype=dtype, index=None,
                  lora=lora, lora_scale=lora_scale)
    inputs = (("image", image), ("video", video))
    default = None
    if from_metadata is None:
        for role, path in inputs:  # recorded by absolute path and content, for --from-metadata anywhere
            if path is not None:
                chosen[role], chosen[f"{role}_sha256"] = input_record(path, role)
    else:
        if prompt is not None:
            raise ValueError("give a prompt or --from-metadata VIDEO, not both")
        chosen = ran_settings(video_options_from_metadata(from_metadata))
        chosen["model"] = confirm_path(chosen["model"], model if model_given else None, "model", from_metadata)
        check_model_kind(chosen["model"], True, from_metadata)
        chosen["lora"] = confirm_adapters(chosen.get("lora"), lora, from_metadata)
        for role, path in inputs:
            chosen[role], chosen[f"{role}_sha256"] = confirm_input(chosen[role], chosen[f"{role}_sha256"], path, role,
                                                                   from_metadata)
        default = from_metadata.with_name(from_metadata.stem + "-again.mp4")
    if chosen["prompt"] is None:
        raise ValueError("give a prompt (or --from-metadata VIDEO)")
    # Unset options take upstream's video-script values (the sampler: the faster one on this device, as for
    # images; both slide the window past the training length); frames, guidance and shape follow the model.
    job = {key: VIDEO_DEFAULTS[key] if chosen.get(key) is None and key in SCRIPT_DEFAULTS else chosen[key]
           for key in chosen}
    if job["aspect_ratio"] is not None:
        check_aspect_ratio(job["aspect_ratio"])
    if job["frames"] is not None:
        frame_count(job["frames"], 1)  # the range, before the model loads; its frame rule comes after
    parse_dtype(job["dtype"])
    index = job["index"]
    wanted = range(index, index + 1) if index is not None else range(job["num_videos"])
    plan = plan_outputs(job["prompt"], job["seed"], wanted, output, output_dir, overwrite, default, suffix=".mp4",
                        check_format=check_mp4)
    for path in plan.paths:
        check_writable(path)
    if vae_tile is not None and vae_tile < 2:
        raise ValueError(f"--vae-tile must be at least 2 latent cells, got {vae_tile}")
    dist.check_before_connecting(job["model"], job["prompt"])
    world = dist.open_world(pipeline)
    layers = dist.deep_layers(world, job["model"], pipeline)
    pipe = VideoPipeline.from_pretrained(job["model"], dtype=job["dtype"], lora=job["lora"],
                                         lora_scale=job["lora_scale"], layers=layers)
    if vae_tile is not None and pipe.pixel_space:
        raise ValueError(f"--vae-tile: {job['model']} works on pixels and has no VAE to tile")
    pipe.vae.tile = vae_tile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job["frames"] = pipe.frame_count(job["frames"])
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    job["aspect_ratio"] = job["aspect_ratio"] or pipe.default_aspect_ratio
    job["cfg"] = pipe.default_cfg if job["cfg"] is None else job["cfg"]
    # The file records the sampler that ran, and the Jacobi settings only when Jacobi ran.
    job["jacobi"], settings = jacobi_settings(job["jacobi"], pipe.config, VIDEO_DEFAULTS,
                                              **{key: job[key] for key in JACOBI_SETTINGS})
    options = {key: settings.get(key, job[key]) for key in SAMPLING_KEYS if key not in JACOBI_SETTINGS or settings}
    params = dict(options, prompt=job["prompt"], model=model_record(job["model"]), dtype=job["dtype"],
                  version=__version__, image_sha256=job["image_sha256"], video_sha256=job["video_sha256"],
                  lora=adapter_record(job["lora"]), lora_scale=job["lora_scale"])
    if index is not None:  # video i of a batch is drawn from seed + i: make just that one
        options.update(seed=job["seed"] + index, num_videos=1)
    # Each file: its parameters and which video of the sampled batch it shows (None: all of them, in a grid).
    if plan.file is not None:
        single = len(wanted) == 1
        items = [(plan.file, dict(params, index=wanted.start if single else None), 0 if single else None)]
    else:
        items = [(path, dict(params, index=i), i - wanted.start) for i, path in plan.names.items()]
    with dist.stage_progress(world) as stages, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dist.data_parallel(world, layers):  # each rank its videos; rank 0 writes them all
            chunks = dist.sample_videos(world, pipe, job["prompt"], options, stages)
        else:
            with world.sampling():  # samples now; the frames are decoded as they are written (rank 0 only)
                chunks = pipe.stream(job["prompt"], progress=world.beating(stages), **options)
        written = write_videos(chunks, items, options["fps"], overwrite) if world.is_main else 0
    if not world.is_main:
        return
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    stages.log(stages.summary())
    stages.log(report_memory())
    height, width = pipe.frame_size(job["aspect_ratio"])
    shape = f"{written} frames of {width}x{height} at {options['fps']} fps"
    if plan.file is not None and len(wanted) > 1:  # one file for several videos: say how they share it
        _, _, grid_h, grid_w = grid_layout(len(wanted), height, width)
        shape = (f"{len(wanted)} videos side by side in one {grid_w}x{grid_h} grid, {shape} each; --output-dir DIR "
                 "writes one file per video")
    for path in plan.paths:
        typer.echo(f"wrote {path} ({shape})" + (f" ({plan.taken} exists)" if plan.taken else ""))
