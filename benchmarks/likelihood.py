"""Exact likelihood as a tool, measured on the built-in models: classify, flag outliers, rank, throughput.

1. **Generative classifier.** The digits demo labels scikit-learn's test digits (the split it never
   trained on) by Bayes with a uniform prior, p(c | x) = softmax_c log p(x | c); accuracy and expected
   calibration error (15 equal-width confidence bins), next to the logistic regression that
   ``demo_quality.py`` uses as its judge. The moving-digits video demo does the same over its 40
   prompts: digit (summed over directions), direction (summed over digits) and both.
2. **Outliers.** AUROC of raw bits/dim (the null prompt's, i.e. the unconditional density),
   the input-complexity correction (bits/dim minus PNG bits per pixel), typicality (|bits/dim - the
   reference mean|, per input and over batches of 5) and the likelihood ratio (the best class's
   bits/dim minus the null prompt's), test digits against: uniform noise, constant images, inverted
   digits (16 - v), digits shifted 2 px, rotated 90 degrees, Gaussian-blurred, dilated strokes; and
   test clips against clips with two frames swapped, reversed, frozen on frame 0. The reference set
   (typicality's mean) is the train split. Also bits/dim given the class the input claims (a corrupted
   input keeps its source's class), where that is known.
3. **Ranking.** 20 corrupted digits (the image corruptions above, in turn) planted among 1000 real ones:
   how many of them each statistic puts in its top 20.
4. **Throughput.** ``Pipeline.score_many`` in batches of 16 against one input at a time.

Every input goes through the files' path (8-bit images, ``scoring.prepare``), as ``starflow score`` reads them.

    python -m starflow_mlx.benchmarks.likelihood --clips 100 --json likelihood.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter

from starflow_mlx.pipelines.load import load_pipeline
from starflow_mlx.pipelines.outliers import auroc, png_bits_per_dim
from starflow_mlx.pipelines.scoring import conditioning_for, prepare

BINS = 15
TYPICAL_BATCH = 5


# -- inputs ---------------------------------------------------------------------------------------
def to_uint8(values: np.ndarray) -> np.ndarray:
    """scikit-learn's 0..16 pixel values -> 8-bit."""
    return np.clip(np.round(values * 255.0 / 16.0), 0, 255).astype(np.uint8)


def digits_0_16():
    from starflow_mlx.training.data import load_digits_split

    train, test = load_digits_split()
    scale = lambda d: np.round((d.images[..., 0] + 1.0) * 8.0)  # noqa: E731 - back to 0..16
    return scale(train), train.labels, scale(test), test.labels


