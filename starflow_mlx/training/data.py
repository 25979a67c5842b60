"""Training data: scikit-learn's 8x8 digits, or a folder of images with one sub-folder per class.

Images come out channels-last in [-1, 1] with integer labels; splits are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starflow_mlx.advice import option_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(ValueError):
    """A dataset cannot be read."""


@dataclass
class Dataset:
    images: np.ndarray  # (N, H, W, C) images or (N, T, H, W, C) clips, float32 in [-1, 1]
    labels: np.ndarray  # (N,) int
    classes: list[str]
    prompt_help: str | None = None  # what a prompt looks like, when class names follow a pattern
    words: list[str] | None = None  # class names are sentences of these words (pipelines.prompts.class_features)

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """The label "text" of every sample, (N, L, D), and of the empty class, (L, D)."""
        from starflow_mlx.pipelines.prompts import class_features

        table = class_features(self.classes, self.words)
        return table[self.labels], table[-1]

    def __len__(self) -> int:
        return len(self.labels)


def _split(images: np.ndarray, labels: np.ndarray, classes: list[str], test_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = max(int(round(len(labels) * test_fraction)), 1)  # an empty test set has no bits/dim
    test, train = order[:n_test], order[n_test:]
    return Dataset(images[train], labels[train], classes), Dataset(images[test], labels[test], classes)


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The 1,797 8x8 digits that ship with scikit-learn, as (train, test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError('the digits data needs scikit-learn: pip install "starflow-mlx[train]"') from None
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return _split(images, digits.target.astype(np.int64), [str(i) for i in range(10)], test_fraction, seed)


def load_image_folder(folder: str | Path, size: int, channels: int = 1, test_fraction: float = 0.1,
                      seed: int = 0) -> tuple[Dataset, Dataset]:
    """Every image under ``folder/<class>/``, resized to ``size`` x ``size``."""
    from PIL import Image

    from starflow_mlx.io.image_input import open_image  # bounded: a decompression bomb is refused from its header
    from starflow_mlx.io.memory import memory_limit

    if channels not in (1, 3):
        raise option_error(DataError, "channels", f" must be 1 (grayscale) or 3 (RGB), got {channels}",
                           "--image-channels")
    if size < 1:
        raise option_error(DataError, "size", f" must be at least 1, got {size}", "--image-size")
    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise DataError(f"{folder} has no class sub-folders: expected {folder}/<class name>/<images>")
    paths = [(index, path) for index, name in enumerate(classes) for path in sorted((folder / name).iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES]
    if len(paths) < 2:  # one in ten (at least one) is held out to measure the trained model
        raise DataError(f"{folder} holds {len(paths)} images ({', '.join(IMAGE_SUFFIXES)}): training needs at least 2")
    # Decoded, resized and then stacked: twice the float32 pixels, refused before the first image is read.
    needed, total = 2 * len(paths) * size * size * channels * 4, memory_limit()
    if total is not None and needed > total:
        raise DataError(f"{len(paths)} images of {size}x{size} need about {needed / 2**30:.1f} GB of memory but "
                        f"{total / 2**30:.1f} GB is available: use a smaller --image-size")
    images, labels = [], []
    for index, path in paths:
        img = open_image(path).convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, np.float32) / 127.5 - 1.0
        images.append(arr[..., None] if channels == 1 else arr)
        labels.append(index)
    return _split(np.stack(images), np.array(labels), classes, test_fraction, seed)

