"""Text from files (tensor names, config values, pickle contents) made safe to put in a one-line message.

Two dangers: a value whose ``repr`` is gigabytes (formatting it before truncating exhausts memory),
and text carrying terminal escape sequences or line breaks (echoed raw, it can rewrite the terminal).
"""

from __future__ import annotations

import reprlib
from typing import Any


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with control and format characters (ESC, CR, bidi overrides...) escaped, cut to ``limit``."""
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class _Short(reprlib.Repr):
    """reprlib with every container, string and integer bounded before it is formatted."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxtuple, self.maxlist, self.maxdict, self.maxset = 3, 6, 6, 4, 4
        self.maxstring, self.maxother = 40, 40

    def repr1(self, x, level):
        if isinstance(x, tuple) and type(x) is not tuple:  # named tuples: as tuples, not via their full repr
            return type(x).__name__ + self.repr_tuple(x, level)
        return super().repr1(x, level)

    def repr_int(self, x, level):
        return f"<integer of {x.bit_length()} bits>" if x.bit_length() > 128 else repr(x)

    def repr_bytes(self, x, level):
        return repr(x) if len(x) <= 16 else f"<{len(x)} bytes>"

    def repr_instance(self, x, level):
        return f"<{type(x).__name__}>"


_SHORT = _Short()


def shown(value: Any, limit: int = 80) -> str:
    """A short, printable ``repr`` of any value, computed in bounded time and memory."""
    return printable(_SHORT.repr(value), limit)
