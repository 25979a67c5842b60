"""The ops of one Jacobi chunk step at the ``small`` shapes, MLX against torch, one process.

Also a sequential step's products (one token; two rows with guidance). Per op:
MLX (ours where we replace MLX's kernel, and MLX's own) and torch on the same
shapes, median milliseconds of ``--repeats`` timings of ``--calls`` calls each.
Shows where a step's time goes on a CPU beyond the matrix products.

    python -m starflow_mlx.benchmarks.cpu_ops --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx.models.layers import GELU, attention

B, HEADS, T, KEYS, D, C = 2, 6, 64, 336, 64, 384  # guidance doubles the batch; the small deep block's cache


def milliseconds(fn, calls: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def mlx_ops() -> dict[str, tuple]:
    """name -> (MLX call, torch-side shape key)."""
    key = mx.random.key(0)
    x = mx.random.normal((B * T, C), key=key)
    w_qkv, w_mlp = mx.random.normal((C, 3 * C), key=key), mx.random.normal((C, 4 * C), key=key)
    h = mx.random.normal((B, T, 4 * C), key=key)
    q = mx.random.normal((B, HEADS, T, D), key=key)
    k, v = mx.random.normal((B, HEADS, KEYS, D), key=key), mx.random.normal((B, HEADS, KEYS, D), key=key)
    mask = mx.arange(KEYS)[None, :] <= (KEYS - T + mx.arange(T))[:, None]
    scores = mx.random.normal((B, HEADS, T, KEYS), key=key)
    # A sequential step's product: one token, guidance doubling the batch.
    x1, x2 = x[:1], x[:2]
    by_row = mx.compile(lambda a: mx.concatenate([a[r : r + 1] @ w_qkv for r in range(a.shape[0])], axis=0))
    ours_gelu, mlx_gelu = mx.compile(GELU()), mx.compile(nn.GELU())
    norm = mx.compile(lambda a: mx.fast.layer_norm(a, None, None, 1e-5))
    ours_attn = mx.compile(lambda a, b, c: attention(a, b, c, D ** -0.5, mask))
    fused = mx.compile(lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=D ** -0.5, mask=mask))
    return {
        "matmul 128x384x1152": (lambda: mx.eval(x @ w_qkv), "qkv"),
        "matmul 128x384x1536": (lambda: mx.eval(x @ w_mlp), "mlp"),
        "matmul 1x384x1152": (lambda: mx.eval(x1 @ w_qkv), "qkv1"),
        "matmul 2x384x1152": (lambda: mx.eval(x2 @ w_qkv), "qkv2"),
        "matmul 2x384x1152, a row at a time": (lambda: mx.eval(by_row(x2)), "qkv2"),
        "GELU (ours, multiply-add erf)": (lambda: mx.eval(ours_gelu(h)), "gelu"),
        "GELU (MLX nn.GELU)": (lambda: mx.eval(mlx_gelu(h)), "gelu"),
        "layer norm": (lambda: mx.eval(norm(x)), "norm"),
        "attention (ours)": (lambda: mx.eval(ours_attn(q, k, v)), "attention"),
        "attention (MLX fused SDPA)": (lambda: mx.eval(fused(q, k, v)), "attention"),
        "exp over the scores (MLX)": (lambda: mx.eval(mx.exp(scores)), "exp"),
        "add over the scores (MLX)": (lambda: mx.eval(scores + 1.0), "add"),
    }


def torch_ops() -> dict[str, object]:
    import torch

    torch.set_num_threads(1)  # as MLX's single MKL thread (starflow_mlx.blas)
    x, w_qkv, w_mlp = torch.randn(B * T, C), torch.randn(C, 3 * C), torch.randn(C, 4 * C)
    h = torch.randn(B, T, 4 * C)
    q, k, v = torch.randn(B, HEADS, T, D), torch.randn(B, HEADS, KEYS, D), torch.randn(B, HEADS, KEYS, D)
    mask = torch.arange(KEYS)[None, :] <= (KEYS - T + torch.arange(T))[:, None]
    scores = torch.randn(B, HEADS, T, KEYS)
    f = torch.nn.functional
    return {
        "qkv": lambda: x @ w_qkv, "mlp": lambda: x @ w_mlp, "qkv1": lambda: x[:1] @ w_qkv, "qkv2": lambda: x[:2] @ w_qkv,
        "gelu": lambda: f.gelu(h),
        "norm": lambda: f.layer_norm(x, (C,)), "attention": lambda: f.scaled_dot_product_attention(q, k, v, mask),
        "exp": lambda: torch.exp(scores), "add": lambda: scores + 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    a = parser.parse_args()
    theirs = torch_ops() if importlib.util.find_spec("torch") else {}
    print(f"shapes: batch {B}, {HEADS} heads, {T} queries, {KEYS} keys, head {D}, channels {C}; "
          f"median of {a.repeats} x {a.calls} calls, milliseconds")
    print("| op | MLX | torch |")
    print("|---|---|---|")
    for name, (fn, key) in mlx_ops().items():
        other = f"{milliseconds(theirs[key], a.calls, a.repeats):.3f}" if key in theirs else "-"
        print(f"| {name} | {milliseconds(fn, a.calls, a.repeats):.3f} | {other} |", flush=True)


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
