"""How a ``python -m starflow_mlx.benchmarks.X`` run ends: its result, or one line and a shell's status.

Benchmarks print each result only once it is complete, so a run stopped with Ctrl-C leaves
no half-written line behind, only ``interrupted`` and exit status 130, as the ``starflow``
commands do.
"""

from __future__ import annotations

import sys
from typing import Callable


def run(main: Callable[[], None]) -> None:
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
