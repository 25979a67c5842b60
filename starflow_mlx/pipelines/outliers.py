"""Outlier statistics on top of exact likelihood, each larger for a more unusual input.

A flow's bits/dim alone is a poor outlier score: simple inputs (constant images, some other
datasets) can be *more* likely than the training data (Nalisnick et al. 2019, "Do deep generative
models know what they don't know?"). Besides raw bits/dim (``bits``) this module offers:

* ``complexity``: bits/dim minus a lossless compressor's code length per dimension of the same
  8-bit input (Serrà et al. 2020, "Input complexity and out-of-distribution detection"): how much
  worse the model does than a generic compressor. The compressor is PNG at its highest level; the
  input is the model's pixels (pixel-space models) or the input resized to the model's size.
* ``typicality``: the distance of bits/dim from the reference set's mean (Nalisnick et al. 2019,
  "Detecting out-of-distribution inputs to deep generative models using typicality"). For a batch
  the test statistic is ``|mean(batch) - mean(reference)|``, its threshold the (1 - alpha) quantile of
  the same statistic over bootstrap batches of the reference.
* ``ratio``: bits/dim given the prompt minus bits/dim given the null prompt (the empty prompt, the
  unconditional class), i.e. -log2 of the likelihood ratio per dimension. In-distribution inputs are
  explained better by their prompt (a negative value); exactly 0 when the prompt is the null prompt.

A threshold is fitted on a reference folder of in-distribution inputs: the statistic's
``1 - alpha`` quantile there (95th percentile by default).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from starflow_mlx.pipelines.scoring import VIDEO_SUFFIXES, ScoreRow, iter_scores, prepare

STATISTICS = ("bits", "complexity", "typicality", "ratio")
NULL_PROMPT = ""


def png_bits_per_dim(pixels: np.ndarray) -> float:
    """PNG code length (highest compression) of uint8 frames (T, H, W, C), in bits per pixel value."""
    total = 0
    for frame in pixels:
        buffer = io.BytesIO()
        Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(buffer, format="PNG", compress_level=9)
        total += len(buffer.getvalue()) * 8
    return total / pixels.size


def input_pixels(pipe, item, prompt: str, fps: int | None = None) -> np.ndarray:
    """The 8-bit input the compressor sees, (T, H, W, C): the model's own pixels (pixel-space models), else
    the input resized to the model's pixel size (a latent model's input is not pixels)."""
    x, _ = prepare(pipe, item, prompt, fps)
    if pipe.manifest.vae is None:
        data = np.array(x[0]) / pipe.manifest.pixel_scale
        pixels = np.clip((data + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        return pixels if pixels.ndim == 4 else pixels[None]
    size = (x.shape[-2] * pipe.vae.factor, x.shape[-3] * pipe.vae.factor)
    if isinstance(item, (str, Path)):
        if Path(item).suffix.lower() in VIDEO_SUFFIXES:
            from starflow_mlx.pipelines.video_io import read_video

            item, _ = read_video(item)
        else:
            from starflow_mlx.io.image_input import open_image

            item = open_image(item)
    if isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB").resize(size, Image.BICUBIC))[None]
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in np.asarray(item)])


def typicality_threshold(reference_bits: np.ndarray, batch: int, alpha: float = 0.05, draws: int = 2000,
                         seed: int = 0) -> float:
    """The (1 - alpha) quantile of |mean(bootstrap batch) - mean(reference)| over ``draws`` batches of ``batch``
    reference scores drawn with replacement."""
    reference_bits = np.asarray(reference_bits, np.float64)
    rng = np.random.default_rng(seed)
    means = reference_bits[rng.integers(len(reference_bits), size=(draws, batch))].mean(axis=1)
    return float(np.quantile(np.abs(means - reference_bits.mean()), 1 - alpha))


@dataclass
class TypicalityTest:
    batch: int
    distance: float  # |mean bits/dim of the batch - mean of the reference|
    threshold: float

    @property
    def typical(self) -> bool:
        return self.distance <= self.threshold


def typicality_test(bits: np.ndarray, reference_bits: np.ndarray, alpha: float = 0.05) -> TypicalityTest:
    bits = np.asarray(bits, np.float64)
    distance = float(abs(bits.mean() - np.mean(reference_bits)))
    return TypicalityTest(len(bits), distance, typicality_threshold(reference_bits, len(bits), alpha))


def statistic(pipe, stat: str, items: list, rows: list[ScoreRow], prompt: str, *, fps: int | None = None,
              batch_size: int | None = None, reference_bits: np.ndarray | None = None) -> np.ndarray:
    """``stat`` for each scored row (NaN where the row failed); ``typicality`` needs ``reference_bits``."""
    if stat not in STATISTICS:
        raise ValueError(f"unknown outlier statistic {stat!r}: use one of {', '.join(STATISTICS)}")
    bits = np.array([np.nan if r.bits_per_dim is None else r.bits_per_dim for r in rows])
    if stat == "bits":
        return bits
    if stat == "typicality":
        if reference_bits is None:
            raise ValueError("the typicality statistic needs the reference set's bits/dim")
        return np.abs(bits - np.mean(reference_bits))
    if stat == "ratio":
        null = iter_scores(pipe, items, NULL_PROMPT, fps=fps, batch_size=batch_size)
        return bits - np.array([np.nan if n.bits_per_dim is None else n.bits_per_dim for n in null])
    out = np.full(len(rows), np.nan)
    for i, (item, row) in enumerate(zip(items, rows)):
        if row.error is None:
            out[i] = bits[i] - png_bits_per_dim(input_pixels(pipe, item, prompt, fps))
    return out


def threshold(reference_stat: np.ndarray, alpha: float = 0.05) -> float:
    """The (1 - alpha) quantile of the statistic on in-distribution inputs: above it is an outlier."""
    values = np.asarray(reference_stat, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        raise ValueError("no reference input could be scored: the threshold needs at least one")
    return float(np.quantile(values, 1 - alpha))


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Area under the ROC curve of a statistic that should be larger for outliers (ties count half)."""
    a, b = np.asarray(inliers, np.float64), np.asarray(outliers, np.float64)
    greater = (b[:, None] > a[None, :]).sum() + 0.5 * (b[:, None] == a[None, :]).sum()
    return float(greater / (len(a) * len(b)))
