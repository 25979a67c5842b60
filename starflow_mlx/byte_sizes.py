"""Sizes in messages: enough digits that a small size never reads as 0."""

from __future__ import annotations


def describe_bytes(count: int | float) -> str:
    """``count`` bytes as bytes, KB, MB or GB (powers of 1024), with three significant digits at least."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if count >= size:
            value = count / size
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"
    return f"{int(count)} bytes"
