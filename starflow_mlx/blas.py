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
x86-64; it installs into ``<prefix>/lib``), else a system OpenBLAS. macOS uses
Accelerate and Metal and is left alone. ``STARFLOW_BLAS=reference`` keeps the
wheel's own BLAS.

MKL runs on one thread, except inside :func:`threads` (the Jacobi sampler's large
products): two threads made the sequential sampler's one-row products 1.25x
slower but Jacobi's 1.5x faster. ``MKL_NUM_THREADS`` or ``MKL_THREADING_LAYER``
set by the user win: MKL then does as they say everywhere and :func:`threads`
changes nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

_state = {"loaded": None, "mlx_first": False, "warned": False}  # what the hook did, read by check()
# The loaded MKL; the thread count we set (None: the user's to set); threads()'s entries and the count before.
_threads = {"mkl": None, "count": None, "users": 0, "before": 1}
_threads_lock = threading.Lock()

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
    managed = "mkl" in os.path.basename(name) and not any(
        v in os.environ for v in ("MKL_THREADING_LAYER", "MKL_NUM_THREADS"))  # either one set by the user wins
    openmp = managed and os.path.isfile(os.path.join(os.path.dirname(name), "libiomp5.so"))  # intel-openmp wheel
    if managed and not openmp:
        os.environ["MKL_THREADING_LAYER"] = "SEQUENTIAL"
    if openmp:
        # Idle OpenMP threads sleep at once instead of spinning for 200 ms on the core that the next one-thread
        # product (MLX runs one op at a time) needs: on a busy machine spinning made sequential sampling 3-10x slower.
        os.environ.setdefault("KMP_BLOCKTIME", "0")
    import ctypes

    try:
        lib = ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
    except OSError:
        return None
    if "mkl" in os.path.basename(name):
        _threads["mkl"] = lib
    if openmp:
        # Set by call, not by MKL_THREADING_LAYER / MKL_NUM_THREADS: child processes would take those for the
        # user's choice and run MKL on every core everywhere.
        lib.MKL_Set_Threading_Layer(0)  # MKL_THREADING_INTEL (OpenMP): its thread count can change at run time
        lib.MKL_Set_Num_Threads(1)
        _threads["count"] = 1
    _state["loaded"] = name
    return name


def cpu_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def sampler_threads() -> int:
    """Threads for the Jacobi sampler's products: ``STARFLOW_THREADS``, else every core this process may use, or
    one in a rank of a distributed job (``MLX_RANK``), whose ranks may share this machine's cores."""
    text = os.environ.get("STARFLOW_THREADS")
    if text is None:
        return 1 if "MLX_RANK" in os.environ else cpu_cores()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"STARFLOW_THREADS must be a whole number of threads, 1 or more, got {text!r}")
    return count


def max_threads() -> int | None:
    """MKL's thread count for MLX's products now, or None when MKL is not what this process loaded.

    The count we set is kept here: MKL's own reading is per calling thread, and torch's
    ``set_num_threads`` changes that thread's OpenMP count, not MLX's stream thread's.
    """
    if _threads["count"] is not None:
        return _threads["count"]
    lib = _threads["mkl"]
    return None if lib is None else lib.MKL_Get_Max_Threads()


@contextmanager
def threads(count: int | None = None):
    """MKL on ``count`` threads (default :func:`sampler_threads`) for the products evaluated inside.

    A no-op without MKL (macOS, OpenBLAS, the reference BLAS) or when the user set MKL's
    threads. The count is global to MKL (MLX calls the BLAS from its own stream thread, so
    ``mkl_set_num_threads_local`` on this thread would not reach it), hence: MLX's queued work is
    finished on entry and exit, so that each product runs with one known count (MKL's sums
    depend on it, at float32 rounding) and results repeat run to run; evaluate what the block
    computes before leaving it. Entered from several threads (the video pipeline's worker), the
    first entry's count holds until the last exit. Yields the count in effect (None when not ours to set).
    """
    count = sampler_threads() if count is None else count
    if count < 1:
        raise ValueError(f"MKL needs at least 1 thread, got {count}")
    lib = _threads["mkl"]
    if _threads["count"] is None:
        yield None
        return
    import mlx.core as mx

    mx.synchronize()  # not under the lock: another thread's entry need not wait for this thread's work
    with _threads_lock:
        if _threads["users"] == 0:
            _threads["before"] = _threads["count"]
            lib.MKL_Set_Num_Threads(count)
            _threads["count"] = count
        _threads["users"] += 1
    try:
        yield _threads["count"]
    finally:
        mx.synchronize()
        with _threads_lock:
            _threads["users"] -= 1
            if _threads["users"] == 0:
                lib.MKL_Set_Num_Threads(_threads["before"])
                _threads["count"] = _threads["before"]


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
