"""``starflow generate`` and ``starflow score``.

``generate`` reads its options (or an image's metadata), plans the output files and checks
the whole job (memory for one batch and for a grid, disk for every file) before sampling,
then samples batch by batch; with ``--output-dir`` each batch's files are written as soon
as they are decoded, so a long job never holds more than one batch.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from starflow_mlx.apps.job_files import (DEFAULT_MODEL, OutputPlan, check_model_kind, check_writable, model_is_video,
                                        plan_outputs, ran_settings, refuse_edits)
from starflow_mlx.apps.lora_options import Lora, LoraScale

BATCH_KEY = "batch_size"  # absent from files written before batching: those were sampled in one batch
SAMPLING_KEYS = ("seed", "cfg", "aspect_ratio", "num_images", "jacobi", "jacobi_block_size", "jacobi_threshold",
                 "jacobi_max_iter", "kv_bits")


# -- options ---------------------------------------------------------------------------------
def options_from_metadata(path: Path) -> dict:
    """The job an image's metadata describes, through the typed, bounded validator (files come from anyone)."""
    from starflow_mlx.io.generation_options import GenerationOptions
    from starflow_mlx.pipelines.image_files import read_metadata

    meta = read_metadata(path)
    refuse_edits(path, meta)
    options = GenerationOptions.from_metadata(meta, f"{path} has damaged starflow-mlx metadata")
    # Files written before batching were sampled in one batch.
    options[BATCH_KEY] = options[BATCH_KEY] or options["num_images"]
    return options


def check_job(pipe, plan: OutputPlan, count: int, aspect_ratio: str) -> None:
    """Refuse, before sampling, a grid larger than memory or files larger than the free disk."""
    from PIL import Image

    from starflow_mlx.io.memory import InsufficientMemoryError, memory_limit, needed_bytes
    from starflow_mlx.pipelines.image_files import file_bytes, grid_shape

    width, height, channels = pipe.image_size(aspect_ratio)
    if plan.file is not None and count > 1:
        cols, rows = grid_shape(count)
        if cols * width * rows * height > Image.MAX_IMAGE_PIXELS:
            # Pillow, and so --from-metadata and score, would refuse to open it as a decompression bomb.
            raise ValueError(f"a grid of {count} images would be {cols * width}x{rows * height} pixels, more than "
                             f"image readers open ({Image.MAX_IMAGE_PIXELS} pixels): write one file per image with "
                             "--output-dir DIR, or ask for fewer images")
        # The images and the canvas they are pasted on are both in memory.
        grid_bytes = 2 * cols * rows * width * height * channels
        total = memory_limit()
        needed = needed_bytes(pipe.folder, pipe.config, 1) + grid_bytes
        if total is not None and needed > total:
            raise InsufficientMemoryError(
                f"a grid of {count} images needs about {needed / 2**30:.1f} GB of memory but {total / 2**30:.1f} GB "
                "is available: write one file per image with --output-dir DIR, or ask for fewer images")
        need = {plan.file.parent: file_bytes(cols * width, rows * height, channels)}
    else:
        need = {}
        for path in plan.paths:
            need[path.parent] = need.get(path.parent, 0) + file_bytes(width, height, channels)
    for folder, size in need.items():
        existing = next(p for p in (folder, *folder.parents) if p.exists())  # the folder may not exist yet
        free = shutil.disk_usage(existing).free
        if size > free:
            raise OSError(f"the images need up to {size / 2**30:.2f} GB in {folder} but only {free / 2**30:.2f} GB "
                          "is free: free some space, or ask for fewer images")


def is_video_job(model: str, from_metadata: Optional[Path]) -> bool:
    """An mp4 to regenerate, a folder (or built-in model) whose manifest says it makes videos, or a registered
    video model."""
    if from_metadata is not None:
        return from_metadata.suffix.lower() == ".mp4"
    return bool(model_is_video(model))


