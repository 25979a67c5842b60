"""LoRA on the command line: ``starflow train --lora`` (fine-tune an adapter) and ``starflow fuse`` (merge one)."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Optional

import typer


def train_adapter(*, base: Optional[str], data: str, output: Path, force: bool, steps: int, batch_size: int, lr: float,
                  warmup: int, drop_label: float, checkpoint_every: int, checkpoint_dir: Optional[Path], resume: bool,
                  seed: int, rank: int, alpha: Optional[float], lora_blocks: str, base_bits: Optional[int],
                  grad_checkpoint: bool, holdout: Optional[float] = None, on_bad_item: Optional[str] = None,
                  cache_dir: Optional[Path] = None, frames: Optional[int] = None) -> None:
    """Fine-tune LoRA matrices on a frozen base by exact likelihood and write the adapter folder."""
    from starflow_mlx.config import FlowConfig
    from starflow_mlx.io.loading import load_flow
    from starflow_mlx.io.model_folder import Manifest
    from starflow_mlx.io.resolve import resolve_model
    from starflow_mlx.models.lora import check_blocks, check_rank, trainable_count
    from starflow_mlx.io.memory import check_memory
    from starflow_mlx.quantize.policy import check_setting
    from starflow_mlx.io.staging import check_output
    from starflow_mlx.training.feature_cache import clip_latent_frames
    from starflow_mlx.training.lora import LoRASettings, LoRATrainer, check_lora_memory, load_lora_data
    from starflow_mlx.training.trainer import TrainConfig

    from starflow_mlx.apps.training_run import run_with_progress

    if base is None:
        raise ValueError("--lora needs --base MODEL: the model to fine-tune (a folder, or 'demo')")
    alpha = 2.0 * rank if alpha is None else alpha
    check_rank(rank, alpha)
    check_blocks(lora_blocks)
    if base_bits is not None:
        check_setting(base_bits, 64, "base_bits")
    check_output(output, force or resume)  # before training, not after it
    folder = resolve_model(base)
    manifest = Manifest.load(folder)
    captioned = manifest.kind in ("text-to-image", "text-to-video")
    if not captioned and (manifest.kind != "class-to-image" or manifest.vae):
        raise ValueError(f"{base} is a {manifest.kind} model: LoRA fine-tuning works on text-conditioned models "
                         "(captioned data) and class-conditional pixel-space image models (like demo)")
    config = FlowConfig.load(folder / "config.json")
    settings = LoRASettings(rank=rank, alpha=alpha, blocks=lora_blocks, base_bits=base_bits,
                            grad_checkpoint=grad_checkpoint)
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=0.0,
                        noise_std=config.noise_std, drop_label=drop_label, cfg=config.cfg,
                        checkpoint_every=checkpoint_every, seed=seed)
    checkpoints = checkpoint_dir or output.with_name(output.name + ".checkpoints")
    check_memory(folder, config)  # the base must load at all (it loads in float before --base-bits quantizes it)
    captioned_only = [name for name, value in (("--holdout", holdout), ("--on-bad-item", on_bad_item),
                                               ("--cache-dir", cache_dir)) if value is not None]
    if captioned_only and not captioned:
        raise ValueError(f"{captioned_only[0]} is for captioned data (text-to-image and text-to-video models); "
                         f"{base} is a {manifest.kind} model")
    latent_frames = clip_latent_frames(config, frames) if manifest.kind == "text-to-video" else 0
    if frames is not None and not latent_frames:
        raise ValueError(f"--frames is for video data; {base} is a {manifest.kind} model")
    need = check_lora_memory(config, batch_size, settings, frames=latent_frames)  # before the base is loaded
    if captioned:
        from starflow_mlx.apps.lora_data import load_captioned_data

        train_set, test_set = load_captioned_data(folder, manifest, config, data, cache_dir or checkpoints / "features",
                                                  0.1 if holdout is None else holdout, seed, on_bad_item or "fail",
                                                  latent_frames)
    else:
        train_set, test_set = load_lora_data(data, manifest.classes, config, manifest.pixel_scale, seed)
    typer.echo(f"estimated memory of a training step: {need / 2**30:.2f} GB", err=True)
    trainer = LoRATrainer(load_flow(folder), train, settings, train_set, checkpoints, base_name=str(base))
    before = trainer.evaluate(test_set)  # B starts at zero: this is the base model's own figure
    if resume:
        trainer.load_checkpoint()
    run = run_with_progress(trainer, steps)
    after = trainer.evaluate(test_set)
    source = {"trained_with": "starflow train --lora", "base": str(base), "data": data, "steps": steps,
              "batch_size": batch_size, "lr": lr, "base_bits": base_bits, "blocks": lora_blocks,
              "grad_checkpoint": grad_checkpoint, "frames": 4 * (latent_frames - 1) + 1 if latent_frames else None,
              "holdout": (0.1 if holdout is None else holdout) if captioned else None, "train_images": len(train_set),
              "held_out_images": len(test_set), "seconds": round(run.seconds, 1),
              "machine": f"{platform.machine()} {platform.system()}",
              "held_out_bits_per_dim_before": round(before, 4), "held_out_bits_per_dim_after": round(after, 4)}
    trainer.export(output, source, force or resume)
    size = sum(p.stat().st_size for p in output.iterdir())
    typer.echo(f"{output}: {run.summary(trainer)}, held-out bits/dim {before:.3f} -> {after:.3f} "
               f"({len(test_set)} {'clips' if config.is_video else 'images'}), adapter "
               f"{trainable_count(trainer.model):,} parameters ({size / 1024:.0f} KB), peak memory {run.peak_gb():.2f} GB")


def fuse(
    base: str = typer.Argument(..., help="The model the adapter was trained on: a folder or 'demo'."),
    lora: Path = typer.Option(..., "--lora", readable=False, help="Adapter folder (starflow train --lora)."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Multiply the adapter's update by this."),
    output: Path = typer.Option(..., "--output", "-o", readable=False, help="New model folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if starflow-mlx wrote it."),
) -> None:
    """Merge a LoRA adapter into its base: an ordinary model folder (a quantized base is re-quantized)."""
    from starflow_mlx.config import FlowConfig
    from starflow_mlx.io.loading import cast_floats, load_flow, parse_dtype
    from starflow_mlx.io.model_folder import MANIFEST, Manifest
    from starflow_mlx.io.resolve import resolve_model
    from starflow_mlx.io.adapters import read_adapter_config
    from starflow_mlx.models.lora import fuse_lora
    from starflow_mlx.io.memory import check_memory
    from starflow_mlx.quantize.quantize_folder import FLOW_FILES, save_flow
    from starflow_mlx.io.staging import check_output, staged_folder

    check_output(output, force)
    folder = resolve_model(base)
    config = FlowConfig.load(folder / "config.json")
    check_memory(folder, config)
    flow = load_flow(folder, lora=lora, lora_scale=lora_scale)
    fuse_lora(flow)
    if config.quantization:  # as quantized folders store them (a CPU runs them in float32)
        cast_floats(flow, parse_dtype("float16"))
    adapter = read_adapter_config(lora)
    with staged_folder(output, force) as staging:
        save_flow(flow, staging)
        for entry in sorted(folder.iterdir()):
            if entry.name in FLOW_FILES or entry.name == MANIFEST or entry.name.startswith((".", "__")):
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        if (folder / MANIFEST).is_file():
            manifest = Manifest.load(folder)
            manifest.source = {**manifest.source, "fused_lora": {"adapter": str(lora), "lora_scale": lora_scale,
                                                                 "adapter_source": adapter.source}}
            manifest.save(staging)
    typer.echo(f"wrote {output}: {base} with the adapter {lora} fused (scale {lora_scale:g})")

