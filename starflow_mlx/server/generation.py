"""How one job runs on the loaded pipeline: options as ``starflow generate`` sets them, files with metadata, progress.

The files are those ``starflow generate --output-dir`` writes (same names, same metadata), so
``starflow generate --from-metadata FILE`` makes any of them again. Progress turns the
pipeline's ``progress(label, done, total)`` reports into one percent and a stage name; it is
also where a cancel takes effect, at the next report (every token or Jacobi chunk).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from starflow_mlx.server.request_types import (ImageRequest, RequestError, VideoRequest, aspect_ratio, pick_seed,
                                               video_frames)

# Share of one batch's (or video's) time per part of the work: an estimate for the percent only
# (the stage name and its own done/total are reported as they are).
IMAGE_WEIGHTS = {"sampling": 0.9, "denoise": 0.05, "decode": 0.05}
VIDEO_WEIGHTS = {"sampling": 0.8, "denoise": 0.05, "decode": 0.15}
DECODE_STAGES = ("decode", "VAE frames")


class JobCancelled(Exception):
    """The job was cancelled while it ran."""


class Progress:
    """A pipeline ``progress`` callback for a job of ``units`` images (or one video) sampled ``batch`` at a time.

    ``update(percent, stage)`` receives a percent that never goes back; ``cancelled()`` is asked
    at every report and stops the job by raising :class:`JobCancelled`.
    """

    def __init__(self, blocks: int, units: int, batch: int, weights: dict, update: Callable[[int, str], None],
                 cancelled: Callable[[], bool]):
        self.blocks, self.units, self.batch, self.weights = blocks, units, batch, weights
        self.update, self.cancelled = update, cancelled
        self.first = 0  # the first unit of the batch being made
        self.parts: dict[str, float] = {}
        self.finished_blocks: set[str] = set()
        self.percent = 0

    def next_batch(self, first: int) -> None:
        self.first = first
        self.parts, self.finished_blocks = {}, set()

    def __call__(self, label: str, done: int, total: int, **info) -> None:
        if self.cancelled():
            raise JobCancelled()
        fraction = done / total if total else 1.0
        if label.startswith("block "):
            if fraction >= 1:
                self.finished_blocks.add(label)
            running = 0.0 if label in self.finished_blocks else fraction
            self.parts["sampling"] = min(1.0, (len(self.finished_blocks) + running) / self.blocks)
        elif label == "denoise":
            self.parts["denoise"] = fraction
        elif label in DECODE_STAGES:
            self.parts["decode"] = fraction
        in_batch = sum(self.weights[part] * value for part, value in self.parts.items())
        size = min(self.batch, self.units - self.first)
        percent = int(100 * (self.first + size * in_batch) / self.units)
        self.percent = max(self.percent, min(percent, 99))  # 100 only once the files are in place
        self.update(self.percent, f"{label} {done}/{total}")



def adapters(pipe) -> dict:
    """The LoRA adapter(s) the served pipeline carries, as generate records them."""
    from starflow_mlx.io.adapters import adapter_record

    return dict(lora=adapter_record(getattr(pipe, "lora", None)), lora_scale=getattr(pipe, "lora_scale", 1.0))

def check_request(pipe, request: ImageRequest | VideoRequest) -> None:
    """Refuse, before a job is queued, what the job would refuse once it ran: a prompt that is none of a class
    model's classes, a size the model does not make, a length out of range (RequestError naming the field)."""
    from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

    if pipe.is_class_model:
        try:
            pipe.class_index(request.prompt)
        except ValueError as exc:
            raise RequestError(str(exc), "prompt") from None
    aspect_ratio(pipe, request.size)
    if isinstance(request, VideoRequest):
        video_frames(request, request.fps or VIDEO_DEFAULTS["fps"], None)


def sampling_blocks(pipe) -> int:
    """Blocks the sampler inverts (a shallow block of 0 layers is the identity); from the config, as a video
    pipeline may have released its flow after the last decode."""
    return 1 + sum(1 for layers in pipe.config.layers_per_block[:-1] if layers > 0)


