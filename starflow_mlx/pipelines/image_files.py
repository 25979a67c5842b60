"""Image files: PNG, JPEG and WebP carrying their generation parameters, grids, staged writes, file names.

The parameters are JSON: a PNG text chunk (``starflow-mlx``), and for JPEG and WebP the
EXIF ImageDescription tag (ASCII JSON), which both formats have a place for. The same
image and parameters give the same bytes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

METADATA_KEY = "starflow-mlx"
EXIF_DESCRIPTION = 0x010E
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = {"JPEG": 95, "WEBP": 90}
GUTTER = 224  # light grey: visible between tiles with dark backgrounds (digits) and light ones
HEADER_BYTES = 4096  # file headers and metadata, on the generous side


def image_format(path: Path) -> str:
    """The Pillow format a file name asks for; anything else is refused by name."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: the file name must end in .png, .jpg, .jpeg or .webp")
    return fmt


def file_bytes(width: int, height: int, channels: int) -> int:
    """An upper bound on one file's size (PNG's worst case is about the raw pixels)."""
    return width * height * channels + HEADER_BYTES


def _write(image: Image.Image, path: Path, params: dict) -> None:
    fmt = image_format(path)
    text = json.dumps(params, sort_keys=True)  # ASCII: non-ASCII prompt characters are escaped
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, text)
        image.save(path, format="PNG", pnginfo=info)
        return
    exif = Image.Exif()
    exif[EXIF_DESCRIPTION] = text
    image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
        path, format=fmt, quality=QUALITY[fmt], exif=exif.tobytes())


def save_images(items: list[tuple[Image.Image, Path, dict]], overwrite: bool = False) -> None:
    """Write each (image, path, params) with ``params`` as metadata; same inputs give the same bytes.

    Every file is written to a temporary name first and published only when all are written
    (:mod:`starflow_mlx.io.staged_files`), so a failure leaves none of them behind; an existing file
    is replaced only with ``overwrite``.
    """
    from starflow_mlx.io.staged_files import StagedFiles

    for _, path, _ in items:
        image_format(Path(path))
    with StagedFiles(overwrite) as staged:
        for image, path, params in items:
            _write(image, staged.add(path), params)


def read_metadata(path: str | Path) -> dict:
    """The generation parameters stored by :func:`save_images`."""
    from starflow_mlx.io.image_input import open_image

    img = open_image(path)  # bounded: a decompression bomb is refused from its header
    # PNG text chunks land in ``info``; JPEG and WebP carry the parameters in EXIF.
    text = img.info.get(METADATA_KEY) or img.getexif().get(EXIF_DESCRIPTION)
    if text is None:
        raise ValueError(f"{path} carries no starflow-mlx generation metadata")
    try:
        params = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        params = None
    if not isinstance(params, dict):
        raise ValueError(f"{path} has damaged starflow-mlx metadata")
    return params


def grid_shape(count: int) -> tuple[int, int]:
    """(columns, rows) of a near-square grid."""
    cols = math.ceil(math.sqrt(count))
    return cols, math.ceil(count / cols)


def grid(images: list[Image.Image], pad: int = 2) -> Image.Image:
    """Tile images in a near-square grid, row by row, with light gutters."""
    cols, rows = grid_shape(len(images))
    w, h = images[0].size
    fill = GUTTER if images[0].mode == "L" else (GUTTER,) * len(images[0].getbands())
    canvas = Image.new(images[0].mode, (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), fill)
    for i, img in enumerate(images):
        canvas.paste(img, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return canvas


def slug(prompt: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt: 'a film still of a cat' -> 'a-film-still-of-a-cat'."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if len(words) > limit:
        words = words[:limit].rsplit("-", 1)[0]
    return words or "image"


def free_name(path: Path) -> Path:
    """``path``, or ``stem-2.ext``, ``stem-3.ext``... : the first name not taken."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
