"""The fast-BLAS hook: loaded whatever the import order, opted out, too late, or missing (Linux only)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the hook acts on Linux only")

# MKL logs every call it serves with MKL_VERBOSE=1: proof that MLX's products went to MKL, with no timing.
MATMUL = "import mlx.core as mx; mx.eval(mx.ones((32, 32)) @ mx.ones((32, 32)))\n"
DROP_HOOK = ("import sys; from starflow_mlx import blas\n"
             "sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, blas._BeforeMLX)]\n")


def run(code: str, **env) -> subprocess.CompletedProcess:
    keep = {k: v for k, v in os.environ.items() if k not in ("STARFLOW_BLAS", "MKL_THREADING_LAYER", "MKL_NUM_THREADS")}
    full = keep | {"MKL_VERBOSE": "1"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def mkl_installed() -> bool:
    from starflow_mlx import blas

    found = blas.find_blas()
    return found is not None and "mkl" in found


needs_mkl = pytest.mark.skipif(not mkl_installed(), reason="the mkl wheel is not installed (Linux x86-64 only)")


@needs_mkl
def test_mlx_imported_first_still_uses_mkl():
    # The README's order: mlx.core before starflow_mlx. The .pth hook loaded MKL before mlx bound its BLAS.
    out = run(MATMUL + "import starflow_mlx; from starflow_mlx import blas; print('STATE', blas.check())")
    assert out.returncode == 0, out.stderr
    assert "SGEMM" in out.stdout and "STATE fast" in out.stdout
    assert "reference BLAS" not in out.stderr


@needs_mkl
def test_startup_loads_nothing_until_mlx_is_imported():
    out = run("import sys; print('mlx' in sys.modules, 'numpy' in sys.modules, 'ctypes' in sys.modules)\n"
              "print(open('/proc/self/maps').read().count('libmkl_rt'))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False", "0"]


@needs_mkl
def test_mkl_is_single_threaded_unless_asked():
    code = MATMUL + "import os; print('LAYER', os.environ.get('MKL_THREADING_LAYER'))"
    out = run(code)
    # OpenMP's layer, so that blas.threads can thread Jacobi's products; one thread for everything else. Set by
    # call, not in the environment, where a child process would take it for the user's choice.
    assert "LAYER None" in out.stdout and "lp64 intel_thread" in out.stdout and "NThr:1" in out.stdout
    out = run(code, MKL_NUM_THREADS="2")
    assert "LAYER None" in out.stdout and "SGEMM" in out.stdout and "NThr:2" in out.stdout


def test_opt_out_keeps_reference_blas():
    out = run(MATMUL + "from starflow_mlx import blas; print('STATE', blas.check())", STARFLOW_BLAS="reference")
    assert out.returncode == 0, out.stderr
    assert "SGEMM" not in out.stdout and "STATE reference" in out.stdout
    assert out.stderr == ""


def test_too_late_warns_in_one_line():
    # Without the start-up hook (e.g. python -S, or sources on PYTHONPATH), mlx.core first is too late.
    out = run(DROP_HOOK + MATMUL + "print('STATE', blas.check()); blas.check()")
    assert out.returncode == 0, out.stderr
    assert "SGEMM" not in out.stdout and "STATE late" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "imported before the fast BLAS" in lines[0] and "STARFLOW_BLAS=reference" in lines[0]


def test_missing_library_warns_with_the_fix():
    out = run(DROP_HOOK + "blas.find_blas = lambda: None\nprint('STATE', blas.check())")
    assert out.returncode == 0, out.stderr
    assert "STATE missing" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no fast BLAS found" in lines[0]
    assert ("pip install mkl" in lines[0]) or ("OpenBLAS" in lines[0])


def test_installed_pth_runs_the_hook():
    import site

    pth = [Path(d, "starflow_mlx_blas.pth") for d in site.getsitepackages() if Path(d, "starflow_mlx_blas.pth").is_file()]
    assert pth, "the install did not put starflow_mlx_blas.pth in site-packages"
    assert pth[0].read_text().startswith("import starflow_mlx")


def test_backend_adds_pth_with_record_line(tmp_path):
    sys.path.insert(0, str(ROOT / "build_backend"))
    try:
        import starflow_mlx_build as backend
    finally:
        sys.path.pop(0)
    wheel = tmp_path / "x-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("x/__init__.py", "")
        z.writestr("x-0.1.dist-info/RECORD", "x/__init__.py,,0\nx-0.1.dist-info/RECORD,,\n")
    backend.add_to_wheel(str(wheel), backend.PTH_NAME, backend.PTH_TEXT.encode())
    with zipfile.ZipFile(wheel) as z:
        assert z.read(backend.PTH_NAME).decode() == backend.PTH_TEXT
        record = z.read("x-0.1.dist-info/RECORD").decode().splitlines()
        assert record[0] == "x/__init__.py,,0"
        assert record[-1].startswith(f"{backend.PTH_NAME},sha256=") and record[-1].endswith(f",{len(backend.PTH_TEXT)}")


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_both_wheels_carry_the_pth(tmp_path, hook):
    # The backend's own hooks, as pip calls them for `pip install .` and `pip install -e .`.
    code = (f"import sys; sys.path.insert(0, 'build_backend'); import starflow_mlx_build as b; "
            f"print(b.{hook}({str(tmp_path)!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / done.stdout.strip().splitlines()[-1]) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        assert z.read("starflow_mlx_blas.pth").decode().startswith("import starflow_mlx")
        assert "starflow_mlx_blas.pth,sha256=" in z.read(record).decode()
