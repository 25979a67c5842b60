"""MLX's exact GELU (scalar ``erf`` on a CPU) against ours (multiply-add ``erf``), alone and inside sampling.

Two flows of a named shape with the same random weights, one with every MLP
activation swapped back to ``mlx.nn.GELU``, sampled alternately in one process:

    python -m starflow_mlx.benchmarks.gelu --config small --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx.benchmarks.configs import build_flow, load_config
from starflow_mlx.benchmarks.sampling import make_inputs
from starflow_mlx.models.layers import GELU


def seconds(fn) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    h = mx.random.normal((2, 64, 1536), key=mx.random.key(0))
    ours, theirs = mx.compile(GELU()), mx.compile(nn.GELU())
    for f in (ours, theirs):
        mx.eval(f(h))
    op = {"ours": [], "mlx": []}
    for _ in range(10 * a.repeats):
        op["ours"].append(seconds(lambda: ours(h)))
        op["mlx"].append(seconds(lambda: theirs(h)))
    print(f"GELU on {h.shape}: ours {statistics.median(op['ours']) * 1e3:.2f} ms, "
          f"mlx {statistics.median(op['mlx']) * 1e3:.2f} ms, max diff {mx.abs(ours(h) - theirs(h)).max().item():.1e}")
    config = load_config(a.config)
    flows = {"ours": build_flow(config, mx.float32, seed=0), "mlx": build_flow(config, mx.float32, seed=0)}
    for block in flows["mlx"].blocks:
        for layer in block.attn_blocks:
            if not layer.mlp.use_swiglu:
                layer.mlp.main[1] = nn.GELU()
    z, y, y_u = make_inputs(config, 1, 0)
    cfg = config.cfg if config.txt_dim else 0.0
    for jacobi in (False, True):
        times, outs = {"ours": [], "mlx": []}, {}
        for r in range(a.repeats + 1):
            for name, flow in flows.items():
                start = time.perf_counter()
                outs[name] = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=jacobi)
                mx.eval(outs[name])
                if r:  # the first round traces and compiles
                    times[name].append(time.perf_counter() - start)
        print(f"{'jacobi' if jacobi else 'sequential'} on {a.config}: ours {statistics.median(times['ours']):.3f} s, "
              f"mlx {statistics.median(times['mlx']):.3f} s, "
              f"max diff {mx.abs(outs['ours'] - outs['mlx']).max().item():.1e}")


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
