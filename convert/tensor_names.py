"""The one check that a file holds exactly the tensors a model expects, named in one line."""

from __future__ import annotations

from collections.abc import Iterable

from starflow_mlx.safe_text import printable


def check_tensor_names(expected: Iterable[str], found: Iterable[str], where: str, error: type[Exception],
                       missing_hint: str, unknown_hint: str) -> None:
    """Raise ``error`` naming the first missing, then the first unexpected tensor (file names shown safely)."""
    expected, found = set(expected), set(found)
    missing = sorted(expected - found)
    if missing:
        raise error(f"{where} lacks {missing[0]} ({len(missing)} missing): {missing_hint}")
    unknown = sorted(found - expected, key=str)
    if unknown:
        raise error(f"{where} has unexpected tensor {printable(str(unknown[0]), 120)} ({len(unknown)} unexpected): "
                    f"{unknown_hint}")
