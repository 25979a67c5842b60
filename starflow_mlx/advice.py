"""Errors whose advice reads differently in Python and on the command line.

The library names its own parameters (``batch_size=2``); the ``starflow`` commands name their
options (``--batch-size 2``). An error carries both wordings: ``str(exc)`` is the Python one,
and the CLI layer (``apps/cli.py``) prints :func:`cli_message` instead.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def with_cli_message(exc: E, message: str) -> E:
    """``exc``, carrying ``message``: the same error as the command line words it."""
    exc.cli_message = message
    return exc


def option_error(error: type[E], name: str, rest: str, flag: str | None = None) -> E:
    """``error("<name><rest>")`` for a bad value of the Python parameter ``name``; the command line's
    message starts with its option instead (``flag``, or ``--`` and ``name`` with dashes)."""
    return with_cli_message(error(name + rest), (flag or "--" + name.replace("_", "-")) + rest)


def cli_message(exc: BaseException) -> str:
    return getattr(exc, "cli_message", None) or str(exc)
