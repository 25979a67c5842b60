"""``starflow train --lora`` on captioned data: scan, encode through the cache with progress, report skipped items."""

from __future__ import annotations

from pathlib import Path

import typer


def load_captioned_data(folder: Path, manifest, config, data: str, cache_dir: Path, holdout: float, seed: int,
                        on_bad_item: str, latent_frames: int = 0):
    """(train, held-out) CaptionedDatasets; the text encoder and VAE are freed before this returns."""
    from starflow_mlx.progress import StageProgress
    from starflow_mlx.training.captions import BadItems, split_holdout
    from starflow_mlx.training.feature_cache import load_captioned

    split_holdout(2, holdout, seed)  # a bad --holdout is refused before anything is encoded
    with StageProgress() as stages:
        bad = BadItems(on_bad_item, stages.log)
        train, held, encoder = load_captioned(folder, manifest, config, data, cache_dir, holdout, seed, bad,
                                              lambda label, done, total: stages(label, done, total), latent_frames)
    cache = encoder.cache
    typer.echo(f"data: {len(train)} for training, {len(held)} held out, {len(bad.skipped)} skipped; cache {cache_dir}: "
               f"{cache.hits} reused, {cache.misses} encoded", err=True)
    return train, held
