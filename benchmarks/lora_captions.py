"""LoRA on captioned data: a tiny text-conditioned latent model learns a new style from 100 captioned images,
and a tiny STARFlow-V from captioned clips; held-out bits/dim before and after, through the command itself.

The models have the real architecture at toy widths, with random weights: a T5-shaped encoder (gated-GELU,
relative attention, a SentencePiece tokenizer trained on the captions), an SD-VAE-shaped AutoencoderKL
(8x down) for images, a Wan2.2-shaped VAE (16x spatial, 4x temporal, 48 channels) for clips, and a flow
with a text-conditioned deep block (temporally causal, with frame-local shallow blocks, for video).

The style is procedural: stripes of a colour and direction named in the caption ("red diagonal
stripes"); clips move them ("red stripes moving left"). ``starflow train --lora`` holds out
``--holdout`` of them and reports held-out bits/dim of the base and of base + adapter.

Needs the test extras (transformers and sentencepiece, for the tokenizer):

    python -m starflow_mlx.benchmarks.lora_captions --images 100 --clips 24 --steps 150

``--write FOLDER`` only writes the two models and their data, for trying the commands by hand.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 230), "yellow": (230, 210, 40)}
DIRECTIONS = {"vertical": (1.0, 0.0), "horizontal": (0.0, 1.0), "diagonal": (0.7071, 0.7071)}
MOTIONS = {"left": -1, "right": 1}


def save_module(module, config, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mx.eval(module.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(module.parameters())),
                        metadata={"format": "mlx"})
    config.save(folder / "config.json")


def text_encoder(folder: Path, captions: list[str], width: int = 64) -> None:
    """A T5-shaped encoder with random weights and a SentencePiece tokenizer trained on the captions."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    from starflow_mlx.models.t5 import T5Config, T5Encoder

    mx.random.seed(0)
    config = T5Config(vocab_size=128, d_model=width, d_kv=16, d_ff=2 * width, num_layers=2, num_heads=4)
    save_module(T5Encoder(config), config, folder)
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions * 4), model_writer=model, vocab_size=60,
                                   model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    (tokenizer / "spiece.model").write_bytes(model.getvalue())
    T5Tokenizer.from_pretrained(str(tokenizer), extra_ids=8).save_pretrained(str(tokenizer))


def model_folder(folder: Path, captions: list[str], video: bool) -> Path:
    """A complete text-to-image (SD-VAE) or text-to-video (Wan2.2 VAE) folder with random weights."""
    from starflow_mlx.config import FlowConfig
    from starflow_mlx.io.model_folder import Manifest
    from starflow_mlx.models.starflow import STARFlow

    text_encoder(folder / "text_encoder", captions)
    mx.random.seed(1)
    if video:
        from starflow_mlx.models.wan_vae import WanVAE, WanVAEConfig

        vae_config = WanVAEConfig(dim=8, dec_dim=8)
        save_module(WanVAE(vae_config), vae_config, folder / "vae")
        flow = FlowConfig(in_channels=48, channels=64, layers_per_block=[1, 1, 2], latent_size=2, head_dim=32,
                          txt_size=64, txt_dim=64, sos=True, seq_order="L2R", use_softplus=True, cond_top_only=True,
                          use_final_norm=True, soft_clip=4.0, temporal_causal=1, shallow_block_local=True,
                          num_frames=3, noise_std=0.3, cfg=2.5, vae_factor=16, fps_cond=True,
                          cond_noise_level=True, vae_temporal_scale=0.6)
    else:
        from starflow_mlx.models.sd_vae import AutoencoderKL, VAEConfig

        vae_config = VAEConfig(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=16)
        save_module(AutoencoderKL(vae_config), vae_config, folder / "vae")
        flow = FlowConfig(in_channels=4, channels=64, layers_per_block=[1, 2], latent_size=8, head_dim=32,
                          txt_size=32, txt_dim=64, sos=True, seq_order="L2R", use_softplus=True, cond_top_only=True,
                          use_final_norm=True, soft_clip=4.0, noise_std=0.3, cfg=2.0, vae_factor=8)
    save_module(STARFlow(flow), flow, folder)
    Manifest(kind="text-to-video" if video else "text-to-image", text_encoder="text_encoder", vae="vae",
             source={"made_by": "benchmarks/lora_captions.py (random weights)"}).save(folder)
    return folder


