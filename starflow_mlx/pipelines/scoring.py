"""Exact likelihood over many inputs: score a dataset, classify by likelihood, split a score by token.

Every number is :meth:`Pipeline.score`'s convention (module doc of ``pipelines/image.py``): bits per
dimension of the flow's data (latents, or pixels for pixel-space models), no noise added. Inputs are
prepared one by one exactly as ``score`` prepares them, then evaluated in batches of equal shape; a
batch gives each input the number it gets alone (up to float32 rounding of the batched matmuls).

An input that cannot be read (damaged, too large, a clip given to an image model) becomes a row
carrying its error; the others are still scored.
"""

from __future__ import annotations

import glob
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import numpy as np
from PIL import Image

from starflow_mlx.advice import cli_message
from starflow_mlx.pipelines.prompts import ASPECT_RATIOS, latent_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4",)
DEFAULT_BATCH = 16  # inputs evaluated together: enough to amortize the per-call overhead of a small model


@dataclass
class ScoreRow:
    """One input's score, or why it has none."""

    path: str
    prompt: str
    bits_per_dim: float | None = None
    frame_bits: list[float] | None = None  # videos: each latent frame given the frames before it
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Classification:
    """Bayes with a uniform prior over ``prompts``: p(c | x) is the softmax of log p(x | c) in nats."""

    path: str
    prompts: list[str]
    log_likelihoods: list[float]  # nats, log p(x | prompt)
    probabilities: list[float]
    bits_per_dim: list[float]

    @property
    def best(self) -> str:
        return self.prompts[int(np.argmax(self.log_likelihoods))]

    def word_marginals(self) -> dict[int, dict[str, float]]:
        """For class names of several words ("7 moving right"): the probability of each word at each
        position (from 0) where the names differ, summed over the other positions (digit, then direction)."""
        names = [p.split() for p in self.prompts]
        if len(names) < 2 or len({len(n) for n in names}) != 1 or len(names[0]) < 2:
            return {}
        out = {}
        for k in range(len(names[0])):
            totals: dict[str, float] = {}
            for name, p in zip(names, self.probabilities):
                totals[name[k]] = totals.get(name[k], 0.0) + p
            if len(totals) > 1:
                out[k] = totals
        return out


def expand_inputs(items: Iterable) -> list:
    """Files as given, folders as their images and videos (recursively, sorted), globs as their matches;
    images (PIL) and clips (uint8 arrays) pass through. A missing file stays, to become an error row."""
    out = []
    for item in items:
        if not isinstance(item, (str, Path)):
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES
                           and p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"folder {path} holds no images or .mp4 videos")
            out.extend(found)
        elif not path.exists() and glob.has_magic(str(path)):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"no file matches {path}")
            out.extend(found)
        else:
            out.append(path)
    if not out:
        raise ValueError("nothing to score: give image or video files, folders or globs")
    return out


def input_name(item, index: int) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    return f"<{'image' if isinstance(item, Image.Image) else 'video'} {index}>"


def is_video_pipeline(pipe) -> bool:
    return pipe.VIDEO


def prepare(pipe, item, prompt: str, fps: int | None = None) -> tuple[mx.array, mx.array]:
    """(x, y) for one input, as ``score`` prepares it; a wrong kind of input is a ValueError naming it."""
    video = is_video_pipeline(pipe)
    if isinstance(item, (str, Path)):
        path = Path(item)
        is_clip = path.suffix.lower() in VIDEO_SUFFIXES
        if is_clip != video:
            kind = "a video" if video else "an image"
            raise ValueError(f"{path} is {'a video' if is_clip else 'an image'} but the model is {kind} model")
        if not video:
            from starflow_mlx.io.image_input import open_image

            return pipe.prepare_score(open_image(path), prompt)
    elif isinstance(item, Image.Image) == video:
        raise ValueError(f"the model is {'a video' if video else 'an image'} model: give it "
                         f"{'uint8 frames (T, H, W, 3)' if video else 'a PIL image'}")
    if not video:
        return pipe.prepare_score(item, prompt)
    from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

    return pipe.prepare_score(item, prompt, fps or VIDEO_DEFAULTS["fps"])


def check_prompt(pipe, prompt: str) -> None:
    """An unknown class fails once, before any input is read."""
    if pipe.is_class_model:
        pipe.class_index(prompt)


def bits_per_dim(nats: mx.array, dims: int) -> np.ndarray:
    return -np.array(nats, dtype=np.float64) / (dims * math.log(2))


