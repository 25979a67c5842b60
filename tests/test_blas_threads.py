"""MKL threads only where they pay: ``blas.threads`` around the Jacobi sampler, one thread elsewhere.

Each case runs in a fresh process (MKL's layer and count are per process) with ``MKL_VERBOSE=1``,
which logs every product MKL serves with the threads it ran on (``NThr:``), on MLX's own
stream thread: proof of what the products got, with no timing.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flow_factory import rel

from starflow_mlx import blas

ROOT = Path(__file__).resolve().parents[1]
USER = ("STARFLOW_BLAS", "MKL_THREADING_LAYER", "MKL_NUM_THREADS", "STARFLOW_THREADS", "KMP_BLOCKTIME", "MLX_RANK")
PRELUDE = ("import ctypes, mlx.core as mx\nfrom starflow_mlx import blas\n"
           "a = mx.ones((256, 256)); mx.eval(a)\n"
           "def product(tag):\n    print('TAG', tag, flush=True); mx.eval(a @ a)\n"
           "def mkl_reads():\n    return ctypes.CDLL(blas.find_blas()).MKL_Get_Max_Threads()\n")


def python(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, with the user's BLAS settings dropped and ``env`` added."""
    keep = {k: v for k, v in os.environ.items() if k not in USER}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=keep | env,
                          timeout=300, cwd=ROOT)


def run(code: str, **env) -> subprocess.CompletedProcess:
    return python(PRELUDE + code, MKL_VERBOSE="1", **env)


def threads_by_tag(stdout: str) -> dict[str, set[int]]:
    """{tag: the NThr of every product MKL logged after ``product(tag)`` printed it}."""
    found, tag = {}, None
    for line in stdout.splitlines():
        if line.startswith("TAG "):
            tag = line.split(" ", 1)[1]
            found.setdefault(tag, set())
        elif tag is not None and (n := re.search(r"NThr:(\d+)", line)):
            found[tag].add(int(n.group(1)))
    return found


def mkl_installed() -> bool:
    found = blas.find_blas()
    return sys.platform.startswith("linux") and found is not None and "mkl" in found


needs_mkl = pytest.mark.skipif(not mkl_installed(), reason="the mkl wheel is not installed (Linux x86-64 only)")


@needs_mkl
def test_threads_sets_the_count_for_the_products_inside_and_restores_it():
    out = run("product('before'); print('READ', blas.max_threads(), mkl_reads())\n"
              "with blas.threads(2) as n:\n"
              "    product('inside'); print('YIELD', n, 'READ', blas.max_threads(), mkl_reads())\n"
              "    with blas.threads(1):\n        product('nested')\n"  # the first entry's count holds
              "product('after'); print('READ', blas.max_threads(), mkl_reads())\n")
    assert out.returncode == 0, out.stderr
    assert threads_by_tag(out.stdout) == {"before": {1}, "inside": {2}, "nested": {2}, "after": {1}}
    assert re.findall(r"READ .*", out.stdout) == ["READ 1 1", "READ 2 2", "READ 1 1"]
    assert "YIELD 2" in out.stdout


@needs_mkl
def test_entries_from_two_threads_keep_the_count_until_the_last_exit():
    # The video pipeline's worker runs Jacobi blocks while the main thread runs the deep one.
    out = run("import threading\nentered, leave = threading.Event(), threading.Event()\n"
              "def worker():\n    with blas.threads(2):\n        entered.set(); leave.wait()\n"
              "t = threading.Thread(target=worker); t.start(); entered.wait()\n"
              "with blas.threads(2):\n    leave.set(); t.join()\n    product('other left')\n"
              "product('all left')\n")
    assert out.returncode == 0, out.stderr
    assert threads_by_tag(out.stdout) == {"other left": {2}, "all left": {1}}


