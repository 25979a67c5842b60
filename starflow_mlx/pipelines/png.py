"""PNG output: generation parameters in a text chunk, grids, deterministic atomic writes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

METADATA_KEY = "starflow-mlx"


def _file_mode() -> int:
    """Permissions a newly created file gets here (mkstemp's are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_pngs(items: list[tuple[Image.Image, Path, dict]]) -> None:
    """Write each (image, path, params) with ``params`` as JSON metadata; same inputs give the same bytes.

    Every file is written to a temporary name first and renamed only when all are written,
    so a failure leaves none of them behind.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for image, path, params in items:
            path = Path(path)
            info = PngImagePlugin.PngInfo()
            info.add_text(METADATA_KEY, json.dumps(params, sort_keys=True))
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            image.save(tmp, format="PNG", pnginfo=info)
            os.chmod(tmp, _file_mode())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def save_png(image: Image.Image, path: str | Path, params: dict) -> None:
    save_pngs([(image, Path(path), params)])


def read_metadata(path: str | Path) -> dict:
    """The generation parameters stored by :func:`save_pngs`."""
    from starflow_mlx.image_input import open_image

    text = open_image(path).info.get(METADATA_KEY)  # PNG text chunks land in ``info``
    if text is None:
        raise ValueError(f"{path} carries no starflow-mlx generation metadata")
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        params = None
    if not isinstance(params, dict):
        raise ValueError(f"{path} has damaged starflow-mlx metadata")
    return params


def grid(images: list[Image.Image], pad: int = 2) -> Image.Image:
    """Tile images in a near-square grid, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    canvas = Image.new(images[0].mode, (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad))
    for i, img in enumerate(images):
        canvas.paste(img, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return canvas