def corruptions(values: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each outlier set as 8-bit images (N, 8, 8), one per test digit."""
    n = len(values)
    shifted = np.zeros_like(values)
    shifted[:, :, 2:] = values[:, :, :-2]  # 2 px right, background (0) coming in
    blur = ImageFilter.GaussianBlur(1.0)
    dilate = ImageFilter.MaxFilter(3)
    real = to_uint8(values)
    return {
        "uniform noise": rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
        "constant": np.repeat(rng.integers(0, 256, n, dtype=np.uint8)[:, None, None], 64).reshape(n, 8, 8),
        "inverted (16 - v)": to_uint8(16 - values),
        "shifted 2 px": to_uint8(shifted),
        "rotated 90": to_uint8(np.rot90(values, axes=(1, 2))),
        "Gaussian blur": np.stack([np.asarray(Image.fromarray(a).filter(blur)) for a in real]),
        "dilated strokes": np.stack([np.asarray(Image.fromarray(a).filter(dilate)) for a in real]),
    }


def prepared(pipe, items) -> mx.array:
    """Inputs as the flow sees them, through the same path as ``starflow score`` (8-bit in, ``prepare``)."""
    return mx.concatenate([prepare(pipe, item, "")[0] for item in items])


def bits_matrix(pipe, x: mx.array, prompts: list[str], batch: int = 256) -> np.ndarray:
    """(N, P) bits/dim of every input under every prompt."""
    dims = math.prod(x.shape[1:])
    out = np.empty((x.shape[0], len(prompts)))
    for j, prompt in enumerate(prompts):
        y = conditioning_for(pipe, x[:1], prompt)
        for start in range(0, x.shape[0], batch):
            chunk = x[start:start + batch]
            nats = pipe.flow.log_prob(chunk, mx.repeat(y, chunk.shape[0], axis=0))
            out[start:start + chunk.shape[0], j] = -np.array(nats, np.float64) / (dims * math.log(2))
    return out


def posterior(bits: np.ndarray, dims: int) -> np.ndarray:
    nats = -bits * dims * math.log(2)
    shifted = np.exp(nats - nats.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray) -> float:
    confidence, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0, 1, BINS + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


# -- statistics -----------------------------------------------------------------------------------
def statistics(pipe, pixels: np.ndarray, x: mx.array, classes: list[str], reference_mean: float,
               labels: np.ndarray) -> dict:
    """Each outlier statistic (larger: more unusual) for inputs ``x`` whose 8-bit form is ``pixels``; ``labels``:
    the class each input claims (a corrupted input keeps its source's)."""
    null = bits_matrix(pipe, x, [""])[:, 0]
    by_class = bits_matrix(pipe, x, classes)
    png = np.array([png_bits_per_dim(p if p.ndim == 4 else p[None, ..., None]) for p in pixels])
    return {"bits": null, "complexity": null - png, "typicality": np.abs(null - reference_mean),
            "ratio": by_class.min(axis=1) - null, "bits given its class": by_class[np.arange(len(x)), labels]}


def batch_typicality(inliers: np.ndarray, outliers: np.ndarray, reference_mean: float, rng, draws: int = 500):
    """AUROC of |mean of a batch - reference mean| over random batches of each set."""
    def pick(values: np.ndarray) -> np.ndarray:
        batches = values[rng.integers(len(values), size=(draws, TYPICAL_BATCH))]
        return np.abs(batches.mean(axis=1) - reference_mean)

    return auroc(pick(inliers), pick(outliers))


def image_outliers(pipe, rng, train, test, labels) -> tuple[dict, float]:
    classes = list(pipe.manifest.classes)
    train_x = prepared(pipe, [Image.fromarray(a) for a in to_uint8(train[:500])])
    reference_mean = float(bits_matrix(pipe, train_x, [""])[:, 0].mean())
    real = to_uint8(test)
    inliers = statistics(pipe, real, prepared(pipe, [Image.fromarray(a) for a in real]), classes, reference_mean,
                         labels)
    table = {}
    for name, images in corruptions(test, rng).items():
        stats = statistics(pipe, images, prepared(pipe, [Image.fromarray(a) for a in images]), classes, reference_mean,
                           labels)
        row = {k: auroc(inliers[k], stats[k]) for k in inliers}
        row[f"typicality (batches of {TYPICAL_BATCH})"] = batch_typicality(inliers["bits"], stats["bits"],
                                                                          reference_mean, rng)
        table[name] = row
    return table, reference_mean


def video_corruptions(clips: np.ndarray) -> dict[str, np.ndarray]:
    swapped = clips.copy()
    swapped[:, [1, 3]] = clips[:, [3, 1]]
    return {"two frames swapped": swapped, "reversed": clips[:, ::-1].copy(),
            "frozen on frame 0": np.repeat(clips[:, :1], clips.shape[1], axis=1)}


def video_benchmark(count: int, rng) -> dict:
    from starflow_mlx.training.moving_digits import load_moving_digits_split

    pipe = load_pipeline("demo-video")
    train, test = load_moving_digits_split()
    picks = rng.choice(len(test.images), size=min(count, len(test.images)), replace=False)
    as_u8 = lambda c: np.repeat(np.clip(np.round((c + 1.0) * 127.5), 0, 255).astype(np.uint8), 3, axis=-1)  # noqa: E731
    clips, labels = as_u8(test.images[picks]), test.labels[picks]
    classes = list(pipe.manifest.classes)
    x = prepared(pipe, list(clips))
    bits = bits_matrix(pipe, x, classes, batch=128)
    p = posterior(bits, math.prod(x.shape[1:]))
    digit = p.reshape(len(p), 10, 4).sum(axis=2)
    direction = p.reshape(len(p), 10, 4).sum(axis=1)
    result = {"clips": len(clips),
              "digit accuracy": float((digit.argmax(1) == labels // 4).mean()),
              "direction accuracy": float((direction.argmax(1) == labels % 4).mean()),
              "both accuracy": float((p.argmax(1) == labels).mean()),
              "digit ECE": expected_calibration_error(digit, labels // 4),
              "direction ECE": expected_calibration_error(direction, labels % 4)}
    reference = as_u8(train.images[rng.choice(len(train.images), size=min(count, len(train.images)), replace=False)])
    reference_mean = float(bits_matrix(pipe, prepared(pipe, list(reference)), [""])[:, 0].mean())
    gray = lambda c: c[..., :1]  # noqa: E731 - the compressor sees the model's one channel
    inliers = statistics(pipe, gray(clips), x, classes, reference_mean, labels)
    table = {}
    for name, changed in video_corruptions(clips).items():
        stats = statistics(pipe, gray(changed), prepared(pipe, list(changed)), classes, reference_mean, labels)
        row = {k: auroc(inliers[k], stats[k]) for k in inliers}
        row[f"typicality (batches of {TYPICAL_BATCH})"] = batch_typicality(inliers["bits"], stats["bits"],
                                                                          reference_mean, rng)
        table[name] = row
    result["outliers"] = table
    return result


def ranking(pipe, rng, reference_mean: float) -> dict:
    """20 corrupted digits among 1000 real ones, the top 20 per statistic. The real ones are 1000 of scikit-learn's
    1797 digits, most of them from the demo's train split: the test split alone holds 359."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = rng.permutation(len(digits.images))
    real, victims = digits.images[order[:1000]], digits.images[order[1000:1020]]
    kinds = corruptions(victims, rng)
    names = list(kinds)
    planted = np.stack([kinds[names[i % len(names)]][i] for i in range(20)])
    images = np.concatenate([to_uint8(real), planted])
    stats = statistics(pipe, images, prepared(pipe, [Image.fromarray(a) for a in images]), list(pipe.manifest.classes),
                       reference_mean, digits.target[order[:1020]])
    return {k: int((np.argsort(-v)[:20] >= 1000).sum()) for k, v in stats.items()}


def throughput(pipe, images: list, repeats: int = 2) -> dict:
    out = {}
    for size in (16, 1):
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            pipe.score_many(images, "", batch_size=size)
            best = min(best, time.perf_counter() - start)
        out[f"batch {size}"] = len(images) / best
    return out


def step(name: str, value) -> None:
    """A finished part, on stderr as it completes (the whole run takes many minutes on a busy CPU)."""
    print(f"{name}: {json.dumps(value)}", file=sys.stderr, flush=True)


def measure(clips: int = 100, seed: int = 0) -> dict:
    from starflow_mlx.benchmarks.demo_quality import digit_classifier, to_features
    from starflow_mlx.training.data import load_digits_split

    rng = np.random.default_rng(seed)
    pipe = load_pipeline("demo")
    train, _, test, labels = digits_0_16()
    x = prepared(pipe, [Image.fromarray(a) for a in to_uint8(test)])
    p = posterior(bits_matrix(pipe, x, list(pipe.manifest.classes)), math.prod(x.shape[1:]))
    split_train, split_test = load_digits_split()
    clf = digit_classifier(split_train)
    q = clf.predict_proba(to_features(split_test.images))
    result = {"classifier": {
        "test digits": len(labels),
        "flow accuracy": float((p.argmax(1) == labels).mean()),
        "flow ECE": expected_calibration_error(p, labels),
        "logistic regression accuracy": float((q.argmax(1) == split_test.labels).mean()),
        "logistic regression ECE": expected_calibration_error(q, split_test.labels)}}
    step("classifier", result["classifier"])
    result["image outliers (AUROC)"], reference_mean = image_outliers(pipe, rng, train, test, labels)
    step("image outliers", result["image outliers (AUROC)"])
    result["ranking (planted in top 20, of 20)"] = ranking(pipe, rng, reference_mean)
    step("ranking", result["ranking (planted in top 20, of 20)"])
    result["throughput (images/s)"] = throughput(pipe, [Image.fromarray(a) for a in to_uint8(test[:200])])
    step("throughput", result["throughput (images/s)"])
    result["video"] = video_benchmark(clips, rng)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100, help="test clips for the video measures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    result = measure(args.clips, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from starflow_mlx.io.staging import write_file

        write_file(args.json, (text + "\n").encode("utf-8"), overwrite=True)  # a report: the latest run


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
