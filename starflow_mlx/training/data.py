"""Training data: scikit-learn's 8x8 digits, or a folder of images with one sub-folder per class.

Images come out channels-last in [-1, 1] with integer labels; splits are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(ValueError):
    """A dataset cannot be read."""


@dataclass
class Dataset:
    images: np.ndarray  # (N, H, W, C) float32 in [-1, 1]
    labels: np.ndarray  # (N,) int
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _split(images: np.ndarray, labels: np.ndarray, classes: list[str], test_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
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
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise DataError(f"{folder} has no class sub-folders: expected {folder}/<class name>/<images>")
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read image {path}: {exc}") from None
            arr = np.asarray(img, np.float32) / 127.5 - 1.0
            images.append(arr[..., None] if channels == 1 else arr)
            labels.append(index)
    if not images:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return _split(np.stack(images), np.array(labels), classes, test_fraction, seed)


def one_hot_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class conditioning as a length-1 'text': one-hot rows over the classes plus the empty class (last)."""
    return np.eye(num_classes + 1, dtype=np.float32)[labels][:, None, :]
