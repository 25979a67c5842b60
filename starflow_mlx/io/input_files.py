"""The first check on a file path given by the user or named by a file: it exists and is a regular file.

``os.stat`` answers without opening anything, so a FIFO (whose ``open`` would block until
someone writes to it) or a device is refused by what it is, not reported as missing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def check_regular_file(path: str | Path, what: str, error: type[Exception] = ValueError,
                       missing: type[Exception] = FileNotFoundError) -> None:
    """One line, ``missing`` when nothing is there and ``error`` otherwise, unless ``path`` is a regular file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise missing(f"{what} {path} not found") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(mode):
        raise error(f"{what} {path} is a folder: give {'an' if what[:1] in 'aeiou' else 'a'} {what} file")
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is not a regular file (a FIFO, socket or device): give a file")
