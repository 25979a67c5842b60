"""Write a folder completely or not at all: build it beside its destination, then rename it into place."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_new_folder(output: Path, error: type[Exception] = FileExistsError) -> None:
    """Refuse an output that already exists with content (or is a file)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise error(f"output {output} already exists and is not empty: choose a new folder or delete it")


@contextmanager
def staged_folder(output: str | Path, replace: bool = False,
                  error: type[Exception] = FileExistsError) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``output`` when the block ends without an exception.

    With ``replace`` an existing ``output`` is swapped out only once the new one is complete;
    otherwise a non-empty ``output`` raises ``error``. On failure the temporary folder is removed.
    """
    output = Path(output)
    if not replace:
        check_new_folder(output, error)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield staging
        if output.exists():
            old = staging.with_name(staging.name + ".old")
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
