"""LoRA on the demo: teach the built-in digits model a new style (bold digits) from at most 100 images.

1. Bold digits: scikit-learn's 8x8 digits with every stroke widened by one pixel sideways
   (a 1x2 grey dilation). ``--images`` of the train split (as many per digit), made bold, are
   written as ``<digit>/<n>.png`` and fine-tuned on with the command itself:
   ``starflow train --lora --base demo --data FOLDER`` (it holds one in ten out).
2. Bits/dim of the held-out bold digits (the bold test split, never seen) under the base and
   under base + adapter; the normal test split too, to see what the adapter costs there.
3. Generated digits, ``--per-class`` per digit, with and without the adapter: how often a
   logistic regression labels them as the requested digit (trained on the real digits, as
   ``demo_quality`` does, and trained on real digits of both styles), and how many a style
   classifier (logistic regression, real bold against real normal digits) calls bold.
4. A computed estimate (not a measurement) of LoRA training memory for the 3B and 7B at 4-bit.

    python -m starflow_mlx.benchmarks.lora_style --images 100 --steps 200 --per-class 20
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from starflow_mlx.benchmarks.demo_quality import digit_classifier, to_features
from starflow_mlx.training.data import Dataset, load_digits_split
from starflow_mlx.training.trainer import evaluate_bits_per_dim


def bold(images: np.ndarray) -> np.ndarray:
    """Each stroke one pixel wider: the brighter of a pixel and its horizontal neighbour (a 1x2 grey dilation)."""
    from scipy import ndimage

    return np.stack([ndimage.grey_dilation(img[..., 0], size=(1, 2))[..., None] for img in images])


def write_folder(data: Dataset, count: int, folder: Path) -> int:
    """``count`` images (the first of each digit, as many per digit) as ``folder/<digit>/<n>.png``."""
    from PIL import Image

    per_digit = count // len(data.classes)
    written = 0
    for digit, name in enumerate(data.classes):
        (folder / name).mkdir(parents=True)
        for n, index in enumerate(np.flatnonzero(data.labels == digit)[:per_digit]):
            pixels = np.clip((data.images[index, ..., 0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{n}.png")
            written += 1
    return written


def fine_tune(folder: Path, adapter: Path, steps: int, batch_size: int, rank: int) -> float:
    """Run ``starflow train --lora`` (the installed command) and return its wall time."""
    command = [str(Path(sys.executable).with_name("starflow")), "train", "--lora", "--base", "demo", "--data",
               str(folder), "--steps", str(steps), "--batch-size", str(batch_size), "--rank", str(rank),
               "--checkpoint-every", "0", "-o", str(adapter)]
    print("$", " ".join(command[1:]).replace(str(folder), "BOLD_FOLDER").replace(str(adapter), "ADAPTER"),
          flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def samples(pipe, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` generated digits of each class (pixels in [-1, 1]) and their requested labels."""
    images = [np.array(pipe.sample(str(d), seed=seed + 1000 * d, num_images=per_class)) for d in range(10)]
    return np.concatenate(images) / pipe.manifest.pixel_scale, np.repeat(np.arange(10), per_class)


