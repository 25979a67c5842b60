"""Open an image given by the user (``score``, ``generate --from-metadata``) without trusting it.

A PNG of a few kilobytes can declare billions of pixels (a decompression bomb). PIL only warns
below twice its own limit, so the size is checked here, from the header, before any pixel is decoded.
An ICO holds several pictures whose own headers (an embedded PNG or bitmap) may declare far more than
the icon's directory: every one is checked. Only formats whose header gives the size that is decoded
are opened at all. The picture is turned upright as its EXIF orientation says (phone photos).
"""

from __future__ import annotations

import struct
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from starflow_mlx.io.input_files import check_regular_file

MAX_PIXELS = 64 * 2**20  # 64 megapixels: 8192 x 8192, far above any size a model generates or scores
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO")  # (JPEG includes MPO) read; others refused
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ICO_MAGIC = b"\x00\x00\x01\x00"


class ImageInputError(ValueError):
    """The image cannot be used: missing, unreadable, or too large."""


def _ico_sizes(handle) -> list[tuple[int, int]]:
    """The size every picture of an ICO declares in its own header (what decoding it would allocate).
    PIL decodes the largest one inside ``Image.open``, so this reads the directory itself, first."""
    head = handle.read(6)
    if len(head) < 6 or head[:4] != ICO_MAGIC:
        return []
    sizes = []
    for index in range(struct.unpack("<H", head[4:6])[0]):
        handle.seek(6 + 16 * index + 12)
        offset = handle.read(4)
        if len(offset) < 4:
            break
        handle.seek(struct.unpack("<I", offset)[0])
        picture = handle.read(24)
        if picture[:8] == PNG_MAGIC and len(picture) >= 24:
            sizes.append(struct.unpack(">II", picture[16:24]))
        elif len(picture) >= 12 and struct.unpack("<I", picture[:4])[0] == 12:  # OS/2 bitmap: 16-bit sides
            w, h = struct.unpack("<HH", picture[4:8])
            sizes.append((w, h // 2))
        elif len(picture) >= 12:  # Windows bitmap header; the height counts the mask too
            w, h = struct.unpack("<ii", picture[4:12])
            sizes.append((abs(w), abs(h) // 2))
    return sizes


def _check_size(label: str, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"{label} declares {width}x{height} pixels, more than the "
                              f"{MAX_PIXELS >> 20} megapixels accepted (a decompression bomb?)")


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """The decoded image at ``path``; any problem (missing, not an image, too large) is one ImageInputError line."""
    path = Path(path)
    check_regular_file(path, what, ImageInputError, ImageInputError)
    return decode_image(path, f"{what} {path}")


def decode_image(source: Path | BinaryIO, label: str) -> Image.Image:
    """The image in ``source`` (a file's path, or a seekable binary file such as an upload's bytes), checked as this
    module says; any problem is one ImageInputError line naming ``label``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the stricter limit below applies
            with open(source, "rb") if isinstance(source, Path) else nullcontext(source) as handle:
                for size in _ico_sizes(handle):
                    _check_size(label, size)
                handle.seek(0)
                with Image.open(handle, formats=FORMATS) as img:
                    _check_size(label, img.size)
                    img.load()
                    return ImageOps.exif_transpose(img)
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"cannot read {label}: not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} "
                              "image, or damaged") from None
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ImageInputError(f"cannot read {label} ({reason})") from None