def stripes(colour: str, direction: str, size: int, phase: float, rng) -> np.ndarray:
    """uint8 (size, size, 3): stripes of ``colour`` on a light ground, period 8 px, a little noise."""
    dy, dx = DIRECTIONS[direction]
    yy, xx = np.mgrid[:size, :size]
    on = (np.sin(2 * np.pi * ((yy * dy + xx * dx) / 8.0 + phase)) > 0)[..., None]
    ground = np.full((size, size, 3), 235.0)
    img = np.where(on, np.array(COLOURS[colour], np.float32), ground) + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def image_data(folder: Path, count: int, size: int = 64) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = []
    for i in range(count):
        colour, direction = list(COLOURS)[i % 4], list(DIRECTIONS)[(i // 4) % 3]
        Image.fromarray(stripes(colour, direction, size, rng.random(), rng)).save(folder / f"{i:03d}.png")
        captions.append(f"{colour} {direction} stripes")
        (folder / f"{i:03d}.txt").write_text(captions[-1])
    return captions


def clip_data(folder: Path, count: int, size: int = 32, frames: int = 9) -> list[str]:
    from starflow_mlx.pipelines.video_io import write_mp4

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines, captions = [], []
    for i in range(count):
        colour, motion = list(COLOURS)[i % 4], list(MOTIONS)[(i // 4) % 2]
        start = rng.random()
        clip = np.stack([stripes(colour, "vertical", size, start + MOTIONS[motion] * t / 8.0, rng)
                         for t in range(frames)])
        write_mp4(folder / f"{i:03d}.mp4", clip, fps=16)
        captions.append(f"{colour} stripes moving {motion}")
        lines.append(json.dumps({"file_name": f"{i:03d}.mp4", "text": captions[-1]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")  # the Hugging Face imagefolder way
    return captions


def fine_tune(base: Path, data: Path, adapter: Path, steps: int, batch_size: int, rank: int, blocks: str) -> dict:
    command = [str(Path(sys.executable).with_name("starflow")), "train", "--lora", "--base", str(base), "--data",
               str(data), "--steps", str(steps), "--batch-size", str(batch_size), "--rank", str(rank),
               "--lora-blocks", blocks, "--holdout", "0.2", "--lr", "3e-3", "--warmup", "10", "-o", str(adapter)]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"starflow train --lora failed:\n{run.stderr[-2000:]}")
    source = json.loads((adapter / "adapter.json").read_text())["source"]
    return {"seconds": round(time.perf_counter() - start, 1), "command": " ".join(command[1:]),
            "held_out_before": source["held_out_bits_per_dim_before"],
            "held_out_after": source["held_out_bits_per_dim_after"],
            "train_items": source["train_images"], "held_out_items": source["held_out_images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--clips", type=int, default=24, help="0: skip the video model")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--write", type=Path, help="only write the models and data into this new folder (t2i/, "
                                                   "t2v/, images/, clips/) to try the commands on, and stop")
    args = parser.parse_args()
    if args.write is not None:
        args.write.mkdir(parents=True)
        model_folder(args.write / "t2i", image_data(args.write / "images", args.images), video=False)
        if args.clips:
            model_folder(args.write / "t2v", clip_data(args.write / "clips", args.clips), video=True)
        print(f"wrote {args.write}: t2i/ (text-to-image), images/ ({args.images} captioned), "
              f"t2v/ (text-to-video), clips/ ({args.clips} captioned)")
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        captions = image_data(tmp / "images", args.images)
        base = model_folder(tmp / "t2i", captions, video=False)
        results["image"] = fine_tune(base, tmp / "images", tmp / "image-adapter", args.steps, args.batch_size,
                                     args.rank, "all")
        print(json.dumps({"image": results["image"]}), flush=True)
        if args.clips:
            captions = clip_data(tmp / "clips", args.clips)
            base = model_folder(tmp / "t2v", captions, video=True)
            results["video"] = fine_tune(base, tmp / "clips", tmp / "video-adapter", args.steps,
                                         max(1, args.batch_size // 4), args.rank, "all")
            print(json.dumps({"video": results["video"]}), flush=True)


if __name__ == "__main__":
    main()