def style_classifier(train: Dataset, train_bold: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    x = to_features(np.concatenate([train.images, train_bold]))
    return LogisticRegression(max_iter=2000).fit(x, np.r_[np.zeros(len(train)), np.ones(len(train))])


def both_styles_classifier(train: Dataset, train_bold: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    x = to_features(np.concatenate([train.images, train_bold]))
    return LogisticRegression(max_iter=3000).fit(x, np.r_[train.labels, train.labels])


def memory_estimates() -> list[tuple[str, str, float]]:
    """(model, setting, GB) from ``lora_training_bytes``: batch 1, rank 8, float16 scales (a Mac), 4-bit base."""
    from starflow_mlx.benchmarks.configs import load_config
    from starflow_mlx.training.lora import LoRASettings, lora_training_bytes

    rows = []
    cases = [("starflow-3b", "256x256 image", 0), ("starflow-v-7b", "1 frame (an image)", 1),
             ("starflow-v-7b", "5 frames (2 latent)", 2), ("starflow-v-7b", "17 frames (5 latent)", 5), ("starflow-v-7b", "81 frames (21 latent)", 21)]
    for name, what, frames in cases:
        config = load_config(name)
        for checkpoint in (False, True):
            settings = LoRASettings(rank=8, blocks="deep", base_bits=4, grad_checkpoint=checkpoint)
            parts = lora_training_bytes(config, 1, settings, float_bytes=2, frames=frames)
            label = f"{what}, deep block" + (", --grad-checkpoint" if checkpoint else "")
            rows.append((name, label, parts))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="bold training images (at most 100)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="copy the adapter here")
    parser.add_argument("--memory-only", action="store_true", help="print only the memory estimate (4.)")
    args = parser.parse_args()
    if args.memory_only:
        return print_memory_estimates()
    if not 10 <= args.images <= 100:
        parser.error("--images must be between 10 and 100")

    from starflow_mlx.pipelines.image import Pipeline

    train, test = load_digits_split()
    train_bold, test_bold = bold(train.images), bold(test.images)
    with tempfile.TemporaryDirectory() as tmp:
        folder, adapter = Path(tmp) / "bold", Path(tmp) / "adapter"
        count = write_folder(Dataset(train_bold, train.labels, train.classes), args.images, folder)
        print(f"fine-tuning on {count} bold digits (the command holds one in ten out)", flush=True)
        seconds = fine_tune(folder, adapter, args.steps, args.batch_size, args.rank)
        if args.keep:
            shutil.copytree(adapter, args.keep, dirs_exist_ok=True)
        base = Pipeline.from_pretrained("demo")
        tuned = Pipeline.from_pretrained("demo", lora=adapter)
        noise = base.config.noise_std
        bpd = {(name, which): evaluate_bits_per_dim(pipe.flow, Dataset(images, test.labels, test.classes), noise)
               for name, pipe in (("base", base), ("adapter", tuned))
               for which, images in (("bold", test_bold), ("normal", test.images))}
        start = time.perf_counter()
        generated = {name: samples(pipe, args.per_class, args.seed) for name, pipe in (("base", base), ("adapter", tuned))}
        sample_seconds = time.perf_counter() - start

    digits_normal = digit_classifier(train)
    digits_both = both_styles_classifier(train, train_bold)
    style = style_classifier(train, train_bold)
    print(f"\nfine-tuning: {seconds:.0f} s for {args.steps} steps (command wall time); sampling "
          f"{2 * 10 * args.per_class} digits: {sample_seconds:.0f} s")
    print("held-out bits/dim (359 test digits, noise as in training; lower is better):")
    for which in ("bold", "normal"):
        print(f"  {which:6s} digits: base {bpd[('base', which)]:.3f} -> with adapter {bpd[('adapter', which)]:.3f}")
    print("classifiers on real test digits (reference): "
          f"digit (normal-trained) {digits_normal.score(to_features(test.images), test.labels):.1%} normal, "
          f"{digits_normal.score(to_features(test_bold), test.labels):.1%} bold; "
          f"digit (both styles) {digits_both.score(to_features(test.images), test.labels):.1%} normal, "
          f"{digits_both.score(to_features(test_bold), test.labels):.1%} bold; "
          f"style {style.score(to_features(np.concatenate([test.images, test_bold])), np.r_[np.zeros(len(test)), np.ones(len(test))]):.1%}")
    for name, (images, labels) in generated.items():
        x = to_features(images)
        print(f"generated by {name:7s} ({len(labels)}): recognised {np.mean(digits_normal.predict(x) == labels):.1%} "
              f"(normal-trained), {np.mean(digits_both.predict(x) == labels):.1%} (both styles); "
              f"called bold {np.mean(style.predict(x) == 1):.1%}")
    print()
    print_memory_estimates()


def print_memory_estimates() -> None:
    print("estimated LoRA training memory at 4-bit, rank 8, batch 1 (computed by "
          "starflow_mlx.training.lora.lora_training_bytes, not measured):")
    for name, label, parts in memory_estimates():
        total = sum(parts.values()) / 2**30
        print(f"  {name:14s} {label:52s} {total:7.1f} GB (base {parts['base'] / 2**30:.1f}, adapter + AdamW "
              f"{parts['adapter'] / 2**30:.2f}, activations {parts['activations'] / 2**30:.1f})"
              f"{'  under 16 GB' if total < 16 else ''}")


if __name__ == "__main__":
    main()
