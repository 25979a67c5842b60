"""How good is the built-in digits model? Classifier accuracy, test bits/dim against a baseline, a sample grid.

1. A logistic regression trained on the real digits (train split) labels generated
   digits; we report how often it agrees with the requested digit.
2. Test-set bits per dimension of the flow, next to independent per-pixel Gaussians
   fitted on the train split. Both are continuous densities of the noisy data
   (pixels in [-1, 1] plus the training noise), in bits per pixel.
3. Optionally, a grid of samples (one row per digit) as a PNG.

    python -m starflow_mlx.benchmarks.demo_quality --model demo --per-class 20 --grid docs/demo_grid.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.training.data import load_digits_split
from starflow_mlx.training.trainer import evaluate_bits_per_dim


def digit_classifier(train):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000)
    clf.fit(to_features(train.images), train.labels)
    return clf


def to_features(images: np.ndarray) -> np.ndarray:
    """[-1, 1] pixels back to scikit-learn's 0..16 scale, flattened."""
    return ((np.clip(images, -1, 1) + 1.0) * 8.0).reshape(len(images), -1)


def gaussian_baseline_bits(train, test, noise_std: float, seed: int = 1) -> float:
    """Bits/dim of independent per-pixel Gaussians fitted on the noisy train split."""
    rng = np.random.default_rng(seed)
    fit = train.images + noise_std * rng.standard_normal(train.images.shape)
    mean, var = fit.mean(axis=0), fit.var(axis=0)
    x = test.images + noise_std * np.random.default_rng(seed).standard_normal(test.images.shape)
    nll = 0.5 * (np.log(2 * math.pi * var) + (x - mean) ** 2 / var)
    return float(nll.mean() / math.log(2))


def measure(model: str | Path = "demo", per_class: int = 20, jacobi: bool = True, seed: int = 0,
            grid: Path | None = None, dtype: str | None = None, step=lambda: None) -> dict:
    """Classifier accuracy and test bits/dim; ``step()`` after each of the 10 digits and after the bits/dim."""
    pipe = Pipeline.from_pretrained(model, dtype=dtype)
    train, test = load_digits_split()
    clf = digit_classifier(train)
    correct, rows = 0, []
    for digit in range(10):
        x = pipe.sample(str(digit), seed=seed + digit, num_images=per_class, jacobi=jacobi)
        pixels = np.array(x) / pipe.manifest.pixel_scale
        correct += int((clf.predict(to_features(pixels)) == digit).sum())
        step()
        if grid is not None:
            rows.append(pipe.decode(x[: min(per_class, 10)]))
    if grid is not None:
        from starflow_mlx.pipelines.image_files import grid as tile

        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        tile([img for row in rows for img in row], pad=4).save(grid)
    noise = pipe.config.noise_std
    bits_per_dim = evaluate_bits_per_dim(pipe.flow, test, noise)
    step()
    return {
        "accuracy": correct / (10 * per_class),
        "samples": 10 * per_class,
        "bits_per_dim": bits_per_dim,
        "baseline_bits_per_dim": gaussian_baseline_bits(train, test, noise),
        "classifier_accuracy_on_real_test": float(clf.score(to_features(test.images), test.labels)),
        "cfg": pipe.config.cfg,
        "sampler": "jacobi" if jacobi else "sequential",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--sequential", action="store_true", help="sample sequentially instead of Jacobi")
    parser.add_argument("--grid", type=Path, default=None, help="write a sample grid PNG here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.model, args.per_class, jacobi=not args.sequential, grid=args.grid)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"classifier agrees with the requested digit: {result['accuracy']:.1%} of {result['samples']} samples "
              f"(cfg {result['cfg']}, {result['sampler']}); the classifier scores "
              f"{result['classifier_accuracy_on_real_test']:.1%} on real test digits")
        print(f"test bits/dim: flow {result['bits_per_dim']:.3f}, per-pixel Gaussian baseline "
              f"{result['baseline_bits_per_dim']:.3f}")


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
