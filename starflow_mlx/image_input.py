"""Open an image given by the user (``score``, ``generate --from-metadata``) without trusting it.

A PNG of a few kilobytes can declare billions of pixels (a decompression bomb). PIL only warns
below twice its own limit, so the size is checked here, from the header, before any pixel is decoded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64 * 2**20  # 64 megapixels: 8192 x 8192, far above any size a model generates or scores


class ImageInputError(ValueError):
    """The image cannot be used: missing, unreadable, or too large."""


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """The decoded image at ``path``; any problem (missing, not an image, too large) is one ImageInputError line."""
    path = Path(path)
    if path.is_dir():
        raise ImageInputError(f"{what} {path} is a folder: give an image file")
    if not path.is_file():
        raise ImageInputError(f"{what} {path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the stricter limit below applies
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageInputError(f"{what} {path} declares {width}x{height} pixels, more than the "
                                          f"{MAX_PIXELS >> 20} megapixels accepted (a decompression bomb?)")
                img.load()
                return img.copy()
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ImageInputError(f"cannot read {what} {path} ({reason})") from None
