"""PNG output: generation parameters in text chunks, grids, deterministic atomic writes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

METADATA_KEY = "starflow-mlx"


def save_png(image: Image.Image, path: str | Path, params: dict) -> None:
    """Write ``image`` with ``params`` as JSON metadata; same inputs give the same bytes."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(params, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path) -> dict:
    """The generation parameters stored by :func:`save_png`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    try:
        with Image.open(path) as img:
            text = img.text.get(METADATA_KEY) if hasattr(img, "text") else None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read {path} as a PNG ({exc})") from None
    if text is None:
        raise ValueError(f"{path} carries no starflow-mlx generation metadata")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{path} has damaged starflow-mlx metadata") from None


def grid(images: list[Image.Image], pad: int = 2) -> Image.Image:
    """Tile images in a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    canvas = Image.new(images[0].mode, (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad))
    for i, img in enumerate(images):
        canvas.paste(img, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return canvas
