"""Measured memory and time of LoRA training steps at a real model's width and sequence length, against the estimate.

A flow of a named shape (``benchmarks/configs.py``; ``starflow-3b``: 3072 wide, 32x32 latents + 128 text tokens of
2048) with random weights, optionally with fewer layers per block (``--layers``) so it fits a small machine, is
quantized to ``--bits``, given rank ``--rank`` LoRA on ``--blocks`` and trained ``--steps`` steps at batch
``--batch-size`` on random latents and caption features through :class:`LoRATrainer` (the training code itself).
Peak memory (``mx.get_peak_memory``) is reset after the model is built and quantized, so it is a step's own
peak (the weights included), and printed beside ``lora_training_bytes`` for the same configuration; the process's
peak resident memory is printed too (it also covers building the model).

    python -m starflow_mlx.benchmarks.lora_memory --config starflow-3b --layers "1 2" --steps 2 --grad-checkpoint
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from starflow_mlx.benchmarks.configs import NAMED
from starflow_mlx.config import FlowConfig
from starflow_mlx.models.starflow import STARFlow
from starflow_mlx.training.captions import Bucket, CaptionedDataset
from starflow_mlx.training.lora import LoRASettings, LoRATrainer, lora_training_bytes
from starflow_mlx.training.trainer import TrainConfig

EXTRA = ("text_encoder", "vae")  # benchmark-only keys of the named shapes


def measure_step(config: FlowConfig, settings: LoRASettings, batch: int = 1, frames: int = 0,
                 steps: int = 1) -> dict:
    """Train ``steps`` LoRA steps on a flow of ``config`` with random weights (quantized to ``settings.base_bits``),
    on random latents (clips of ``frames`` latent frames) and caption features: the weights' bytes once built,
    MLX's peak bytes over the steps (weights included) and each step's seconds."""
    mx.random.seed(0)
    flow = STARFlow(config)  # random initial weights, made as they are quantized
    shape = ((frames,) if frames else ()) + (config.latent_size, config.latent_size, config.in_channels)
    rng = np.random.default_rng(0)
    text = rng.normal(size=(2, config.txt_size, config.txt_dim)).astype(np.float32)
    data = CaptionedDataset([Bucket("1:1", rng.normal(size=(2, *shape)).astype(np.float32), text,
                                    np.zeros_like(text[0]))])
    train = TrainConfig(steps=steps, batch_size=batch, lr=1e-4, warmup=1, weight_decay=0.0,
                        noise_std=config.noise_std, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = LoRATrainer(flow, train, settings, data, Path(tmp))
        mx.eval(trainer.model.parameters())
        weights = mx.get_active_memory()
        mx.reset_peak_memory()
        times = []
        for step in range(steps):
            start = time.perf_counter()
            trainer.run(step + 1)
            times.append(time.perf_counter() - start)
    return {"weights": weights, "peak": mx.get_peak_memory(), "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="starflow-3b", choices=list(NAMED))
    parser.add_argument("--layers", default=None, help="layers per block, e.g. '1 2' (default: the model's)")
    parser.add_argument("--frames", type=int, default=0, help="latent frames per clip (video shapes)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--blocks", default="deep")
    parser.add_argument("--grad-checkpoint", action="store_true")
    args = parser.parse_args()
    fields = {k: v for k, v in NAMED[args.config].items() if k not in EXTRA}
    if args.layers:
        fields["layers_per_block"] = [int(v) for v in args.layers.split()]
    config = FlowConfig(**fields)
    settings = LoRASettings(rank=args.rank, alpha=2.0 * args.rank, blocks=args.blocks, base_bits=args.bits,
                            grad_checkpoint=args.grad_checkpoint)
    estimate = lora_training_bytes(config, args.batch_size, settings, 4, args.frames)
    result = measure_step(config, settings, args.batch_size, args.frames, args.steps)
    print(json.dumps({
        "config": args.config, "layers_per_block": config.layers_per_block, "frames": args.frames,
        "tokens": (config.latent_size // config.patch_size) ** 2 * max(args.frames, 1), "text_tokens": config.txt_size,
        "batch_size": args.batch_size, "rank": args.rank, "bits": args.bits, "blocks": args.blocks,
        "grad_checkpoint": args.grad_checkpoint, "weights_gb": round(result["weights"] / 2**30, 3),
        "measured_peak_gb": round(result["peak"] / 2**30, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                             * (1 if sys.platform == "darwin" else 1024) / 2**30, 3),
        "estimate_gb": {k: round(v / 2**30, 3) for k, v in estimate.items()},
        "estimate_total_gb": round(sum(estimate.values()) / 2**30, 3),
        "seconds_per_step": [round(t, 1) for t in result["seconds"]]}))


if __name__ == "__main__":
    main()