def run_images(pipe, model: str, request: ImageRequest, folder: Path, update, cancelled) -> tuple[list[Path], dict]:
    """Sample ``request.n`` images into ``folder``, a batch at a time; returns the files and the options used."""
    from starflow_mlx import __version__
    from starflow_mlx.apps.generate_cmd import SAMPLING_KEYS
    from starflow_mlx.apps.job_files import file_stem
    from starflow_mlx.io.model_folder import model_record
    from starflow_mlx.io.memory import plan_batch
    from starflow_mlx.pipelines.image_files import save_images
    from starflow_mlx.pipelines.settings import IMAGE_JACOBI
    from starflow_mlx.sampling.auto import jacobi_settings

    seed = pick_seed(request.seed)
    jacobi, settings = jacobi_settings(request.jacobi, pipe.config, IMAGE_JACOBI)  # recorded only when Jacobi ran
    job = dict(seed=seed, cfg=pipe.config.cfg if request.cfg is None else request.cfg,
               aspect_ratio=aspect_ratio(pipe, request.size), num_images=request.n, jacobi=jacobi, kv_bits=None,
               **settings)
    options = {key: job[key] for key in SAMPLING_KEYS if key in job}
    batch = plan_batch(pipe.folder, pipe.config, request.n)
    # As generate records them, so that --from-metadata remakes the same bytes (adapters: starflow serve --lora).
    params = dict(options, prompt=request.prompt, model=model_record(model), dtype=None, version=__version__,
                  batch_size=batch, **adapters(pipe))
    stem = file_stem(request.prompt, seed)
    progress = Progress(sampling_blocks(pipe), request.n, batch, IMAGE_WEIGHTS, update, cancelled)
    paths = []
    for first, images in pipe.generate_batches(request.prompt, progress=progress, batch_size=batch, **options):
        items = [(image, folder / f"{stem}-{first + k:03d}.png", dict(params, index=first + k))
                 for k, image in enumerate(images)]
        save_images(items)
        paths.extend(path for _, path, _ in items)
        progress.next_batch(first + len(images))
    return paths, params


def run_video(pipe, model: str, request: VideoRequest, folder: Path, update, cancelled) -> tuple[list[Path], dict]:
    """Sample one video into ``folder`` as an mp4 streamed from the VAE; returns the file and the options used."""
    from starflow_mlx import __version__
    from starflow_mlx.apps.job_files import file_stem
    from starflow_mlx.apps.generate_video import SAMPLING_KEYS
    from starflow_mlx.io.model_folder import model_record
    from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS
    from starflow_mlx.pipelines.video_io import write_videos
    from starflow_mlx.sampling.auto import JACOBI_SETTINGS, jacobi_settings

    seed = pick_seed(request.seed)
    fps = request.fps or VIDEO_DEFAULTS["fps"]
    # Frames and guidance follow the model (its training length, a class model's own weight), as generate does.
    job = dict(VIDEO_DEFAULTS, seed=seed, num_videos=1, fps=fps, image=None, video=None, kv_bits=None,
               aspect_ratio=aspect_ratio(pipe, request.size), cfg=pipe.default_cfg,
               frames=pipe.frame_count(video_frames(request, fps, None)))
    if request.cfg is not None:
        job["cfg"] = request.cfg
    # The file records the sampler that ran, and the Jacobi settings only when Jacobi ran.
    job["jacobi"], settings = jacobi_settings(request.jacobi, pipe.config, VIDEO_DEFAULTS)
    options = {key: job[key] for key in SAMPLING_KEYS if key not in JACOBI_SETTINGS or settings}
    params = dict(options, prompt=request.prompt, model=model_record(model), dtype=None, version=__version__, index=0,
                  **adapters(pipe))
    path = folder / f"{file_stem(request.prompt, seed)}.mp4"
    progress = Progress(sampling_blocks(pipe), 1, 1, VIDEO_WEIGHTS, update, cancelled)
    write_videos(pipe.stream(request.prompt, progress=progress, **options), [(path, params, 0)], fps)
    return [path], params
