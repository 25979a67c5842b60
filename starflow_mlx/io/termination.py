"""SIGTERM and SIGHUP (``timeout``, ``kill``, a closed terminal) stop the ``starflow`` command as Ctrl-C does.

Python's default for them kills the process at once, skipping every ``finally``: a staged file would be
left behind. Raised as a KeyboardInterrupt instead, they run the same cleanup as Ctrl-C, and the command
exits with the shell's status for the signal (128 + its number).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum, _frame):
    raise Terminated(signum)


def install() -> None:
    """Make SIGTERM and SIGHUP interrupt the main thread like Ctrl-C (a no-op outside it).

    Not under a distributed launch: a rank blocked in a collective never runs a Python handler, so the
    launcher's SIGTERM must keep killing it; what such a rank leaves is swept by the next write there.
    """
    import os

    from starflow_mlx.io.distributed import LAUNCH_VARIABLES

    if threading.current_thread() is threading.main_thread() and not any(v in os.environ for v in LAUNCH_VARIABLES):
        for signum in SIGNALS:
            signal.signal(signum, _raise)


def describe(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The error text and exit status for an interrupt: Ctrl-C's, or a signal's."""
    signum = getattr(exc, "signum", signal.SIGINT)
    text = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    return text, 128 + signum