@needs_mkl
def test_default_count_is_the_cores_or_starflow_threads():
    code = "with blas.threads() as n:\n    product('inside'); print('YIELD', n)\nproduct('after')\n"
    out = run(code)
    cores = len(os.sched_getaffinity(0))
    assert f"YIELD {cores}" in out.stdout and threads_by_tag(out.stdout) == {"inside": {cores}, "after": {1}}
    out = run(code, STARFLOW_THREADS="1")
    assert "YIELD 1" in out.stdout and threads_by_tag(out.stdout) == {"inside": {1}, "after": {1}}
    out = run(code, MLX_RANK="0")  # ranks of a distributed job may share the cores: one each unless told
    assert "YIELD 1" in out.stdout and threads_by_tag(out.stdout) == {"inside": {1}, "after": {1}}
    out = run(code, MLX_RANK="0", STARFLOW_THREADS="2")
    assert "YIELD 2" in out.stdout and threads_by_tag(out.stdout) == {"inside": {2}, "after": {1}}
    out = run(code, STARFLOW_THREADS="two")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "ValueError: STARFLOW_THREADS must be a whole number of threads, 1 or more, got 'two'")


USERS_CODE = ("product('before')\nwith blas.threads(1) as n:\n    product('inside'); print('YIELD', n)\n"
              "with blas.threads(2):\n    product('asked 2')\nprint('READ', blas.max_threads())\n")


@needs_mkl
def test_the_users_mkl_num_threads_wins():
    out = run(USERS_CODE, MKL_NUM_THREADS="2")
    assert out.returncode == 0, out.stderr
    assert "YIELD None" in out.stdout and "READ 2" in out.stdout
    assert threads_by_tag(out.stdout) == {tag: {2} for tag in ("before", "inside", "asked 2")}


@needs_mkl
def test_the_users_threading_layer_wins():
    out = run(USERS_CODE, MKL_THREADING_LAYER="SEQUENTIAL")
    assert out.returncode == 0, out.stderr
    assert "YIELD None" in out.stdout and "READ 1" in out.stdout
    # MKL's sequential layer logs no thread count: every product of the run went there.
    assert "lp64 sequential" in out.stdout and out.stdout.count("SGEMM") == 3 and "NThr" not in out.stdout


def test_no_op_without_mkl():
    # The reference BLAS here, Accelerate on macOS: nothing to set, nothing fails.
    code = ("import mlx.core as mx\nfrom starflow_mlx import blas\n"
            "with blas.threads(2) as n:\n    mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))\n"
            "print('YIELD', n, 'READ', blas.max_threads())\n")
    out = python(code, STARFLOW_BLAS="reference")
    assert out.returncode == 0, out.stderr
    assert "YIELD None READ None" in out.stdout


JACOBI = """
import sys, numpy as np
sys.path.insert(0, 'tests')
from flow_factory import IMAGE, flow_inputs, random_flow
flow = random_flow(**{**IMAGE, 'channels': 256, 'latent_size': 8})
z, y, y_u = flow_inputs(flow)
print('TAG sequential', flush=True)
seq = np.array(flow.reverse(z, y, y_uncond=y_u, cfg=2.0))
runs = []
for _ in range(2):
    print('TAG jacobi', flush=True)
    runs.append(np.array(flow.reverse(z, y, y_uncond=y_u, cfg=2.0, jacobi=True, jacobi_block_size=16,
                                      jacobi_threshold=1e-14, jacobi_max_iter=64)))
print('TAG done', flush=True)
np.save(sys.argv[1], np.stack([seq, *runs]))
"""


@needs_mkl
def test_jacobi_runs_threaded_repeatably_and_matches_sequential(tmp_path):
    found = {}
    for threads in ("1", "2"):
        out = python(JACOBI, str(tmp_path / f"{threads}.npy"), MKL_VERBOSE="1", STARFLOW_THREADS=threads)
        assert out.returncode == 0, out.stderr[-2000:]
        assert threads_by_tag(out.stdout) == {"sequential": {1}, "jacobi": {int(threads)}, "done": set()}
        found[threads] = np.load(tmp_path / f"{threads}.npy")
    seq, first, again = found["2"]
    assert np.array_equal(first, again)  # every product has one known thread count: the same sample each run
    assert rel(first, seq) < 1e-4  # the Jacobi-vs-sequential tolerance of test_flow_properties
    assert rel(first, found["1"][1]) < 1e-5  # two threads may only reorder float32 sums