# -- resuming --------------------------------------------------------------------------------
def written_image(path: Path) -> Optional[dict]:
    """The metadata of a whole image file written here, or None (not ours, damaged, cut short)."""
    from starflow_mlx.io.image_input import open_image
    from starflow_mlx.pipelines.image_files import read_metadata

    try:
        open_image(path).load()  # every pixel decodes: the file is complete
        return read_metadata(path)
    except (OSError, ValueError):
        return None


def resumable_batch_size(plan: OutputPlan) -> Optional[int]:
    """The batch size the interrupted job recorded (image i's pixels depend on its batch), if a file says."""
    for path in plan.names.values():
        meta = written_image(path) if path.exists() else None
        if meta is not None and isinstance(meta.get(BATCH_KEY), int):
            return meta[BATCH_KEY]
    return None


def finished_images(plan: OutputPlan, params: dict, overwrite: bool) -> set[int]:
    """Indices whose file already holds that image of this job (``--resume``); any other file is refused."""
    done = set()
    for index, path in plan.names.items():
        if not path.exists():
            continue
        meta = written_image(path)
        expected = dict(params, index=index)
        if meta is not None and all(meta.get(key) == value for key, value in expected.items() if key != "version"):
            done.add(index)
        elif not overwrite:
            raise ValueError(f"{path} exists but is not image {index} of this job (other options, or damaged): "
                             "run the interrupted command again with --resume, or pass --overwrite to replace it")
    return done


# -- running ---------------------------------------------------------------------------------
def run_batches(pipe, prompt: str, options: dict, plan: OutputPlan, params: dict, wanted: range,
                batch_size: int, stages, world, output_dir: Optional[Path] = None, done: frozenset = frozenset(),
                overwrite: bool = False) -> list:
    """Sample ``wanted`` batch by batch; files of a folder (``output_dir``) are written per batch (by rank 0 of a
    pipelined ``world``; by the only rank otherwise), a grid's images returned.

    ``done``: images already written; a batch holding only those is skipped, and batches stay cut where
    the whole job cuts them, so every image comes out as in an uninterrupted run. Before a batch's files are
    written the ranks check that every one took part to the end (``world.verify``); while they are written
    the rank waits on nobody (``world.writing``), and after, ``world.wrote`` knows how many are on disk.
    """
    from starflow_mlx.pipelines.image_files import save_images

    spans = [(wanted.start, wanted.stop)]
    if done:
        spans = [(first, min(first + batch_size, wanted.stop)) for first in range(wanted.start, wanted.stop, batch_size)
                 if not set(range(first, min(first + batch_size, wanted.stop))) <= done]
    kept = []
    count = len(done)
    stages("images", count, len(wanted))
    for start, stop in spans:
        for first, images in pipe.generate_batches(prompt, progress=stages, batch_size=batch_size,
                                                   images=(start, stop), **options):
            world.verify()
            count += sum(first + k not in done for k in range(len(images)))
            if plan.file is None and world.is_main:
                with world.writing():
                    save_images([(image, plan.names[first + k], dict(params, index=first + k))
                                 for k, image in enumerate(images) if first + k not in done], overwrite)
                    world.wrote(count, len(wanted), output_dir)
            elif plan.file is not None:
                kept.extend(images)
            stages("images", count, len(wanted))
    return kept


def write_file(plan: OutputPlan, images: list, params: dict, index: Optional[int], overwrite: bool = False) -> None:
    from starflow_mlx.pipelines.image_files import grid, save_images

    single = len(images) == 1
    save_images([(images[0] if single else grid(images), plan.file, dict(params, index=index if single else None))],
                overwrite)


