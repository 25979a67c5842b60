"""A fast BLAS for MLX's CPU backend on Linux, loaded before MLX binds its symbols.

The Linux ``mlx[cpu]`` wheel links a bundled reference BLAS whose matrix products
are ~30x slower than an optimized one. Loading an optimized BLAS with global
symbols *before* ``mlx.core`` is imported makes MLX resolve its ``cblas_*`` calls
there; loading it afterwards changes nothing. So the install puts
``starflow_mlx_blas.pth`` in site-packages, which imports this package at
interpreter start-up; that calls :func:`install_hook`, which only registers an
import finder (no library is opened, neither mlx nor numpy is imported) and
loads the BLAS the first time anything imports ``mlx``, whatever the import
order of the user's code.

The BLAS is MKL's ``libmkl_rt`` from the ``mkl`` wheel (a dependency on Linux
x86-64; it installs into ``<prefix>/lib``), single-threaded unless ``MKL_NUM_THREADS``
or ``MKL_THREADING_LAYER`` say otherwise, else a system OpenBLAS. macOS uses
Accelerate and Metal and is left alone. ``STARFLOW_BLAS=reference`` keeps the
wheel's own BLAS.
"""

from __future__ import annotations

import os
import sys

_state = {"loaded": None, "mlx_first": False, "warned": False}  # what the hook did, read by check()

_MKL = "libmkl_rt.so.3"


def _wanted() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("STARFLOW_BLAS", "") != "reference"


def _mkl_paths() -> list[str]:
    """Where pip puts the mkl wheel's libraries: ``<prefix>/lib`` (venv or system) or the user base."""
    import site

    roots = [sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None) or ""]
    return [os.path.join(root, "lib", _MKL) for root in dict.fromkeys(roots) if root]


def find_blas() -> str | None:
    """Path or soname of the fast BLAS to load, or None when none is installed."""
    for path in _mkl_paths():
        if os.path.isfile(path):
            return path
    import ctypes.util

    return ctypes.util.find_library("openblas")


def load() -> str | None:
    """Load the fast BLAS globally now; returns what was loaded, or None."""
    if _state["loaded"] is not None or not _wanted():
        return _state["loaded"]
    if "mlx.core" in sys.modules:  # too late: MLX has bound the reference BLAS
        _state["mlx_first"] = True
        return None
    name = find_blas()
    if name is None:
        return None
    if "mkl" in os.path.basename(name) and not any(v in os.environ for v in ("MKL_THREADING_LAYER", "MKL_NUM_THREADS")):
        # MLX's CPU backend runs one op at a time, and on a busy machine MKL's OpenMP threads spin-waiting at
        # every small product made the sequential sampler 3-10x slower; one thread is robust. Either variable
        # set by the user wins.
        os.environ["MKL_THREADING_LAYER"] = "SEQUENTIAL"
    import ctypes

    try:
        ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
    except OSError:
        return None
    _state["loaded"] = name
    return name


class _BeforeMLX:
    """Import finder that loads the BLAS when ``mlx`` is first imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mlx" or fullname.startswith("mlx."):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            load()
            check()
        return None  # the normal finders import mlx itself


def _pending() -> bool:
    return any(isinstance(f, _BeforeMLX) for f in sys.meta_path)


def install_hook() -> None:
    """Run on ``import starflow_mlx`` (at start-up via the .pth): cheap, loads nothing yet."""
    if not _wanted():
        return
    if "mlx" in sys.modules:
        load()
        return
    if not _pending():
        sys.meta_path.insert(0, _BeforeMLX())


def status() -> tuple[str, str | None]:
    """``(state, detail)``: ``fast`` (loaded: detail is the library), ``reference`` (opted out or not
    Linux), ``late`` (MLX was imported before the BLAS could be loaded) or ``missing`` (none installed)."""
    if not _wanted():
        return "reference", None
    loaded = load()
    if loaded is not None:
        return "fast", loaded
    if _state["mlx_first"]:
        return "late", None
    return "missing", None


def fix_hint(state: str) -> str | None:
    """The one-line warning for a Linux process left on the reference BLAS, naming the fix."""
    if state == "late":
        return ("starflow-mlx: mlx.core was imported before the fast BLAS could be loaded, so MLX's CPU backend "
                "uses its slow reference BLAS; reinstall starflow-mlx with pip (it installs starflow_mlx_blas.pth, "
                "which loads the BLAS at start-up) or import starflow_mlx first; STARFLOW_BLAS=reference silences this")
    if state == "missing":
        import platform

        fix = ("pip install mkl" if platform.machine() in ("x86_64", "AMD64")
               else "install a system OpenBLAS (e.g. apt install libopenblas0-pthread)")
        return ("starflow-mlx: no fast BLAS found, so MLX's CPU backend uses its slow reference BLAS; "
                f"{fix}, or set STARFLOW_BLAS=reference to silence this")
    return None


def check() -> str:
    """Warn once, in one line, when MLX is left on the reference BLAS; ``pending`` until mlx is imported."""
    if _wanted() and _pending():
        return "pending"
    state, _ = status()
    hint = fix_hint(state)
    if hint is not None and not _state["warned"]:
        _state["warned"] = True
        sys.stderr.write(hint + "\n")
    return state
