"""Will a model, and a batch of images, fit in this machine's memory? Planned before anything is loaded."""

from __future__ import annotations

import os
from pathlib import Path

from starflow_mlx.advice import with_cli_message

WORKING_BYTES = 1 << 30  # T5 and VAE activations, MLX buffers: measured well under this at 256x256
MAX_DEFAULT_BATCH = 16  # past this a bigger batch barely speeds sampling up, and one batch's images wait longer


class InsufficientMemoryError(MemoryError):
    """The model, or one batch of images, does not fit in this machine's memory."""


def physical_memory() -> int | None:
    """Installed RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def process_limit() -> int | None:
    """The address-space or data limit this process runs under (ulimit -v / -d), if any."""
    try:
        import resource
    except ImportError:  # not on this OS
        return None
    limits = [resource.getrlimit(kind)[0] for kind in (resource.RLIMIT_AS, resource.RLIMIT_DATA)]
    limits = [value for value in limits if value != resource.RLIM_INFINITY and value > 0]
    return min(limits) if limits else None


def memory_limit() -> int | None:
    """The memory this process may use: installed RAM, or less under a process limit."""
    known = [value for value in (physical_memory(), process_limit()) if value is not None]
    return min(known) if known else None


def weight_bytes(folder: Path, layers: range | None = None) -> int:
    """The weights a process loads: all of them, or with ``layers`` only that share of the deep block's."""
    total = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    if layers is None:
        return total
    from starflow_mlx.io.distributed import unread_bytes

    return total - unread_bytes(folder, layers)


def tokens_per_image(config) -> int:
    return (config.latent_size // config.patch_size) ** 2 * max(config.num_frames, 1)


def image_bytes(config) -> int:
    """Memory one image adds while it is sampled and decoded (an estimate, on the generous side)."""
    tokens = tokens_per_image(config) + config.txt_size
    deep = config.num_blocks - 1
    width = config.block_channels(deep)
    kv_cache = config.layers_per_block[deep] * 2 * 2 * tokens * width * 4  # k+v, cfg pair, float32
    activations = 2 * tokens * width * 4 * 16  # cfg pair, float32, a dozen live (tokens, width) buffers
    side = config.latent_size * max(config.vae_factor, 1)
    decoding = side * side * 128 * 4 * 4 if config.vae_factor > 1 else 0  # the VAE's full-size 128-channel maps
    return kv_cache + activations + decoding


def needed_bytes(folder: Path, config, batch: int = 1, layers: range | None = None) -> int:
    """Weights (``layers``: a pipeline rank's share), working memory and ``batch`` images in flight."""
    return weight_bytes(folder, layers) + WORKING_BYTES + batch * image_bytes(config)


def check_memory(folder: Path, config, layers: range | None = None) -> None:
    """Refuse early, with the numbers, when the model (or this rank's share of it) cannot fit."""
    total = memory_limit()
    needed = needed_bytes(folder, config, layers=layers)
    if total is not None and needed > total:
        raise InsufficientMemoryError(
            f"this model needs about {needed / 2**30:.1f} GB of memory but the machine has {total / 2**30:.1f} GB: "
            f"quantize it first (starflow quantize {folder} --bits 4 -o {folder.name}-4bit)")


def plan_batch(folder: Path, config, num_images: int, batch_size: int | None = None,
               layers: range | None = None) -> int:
    """Images sampled together: ``batch_size`` if it fits in memory, else the most that fit (at most 16).

    ``layers``: this process holds only those layers of the deep block (pipeline parallel).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    total = memory_limit()
    fits = (MAX_DEFAULT_BATCH if total is None
            else (total - needed_bytes(folder, config, 0, layers)) // image_bytes(config))
    if batch_size is None:
        return max(1, min(num_images, MAX_DEFAULT_BATCH, fits))
    batch_size = min(batch_size, num_images)  # a batch larger than the job samples the job: only that must fit
    if batch_size > fits:
        needed = needed_bytes(folder, config, batch_size, layers)
        message = (f"a batch of {batch_size} images needs about {needed / 2**30:.1f} GB of memory but "
                   f"{total / 2**30:.1f} GB is available: ")
        raise with_cli_message(InsufficientMemoryError(message + f"pass batch_size={max(fits, 1)} or less"),
                               message + f"use --batch-size {max(fits, 1)} or less")
    return batch_size
