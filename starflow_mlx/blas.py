"""Use the system OpenBLAS for MLX's CPU backend on Linux when there is one.

The Linux ``mlx[cpu]`` wheel links the reference BLAS, whose matrix products are
10-50x slower than OpenBLAS here. Loading OpenBLAS with global symbols before
MLX's library is loaded makes MLX resolve its BLAS calls there. macOS uses
Accelerate and Metal, so nothing happens there. Set ``STARFLOW_BLAS=reference``
to keep the wheel's own BLAS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys


def use_system_openblas() -> str | None:
    """Load OpenBLAS globally if possible; returns its name, or None when nothing was loaded."""
    if not sys.platform.startswith("linux") or os.environ.get("STARFLOW_BLAS") == "reference":
        return None
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return None
    name = ctypes.util.find_library("openblas")
    if name is None:
        return None
    try:
        ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
    except OSError:
        return None
    return name