def generate(
    prompt: Optional[str] = typer.Argument(None, help="Text prompt, or a class name for class models ('7' for the demo)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model folder, 'demo', 'demo-video', or a Hugging Face repo id."),
    seed: int = typer.Option(0, help="Noise seed (image i uses seed + i): same seed and options give the same bytes."),
    cfg: Optional[float] = typer.Option(None, help="Guidance weight (default: the model's)."),
    aspect_ratio: Optional[str] = typer.Option(None, "--aspect-ratio", "-a",
                                               help="1:1, 2:3, 3:2, 16:9, 9:16, 4:5, 5:4, 21:9, 9:21 (default 1:1; "
                                                    "16:9 for video models trained on several)."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images to generate (a grid in one file without --output-dir)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images sampled together (default: what memory allows, at most 16)."),
    jacobi: Optional[bool] = typer.Option(None, "--jacobi/--no-jacobi", show_default=False,
                                          help="Block-wise Jacobi or sequential sampling (default: the faster one "
                                               "on this device: sequential on a CPU, Jacobi on a GPU)."),
    jacobi_block_size: Optional[int] = typer.Option(None, help="Tokens solved together per Jacobi chunk "
                                                              "(default 64; 32 for video). Any --jacobi-* "
                                                              "option selects Jacobi."),
    jacobi_threshold: Optional[float] = typer.Option(None, help="Jacobi stops a chunk below this residual "
                                                               "(default 0.005; 0.001 for video)."),
    jacobi_max_iter: Optional[int] = typer.Option(None, help="Most Jacobi iterations per chunk (default 32)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Keep the KV caches quantized to 8 or 4 bits: "
                                                                  "about half or a quarter of float16's memory, "
                                                                  "samples change slightly (default: float)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Image file (.png, .jpg, .webp; a grid when -n > 1), "
                                                                      ".mp4 for video models. Default: "
                                                                      "PROMPT-seedSEED.png (.mp4) here."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Folder for one PNG per image, named PROMPT-seedSEED-INDEX.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files instead of refusing."),
    resume: bool = typer.Option(False, "--resume", help="With --output-dir: keep the images an interrupted run of "
                                                        "this same command wrote and make the rest."),
    dtype: Optional[str] = typer.Option(None, help="Cast weights: float32, float16 or bfloat16 (default: as stored; "
                                                   "float32 scales for quantized models on a CPU)."),
    from_metadata: Optional[Path] = typer.Option(None, "--from-metadata", readable=False,
                                                 help="Regenerate the image or mp4 these "
                                                                               "parameters came from."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Video models: frames, 1 + 4k with the Wan VAE "
                                        "(default: the model's training length, 81 for STARFlow-V)."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Video models: frame rate, in the prompt and the mp4 "
                                                          "(default 16)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Video models: start the video from this image."),
    video: Optional[Path] = typer.Option(None, "--video", help="Video models: continue this clip (its frames come "
                                                               "first; --frames counts both)."),
    lora: Lora = None,
    lora_scale: LoraScale = None,
    vae_tile: Optional[int] = typer.Option(None, "--vae-tile", help="Video models: decode in spatial tiles of this many "
                                                                    "latent cells (less memory; blends change pixels "
                                                                    "slightly). Off by default."),
    pipeline: bool = typer.Option(False, "--pipeline", help="Under mlx.launch: split the deep block's layers over "
                                                            "the processes instead of the images (automatic when "
                                                            "the model does not fit one machine)."),
    from_noise: Optional[Path] = typer.Option(None, "--from-noise", readable=False,
                                              help="Decode a noise file (starflow encode): the encoded input again, "
                                                   "or it as PROMPT when one is given."),
) -> None:
    """Generate images, or mp4 videos with a video model; files carry their generation parameters.

    Under ``mlx.launch -n N`` the images (or videos) are shared among the N processes, or with
    ``--pipeline`` the model's layers; process 0 reports progress and writes every file.
    """
    from starflow_mlx import __version__
    from starflow_mlx.io.loading import parse_dtype
    from starflow_mlx.io.model_folder import model_record
    from starflow_mlx.io.memory import plan_batch
    from starflow_mlx.pipelines.image import Pipeline
    from starflow_mlx.pipelines.settings import IMAGE_JACOBI
    from starflow_mlx.pipelines.image_files import save_images
    from starflow_mlx.pipelines.prompts import check_aspect_ratio
    from starflow_mlx.sampling.auto import JACOBI_SETTINGS, implied_jacobi, jacobi_settings

    from starflow_mlx.apps import generate_distributed as dist
    from starflow_mlx.models.kv_cache import KV_BITS
    from starflow_mlx.io.adapters import adapter_options, adapter_record

    if kv_bits is not None and kv_bits not in KV_BITS:
        raise ValueError(f"--kv-bits must be {' or '.join(map(str, KV_BITS))}, got {kv_bits}")
    lora, lora_scale = adapter_options(lora, lora_scale)
    if from_noise is not None:
        from starflow_mlx.apps.inversion_cmd import generate_from_noise

        fixed = dict(seed=seed != 0, aspect_ratio=aspect_ratio, num_images=num_images != 1, batch_size=batch_size,
                     jacobi_block_size=jacobi_block_size, jacobi_threshold=jacobi_threshold,
                     jacobi_max_iter=jacobi_max_iter, kv_bits=kv_bits, output_dir=output_dir, resume=resume or None,
                     from_metadata=from_metadata, frames=frames, fps=fps, image=image, video=video, lora=lora,
                     vae_tile=vae_tile, pipeline=pipeline or None)
        return generate_from_noise(path=from_noise, model=None if model == DEFAULT_MODEL else model, prompt=prompt,
                                   cfg=cfg, jacobi=jacobi, output=output, overwrite=overwrite, dtype=dtype,
                                   unused=["--" + k.replace("_", "-") for k, v in fixed.items()
                                           if v not in (None, False)])
    jacobi = implied_jacobi(jacobi, jacobi_block_size=jacobi_block_size, jacobi_threshold=jacobi_threshold,
                            jacobi_max_iter=jacobi_max_iter)
    if is_video_job(model, from_metadata):
        if batch_size is not None:
            raise ValueError("--batch-size is for image models: a video model samples its videos together")
        from starflow_mlx.apps.generate_video import generate_video

        return generate_video(prompt=prompt, model=model, seed=seed, cfg=cfg, aspect_ratio=aspect_ratio,
                              num_videos=num_images, jacobi=jacobi, jacobi_block_size=jacobi_block_size,
                              jacobi_threshold=jacobi_threshold, jacobi_max_iter=jacobi_max_iter, output=output,
                              output_dir=output_dir, overwrite=overwrite, dtype=dtype, from_metadata=from_metadata,
                              frames=frames, fps=fps, image=image, video=video, vae_tile=vae_tile, kv_bits=kv_bits,
                              pipeline=pipeline, lora=lora, lora_scale=lora_scale,
                              model_given=model != DEFAULT_MODEL)
    video_only = [name for name, value in (("--frames", frames), ("--fps", fps), ("--image", image),
                                           ("--video", video), ("--vae-tile", vae_tile)) if value is not None]
    if video_only:
        raise ValueError(f"{video_only[0]} is for video models; {model} generates images")
    aspect_ratio = aspect_ratio or "1:1"
    job = dict(prompt=prompt, model=model, seed=seed, cfg=cfg, aspect_ratio=aspect_ratio, num_images=num_images,
               jacobi=jacobi, jacobi_block_size=jacobi_block_size, jacobi_threshold=jacobi_threshold,
               jacobi_max_iter=jacobi_max_iter, kv_bits=kv_bits, dtype=dtype, index=None, batch_size=batch_size,
               lora=lora, lora_scale=lora_scale)
    default = None
    if from_metadata is not None:
        from starflow_mlx.apps.metadata_paths import confirm_adapters, confirm_path

        if prompt is not None:
            raise ValueError("give a prompt or --from-metadata IMAGE, not both")
        job = ran_settings(options_from_metadata(from_metadata))
        job["model"] = confirm_path(job["model"], None if model == DEFAULT_MODEL else model, "model", from_metadata)
        check_model_kind(job["model"], False, from_metadata)
        job["lora"] = confirm_adapters(job["lora"], lora, from_metadata)
        default = from_metadata.with_name(from_metadata.stem + "-again" + from_metadata.suffix)
    if job["prompt"] is None:
        raise ValueError("give a prompt (or --from-metadata IMAGE)")
    if job["num_images"] < 1:
        raise ValueError(f"--num-images must be at least 1, got {job['num_images']}")
    index = job["index"]
    wanted = range(index, index + 1) if index is not None else range(job["num_images"])
    if resume and (output_dir is None or index is not None):
        raise ValueError("--resume continues an --output-dir job: give the same --output-dir and options")
    plan = plan_outputs(job["prompt"], job["seed"], wanted, output, output_dir, overwrite or resume, default)
    for path in plan.paths:
        check_writable(path)
    check_aspect_ratio(job["aspect_ratio"])
    parse_dtype(job["dtype"])
    dist.check_before_connecting(job["model"], job["prompt"])
    world = dist.open_world(pipeline)
    layers = dist.deep_layers(world, job["model"], pipeline)
    if resume and dist.data_parallel(world, layers):
        raise ValueError("--resume under several processes continues a --pipeline job (data parallel writes "
                         "every file at the end, so it leaves none half done): add --pipeline, or run in one process")
    pipe = Pipeline.from_pretrained(job["model"], dtype=job["dtype"], lora=job["lora"], lora_scale=job["lora_scale"],
                                    layers=layers)
    # The file records the sampler that ran, and the Jacobi settings only when Jacobi ran.
    job["jacobi"], settings = jacobi_settings(job["jacobi"], pipe.config, IMAGE_JACOBI,
                                              **{key: job[key] for key in JACOBI_SETTINGS})
    options = {key: settings.get(key, job[key]) for key in SAMPLING_KEYS if key not in JACOBI_SETTINGS or settings}
    options["cfg"] = pipe.config.cfg if job["cfg"] is None else job["cfg"]
    if resume and job["batch_size"] is None:  # the default depends on free memory: keep the interrupted run's
        # Rank 0 writes the files: only its folder says what an interrupted run did.
        job["batch_size"] = world.from_main(resumable_batch_size(plan) if world.is_main else None)
    # Ranks with less memory may plan smaller batches: all take the smallest, as they must cut the job alike.
    batch_size = world.smallest(plan_batch(pipe.folder, pipe.config, job["num_images"],
                                           dist.default_batch(world, layers, job["batch_size"], wanted), layers))
    params = dict(options, prompt=job["prompt"], model=model_record(job["model"]), dtype=job["dtype"],
                  version=__version__, batch_size=batch_size,
                  lora=adapter_record(job["lora"]), lora_scale=job["lora_scale"])
    done = frozenset(finished_images(plan, params, overwrite) if resume and world.is_main else ())
    if resume:
        done = frozenset(world.indices_from_main(done, wanted.stop))
    check_job(pipe, plan, len(wanted) - len(done), job["aspect_ratio"])
    if plan.file is None:
        world.wrote(len(done), len(wanted), output_dir)
    with dist.stage_progress(world) as stages, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dist.data_parallel(world, layers):
            images = dist.sample_images(world, pipe, job["prompt"], options, wanted, batch_size, stages)
        else:
            with world.sampling():
                images = run_batches(pipe, job["prompt"], options, plan, params, wanted, batch_size,
                                     world.beating(stages), world, output_dir, done, overwrite)
    if not world.is_main:
        return
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    if plan.file is not None:
        write_file(plan, images, params, wanted.start if len(wanted) == 1 else None, overwrite)
    elif dist.data_parallel(world, layers):
        save_images([(image, plan.names[i], dict(params, index=i)) for i, image in zip(wanted, images)], overwrite)
    stages.log(stages.summary())
    new = [path for i, path in plan.names.items() if i not in done] if plan.file is None else plan.paths
    for path in new[:3]:
        typer.echo(f"wrote {path}" + (f" ({plan.taken} exists)" if plan.taken else ""))
    if len(new) > 3:
        more = len(new) - 3
        typer.echo(f"wrote {more} more {'file' if more == 1 else 'files'} in {new[0].parent} ({len(new)} in all)")
    if done:
        typer.echo(f"kept {len(done)} image(s) an earlier run had written")
