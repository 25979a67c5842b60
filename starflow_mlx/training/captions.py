"""Captioned training data for text-conditioned models: which files, which captions, which are held out.

A folder holds images (or mp4 clips for a video model), each captioned either by a same-named
``.txt`` file beside it (the kohya / mflux convention) or by a ``metadata.jsonl`` whose lines are
``{"file_name": ..., "text": ...}`` (Hugging Face imagefolder). A file that cannot be used (no
caption, unreadable, a caption longer than the text encoder reads, a clip too short) is one line
through :class:`BadItems`: skipped or refused as the user chose (``--on-bad-item skip|fail``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from starflow_mlx.training.data import IMAGE_SUFFIXES, DataError

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv")
METADATA = "metadata.jsonl"
ON_BAD_CHOICES = ("skip", "fail")
MAX_CAPTION_BYTES = 1 << 16


@dataclass(frozen=True)
class CaptionedItem:
    path: Path
    caption: str


class BadItems:
    """Where an unusable item goes: ``fail`` raises its line as a DataError, ``skip`` reports it and goes on."""

    def __init__(self, mode: str = "fail", report: Callable[[str], None] | None = None):
        if mode not in ON_BAD_CHOICES:
            raise DataError(f"--on-bad-item must be {' or '.join(ON_BAD_CHOICES)}, got {mode!r}")
        self.mode, self.report, self.skipped = mode, report or (lambda line: None), []

    def __call__(self, path: Path | str, problem: str) -> None:
        if self.mode == "fail":
            raise DataError(f"{path}: {problem} (or pass --on-bad-item skip to leave such files out)")
        self.skipped.append(str(path))
        self.report(f"skipped {path}: {problem}")


def _read_caption(path: Path) -> str | None:
    if path.stat().st_size > MAX_CAPTION_BYTES:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError):
        return None


def _from_metadata(folder: Path, suffixes: tuple[str, ...], bad: BadItems) -> list[CaptionedItem]:
    items = []
    with open(folder / METADATA, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            name, text = (record.get("file_name"), record.get("text")) if isinstance(record, dict) else (None, None)
            if not isinstance(name, str) or not isinstance(text, str):
                bad(f"{folder / METADATA} line {number}", 'not {"file_name": "...", "text": "..."}')
                continue
            path = folder / name
            if folder.resolve() not in path.resolve().parents:
                bad(f"{folder / METADATA} line {number}", f"{name!r} is outside {folder}")
            elif path.suffix.lower() not in suffixes:
                bad(path, f"not a {'/'.join(suffixes)} file")
            elif not path.is_file():
                bad(path, f"named in {METADATA} but missing")
            else:
                items.append(CaptionedItem(path, text.strip()))
    return items


def scan_captioned(folder: str | Path, video: bool, bad: BadItems) -> list[CaptionedItem]:
    """The captioned files of ``folder`` in name order (images, or clips for a ``video`` model)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give a folder of {'clips' if video else 'images'} with captions")
    suffixes = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
    if (folder / METADATA).is_file():
        items = _from_metadata(folder, suffixes, bad)
    else:
        items = []
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes):
            caption = _read_caption(path.with_suffix(".txt")) if path.with_suffix(".txt").is_file() else None
            if caption is None:
                bad(path, f"no caption: add {path.with_suffix('.txt').name} (UTF-8 text) or a {METADATA}")
            else:
                items.append(CaptionedItem(path, caption))
    return items


def split_holdout(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a ``fraction`` held out (at least one), the same for the same seed."""
    if not 0 < fraction < 1:
        raise DataError(f"--holdout must be between 0 and 1 (a fraction of the items), got {fraction}")
    if count < 2:
        raise DataError(f"{count} usable item(s): LoRA training needs at least 2 (one is held out to measure it)")
    order = np.random.default_rng(seed).permutation(count)
    n_held = min(max(int(round(count * fraction)), 1), count - 1)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


# -- encoded data ------------------------------------------------------------------------
@dataclass
class Bucket:
    """Items of one aspect ratio: their latents (N, ...), caption features (N, L, D), and the empty caption's
    features (L, D), which caption dropout swaps in (the template around it names the ratio)."""

    ratio: str
    latents: np.ndarray
    text: np.ndarray
    empty: np.ndarray


@dataclass
class CaptionedDataset:
    """Encoded captioned items, in aspect-ratio buckets (one bucket unless the model is mixed-aspect)."""

    buckets: list[Bucket]

    def __len__(self) -> int:
        return sum(len(b.latents) for b in self.buckets)

    def batch(self, seed: int, step: int, count: int, drop: float):
        """(x, y, key) of a step, fixed by (seed, step): a bucket drawn by its size, items from it, and each
        caption replaced by the empty one with probability ``drop`` (for guidance)."""
        import mlx.core as mx

        rng = np.random.default_rng((seed, step))
        sizes = np.array([len(b.latents) for b in self.buckets], np.float64)
        bucket = self.buckets[int(rng.choice(len(sizes), p=sizes / sizes.sum()))]
        idx = rng.choice(len(bucket.latents), size=count, replace=len(bucket.latents) < count)
        dropped = rng.random(count) < drop
        y = np.where(dropped[:, None, None], bucket.empty[None], bucket.text[idx])
        key = mx.random.key(int(rng.integers(2**31)))
        return mx.array(bucket.latents[idx]), mx.array(y), key

    def bits_per_dim(self, flow, noise_std: float, batch: int = 8, seed: int = 1) -> float:
        """Bits per dimension of every item under ``flow`` given its caption (training noise, fixed seed)."""
        import mlx.core as mx

        from starflow_mlx.training.trainer import bits_per_dim, nll_per_dim

        rng = np.random.default_rng(seed)
        total = dims = 0.0
        for b in self.buckets:
            for start in range(0, len(b.latents), batch):
                x = b.latents[start:start + batch]
                x = x + noise_std * rng.standard_normal(x.shape).astype(np.float32)
                nll = nll_per_dim(flow, mx.array(x), mx.array(b.text[start:start + batch]))
                total += float(mx.sum(nll).item()) * x[0].size
                dims += x.size
        return bits_per_dim(total / dims)
