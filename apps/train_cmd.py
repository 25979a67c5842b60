"""``starflow train``: train a class-conditional STARFlow with MLX into an ordinary model folder."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

import typer

from starflow_mlx.apps.training_run import run_with_progress


def train(
    data: str = typer.Option("digits", help="'digits' (scikit-learn's 8x8 digits), 'moving-digits' (those digits "
                             "moving across a canvas: a video model) or a folder of <class>/<images>; with --lora on "
                             "a text model, a folder of captioned images or clips (NAME.txt or metadata.jsonl)."),
    output: Path = typer.Option(..., "--output", "-o", readable=False, help="New model folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if starflow-mlx wrote it (only when done)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 2000; 300 with --lora)."),
    batch_size: int = typer.Option(64, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW)."),
    warmup: int = typer.Option(100, help="Linear warm-up steps before the cosine decay."),
    channels: int = typer.Option(64, help="Transformer width."),
    layers: str = typer.Option("2 2 4", help="Layers per flow block, shallow first, deep last."),
    noise_std: float = typer.Option(0.1, help="Gaussian noise added to the data (in [-1, 1] units)."),
    drop_label: float = typer.Option(0.1, help="Probability of training on the empty class, or with --lora on a "
                                               "text model the empty caption (for guidance)."),
    cfg: float = typer.Option(2.0, help="Default guidance weight stored with the model."),
    image_size: Optional[int] = typer.Option(None, help="Side of the square images for folder datasets (default 8: "
                                                        "as many tokens as the digits; 16 has 4 times as many and "
                                                        "takes several times longer); the canvas for moving-digits "
                                                        "(default 16)."),
    frames: Optional[int] = typer.Option(None, help="Frames per training clip (moving-digits: default 5; --lora on a "
                                                    "video model: 1 + 4k pixel frames, default its training length)."),
    patch_size: int = typer.Option(1, help="Pixels per token side (2: a quarter of the tokens)."),
    image_every: int = typer.Option(0, help="Video data: every n-th step trains on single first frames (0: never)."),
    image_channels: int = typer.Option(1, help="1 (grayscale) or 3 (RGB) for folder datasets."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints (0: none; default 250, "
                                                              "or the resumed checkpoint's)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, readable=False, help="Where checkpoints go (default: OUTPUT.checkpoints)."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint (written every --checkpoint-every "
                                            "steps, at the end, and on Ctrl-C)."),
    seed: int = typer.Option(0, help="Seeds weights, noise and batch order."),
    lora: bool = typer.Option(False, "--lora", help="Fine-tune a LoRA adapter on --base instead of training a model; "
                                                    "OUTPUT is the adapter folder."),
    base: Optional[str] = typer.Option(None, help="--lora: the model to fine-tune (folder or 'demo'), kept frozen."),
    rank: Optional[int] = typer.Option(None, help="--lora: rank of the low-rank updates (default 8)."),
    alpha: Optional[float] = typer.Option(None, help="--lora: the updates are scaled by alpha / rank (default 2 x rank)."),
    lora_blocks: Optional[str] = typer.Option(None, help="--lora: 'deep' (the deep block, default; temporal in a video model), 'shallow' "
                                                   "(the others; frame-local in a video model) or 'all' blocks."),
    base_bits: Optional[int] = typer.Option(None, help="--lora: quantize the frozen base to 4 or 8 bits (QLoRA)."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint",
                                         help="--lora: recompute each layer in the backward pass (less memory, slower)."),
    holdout: Optional[float] = typer.Option(None, help="--lora on captioned data: the fraction held out to measure "
                                                        "bits/dim before and after (default 0.1)."),
    on_bad_item: Optional[str] = typer.Option(None, "--on-bad-item", help="--lora on captioned data: 'fail' (default) "
                                              "stops at an unusable file, 'skip' leaves it out with one line."),
    cache_dir: Optional[Path] = typer.Option(None, readable=False, help="--lora on captioned data: where VAE latents "
                                             "and text features are cached (default: the checkpoint folder's features/)."),
) -> None:
    """Train with the upstream objective (noise + exact NLL), AdamW, warm-up + cosine, clipping, label dropout.

    With --lora, fine-tune LoRA matrices on a frozen --base model by the same loss and write an adapter folder.
    """
    from starflow_mlx.io.staging import check_output

    lora_only = [name for name, value in (("--base", base), ("--rank", rank), ("--alpha", alpha),
                                          ("--lora-blocks", lora_blocks), ("--base-bits", base_bits),
                                          ("--grad-checkpoint", grad_checkpoint or None), ("--holdout", holdout),
                                          ("--on-bad-item", on_bad_item), ("--cache-dir", cache_dir))
                 if value is not None]
    if lora_only and not lora:
        raise ValueError(f"{lora_only[0]} is for LoRA fine-tuning: add --lora")
    if lora:
        from starflow_mlx.apps.lora_cmd import train_adapter

        return train_adapter(base=base, data=data, output=output, force=force, steps=300 if steps is None else steps,
                             batch_size=batch_size, lr=lr, warmup=warmup, drop_label=drop_label,
                             checkpoint_every=250 if checkpoint_every is None else checkpoint_every,
                             checkpoint_dir=checkpoint_dir, resume=resume, seed=seed,
                             rank=8 if rank is None else rank, alpha=alpha, lora_blocks=lora_blocks or "deep",
                             base_bits=base_bits, grad_checkpoint=grad_checkpoint,
                             holdout=holdout, on_bad_item=on_bad_item, cache_dir=cache_dir, frames=frames)
    steps = 2000 if steps is None else steps
    from starflow_mlx.training.data import load_digits_split, load_image_folder
    from starflow_mlx.training.moving_digits import load_moving_digits_split
    from starflow_mlx.training.trainer import TrainConfig, Trainer, read_checkpoint

    # Before training, not after it; resuming may replace the folder an earlier run of this training wrote.
    check_output(output, force or resume)

    layer_list = [int(v) for v in layers.split() if v.isdecimal()]
    if len(layer_list) < 2 or len(layer_list) < len(layers.split()) or any(v < 1 for v in layer_list):
        raise ValueError(f"--layers {layers!r}: give at least two positive counts, e.g. '2 2 4'")
    checkpoints = checkpoint_dir or output.with_name(output.name + ".checkpoints")
    if checkpoint_every is None:  # a resumed run keeps checkpointing as the run it continues did
        checkpoint_every = read_checkpoint(checkpoints / "latest")[1].checkpoint_every if resume else 250
    # Checked before the data is read: the seed also splits it.
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, channels=channels,
                         layers=layer_list, noise_std=noise_std, drop_label=drop_label, cfg=cfg,
                         checkpoint_every=checkpoint_every, seed=seed, patch_size=patch_size,
                         image_every=image_every)
    if channels % config.head_dim:
        raise ValueError(f"--channels {channels} must be a multiple of {config.head_dim}, the attention head width")
    if data == "digits":
        train_set, test_set = load_digits_split(seed=seed)
    elif data == "moving-digits":
        train_set, test_set = load_moving_digits_split(frames or 5, image_size or 16, seed=seed)
    else:
        train_set, test_set = load_image_folder(data, image_size or 8, image_channels, seed=seed)
    trainer = Trainer(config, train_set, checkpoints)
    if resume:
        trainer.load_checkpoint()
    run = run_with_progress(trainer, steps)
    test_bpd = trainer.evaluate(test_set)
    source = {"trained_with": "starflow train", "data": data, "steps": steps, "batch_size": batch_size,
              "channels": channels, "layers": layer_list, "patch_size": patch_size,
              "frames": (frames or 5) if data == "moving-digits" else None, "image_every": image_every,
              "noise_std": noise_std,
              "seconds": round(trainer.seconds, 1),  # every run of this training, resumed ones included
              "machine": f"{platform.machine()} {platform.system()}", "test_bits_per_dim": round(test_bpd, 4)}
    trainer.export(output, source, force or resume)
    typer.echo(f"{output}: {run.summary(trainer)}, test {test_bpd:.3f} bits/dim, peak memory {run.peak_gb():.2f} GB")