def _evaluate(pipe, group: list[tuple[ScoreRow, mx.array, mx.array]], video: bool) -> None:
    """Fill the rows of one group of equally shaped inputs from one batched forward pass."""
    x = mx.concatenate([g[1] for g in group])
    y = mx.concatenate([g[2] for g in group])
    if video:
        frames = bits_per_dim(pipe.flow.log_prob_frames(x, y), math.prod(x.shape[2:]))
        totals = frames.mean(axis=1)
    else:
        frames, totals = None, bits_per_dim(pipe.flow.log_prob(x, y), math.prod(x.shape[1:]))
    for i, (row, _, _) in enumerate(group):
        if not np.isfinite(totals[i]):
            row.error = "the model gave a non-finite likelihood (damaged weights, or try dtype float32)"
            continue
        row.bits_per_dim = float(totals[i])
        row.frame_bits = frames[i].tolist() if frames is not None else None


def iter_scores(pipe, inputs: Iterable, prompt: str, *, fps: int | None = None, batch_size: int | None = None,
                progress: Callable[..., None] | None = None) -> Iterator[ScoreRow]:
    """Yield one :class:`ScoreRow` per input, in order, ``batch_size`` inputs per forward pass.

    ``inputs``: paths (files, folders, globs), PIL images (image models) or uint8 clips (T, H, W, 3)
    (video models). ``progress("score", done, total)`` is called after each batch.
    """
    check_prompt(pipe, prompt)
    items = expand_inputs(inputs)
    size = batch_size or DEFAULT_BATCH
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    video = is_video_pipeline(pipe)
    report = progress or (lambda *a, **k: None)
    report("score", 0, len(items))
    for start in range(0, len(items), size):
        rows, groups = [], {}
        for index in range(start, min(start + size, len(items))):
            row = ScoreRow(input_name(items[index], index), prompt)
            rows.append(row)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    x, y = prepare(pipe, items[index], prompt, fps)
                row.warnings = [str(w.message) for w in caught]
            except (ValueError, OSError, MemoryError) as exc:
                row.error = cli_message(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                continue
            groups.setdefault((x.shape, y.shape), []).append((row, x, y))
        for group in groups.values():
            _evaluate(pipe, group, video)
        report("score", start + len(rows), len(items))
        yield from rows


def score_many(pipe, inputs: Iterable, prompt: str, **options) -> list[ScoreRow]:
    """:func:`iter_scores` as a list."""
    return list(iter_scores(pipe, inputs, prompt, **options))


def conditioning_for(pipe, x: mx.array, prompt: str, fps: int | None = None) -> mx.array:
    """The prompt's features for a prepared input ``x``, as ``prepare`` would make them (same size and rate)."""
    grid = tuple(x.shape[-3:-1])
    ratios = ASPECT_RATIOS if pipe.config.mix_aspect else ("1:1",)
    ratio = next(r for r in ratios if latent_size(pipe.config, r) == grid)
    if not is_video_pipeline(pipe):
        return pipe.conditioning(prompt, 1, ratio)[0]
    from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

    rate = (fps or VIDEO_DEFAULTS["fps"]) if x.shape[1] > 1 else 0
    return pipe.conditioning(prompt, 1, ratio, fps=rate)[0]


def candidate_prompts(pipe, prompts: list[str] | None) -> list[str]:
    if prompts:
        if len(set(prompts)) != len(prompts):
            raise ValueError("the candidate prompts repeat one: give each once")
        for prompt in prompts:
            check_prompt(pipe, prompt)
        return list(prompts)
    if pipe.is_class_model:
        return list(pipe.manifest.classes)
    raise ValueError("a text model classifies among candidate prompts: pass prompts=[...] (--prompts FILE)")


def log_likelihoods(pipe, x: mx.array, prompts: list[str], fps: int | None = None,
                    batch_size: int | None = None) -> np.ndarray:
    """log p(x | prompt) in nats for each prompt, ``x`` evaluated against ``batch_size`` prompts at a time."""
    size = batch_size or DEFAULT_BATCH
    out = []
    for start in range(0, len(prompts), size):
        chunk = prompts[start:start + size]
        y = mx.concatenate([conditioning_for(pipe, x, p, fps) for p in chunk])
        out.append(np.array(pipe.flow.log_prob(mx.repeat(x, len(chunk), axis=0), y), dtype=np.float64))
    return np.concatenate(out)


def classify(pipe, item, prompts: list[str] | None = None, *, fps: int | None = None,
             batch_size: int | None = None) -> Classification:
    """The class (or candidate prompt) under which ``item`` is most likely, and p(class | item) for each."""
    candidates = candidate_prompts(pipe, prompts)
    x, _ = prepare(pipe, item, candidates[0], fps)
    nats = log_likelihoods(pipe, x, candidates, fps, batch_size)
    if not np.all(np.isfinite(nats)):
        raise ValueError("the model gave a non-finite likelihood (damaged weights, or try dtype float32)")
    shifted = np.exp(nats - nats.max())
    probabilities = shifted / shifted.sum()
    dims = math.prod(x.shape[1:])
    return Classification(input_name(item, 0), candidates, nats.tolist(), probabilities.tolist(),
                          (-nats / (dims * math.log(2))).tolist())
