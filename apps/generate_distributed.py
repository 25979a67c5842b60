"""``starflow generate`` started by ``mlx.launch``: which rank samples what, and rank 0 alone reports and writes.

Without ``mlx.launch`` the world is one rank and none of this changes what ``generate`` does.
"""

from __future__ import annotations

import math
import time

import numpy as np

from starflow_mlx.io.distributed import World, current, launched, layer_share


def check_before_connecting(model: str, prompt: str) -> None:
    """Under a launcher, the mistakes every rank would make alike, found before the ranks connect: each rank
    stops with its one line and none waits for the others (the model folder, a class model's class)."""
    if not launched():
        return
    from starflow_mlx.io.model_folder import CLASS_KINDS, Manifest
    from starflow_mlx.io.resolve import resolve_model
    from starflow_mlx.pipelines.image import class_index

    manifest = Manifest.load(resolve_model(model))
    if manifest.kind in CLASS_KINDS:
        class_index(manifest, prompt)


def open_world(pipeline: bool) -> World:
    world = current()
    if pipeline and world.size < 2:
        raise ValueError("--pipeline splits the model over the processes of mlx.launch: start the command with "
                         "mlx.launch -n 2 (or --hostfile) -- starflow generate ...")
    return world


def deep_layers(world: World, model: str, pipeline: bool) -> range | None:
    """This rank's layers of the deep block when the flow is pipelined: asked for, or too large for one machine."""
    if world.size < 2:
        return None
    from starflow_mlx.config import FlowConfig
    from starflow_mlx.io.resolve import resolve_model
    from starflow_mlx.io.memory import memory_limit, needed_bytes

    folder = resolve_model(model)
    config = FlowConfig.load(folder / "config.json")
    total = memory_limit()
    fits = total is None or needed_bytes(folder, config) <= total
    # Every rank must take the same road: the flow is split when any of them cannot hold it.
    if not pipeline and world.smallest(int(fits)):
        return None
    return layer_share(config.layers_per_block[-1], world.size, world.rank)


def data_parallel(world: World, layers: range | None) -> bool:
    return world.size > 1 and layers is None


def default_batch(world: World, layers: range | None, requested: int | None, wanted: range) -> int | None:
    """Data parallel without --batch-size: an even share per rank (the file records it, so it can be made again)."""
    if requested is not None or not data_parallel(world, layers):
        return requested
    return math.ceil(len(wanted) / world.size)


def stage_progress(world: World):
    """Bars and stage lines on rank 0; the other ranks work silently (their output would interleave)."""
    import io

    from rich.console import Console

    from starflow_mlx.progress import StageProgress

    if world.is_main:
        return StageProgress()
    return StageProgress(console=Console(file=io.StringIO()), live=False)


def sample_images(world: World, pipe, prompt: str, options: dict, wanted: range, batch_size: int,
                  stages) -> list | None:
    """This rank's batches of ``wanted``; rank 0 returns every image in order, the others None."""
    from PIL import Image

    shares = world.batches(wanted, batch_size)
    mine = shares[world.rank]
    started = time.perf_counter()
    pixels = []
    stages("images", 0, len(mine))
    if len(mine):
        for _, images in pipe.generate_batches(prompt, progress=stages, batch_size=batch_size,
                                               images=(mine.start, mine.stop), **options):
            pixels.extend(np.asarray(image) for image in images)
            stages("images", len(pixels), len(mine))
    every = world.gather(np.stack(pixels) if pixels else None, [len(s) for s in shares], time.perf_counter() - started)
    return None if every is None else [Image.fromarray(a) for a in every]


def sample_videos(world: World, pipe, prompt: str, options: dict, stages) -> list[np.ndarray] | None:
    """This rank's videos, sampled and decoded; rank 0 returns the whole job as one chunk (B, T, H, W, 3)."""
    count = options["num_videos"]
    shares = world.batches(range(count), math.ceil(count / world.size))
    mine = shares[world.rank]
    started = time.perf_counter()
    local = None
    if len(mine):
        share = dict(options, seed=options["seed"] + mine.start, num_videos=len(mine))
        local = np.concatenate(list(pipe.stream(prompt, progress=stages, **share)), axis=1)
    every = world.gather(local, [len(s) for s in shares], time.perf_counter() - started)
    return None if every is None else [every]

