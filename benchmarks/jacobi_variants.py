"""Jacobi schedules on the trained demo model against its exact (sequential) samples, in one table.

For each schedule, block size and threshold: host round-trips (sequential steps
of the solver), token evaluations (padding not counted), both in all and per
block, wall time (median of ``--repeats`` warm runs), the max and mean |x - x_exact|
of the flow's samples (pixels in [-1, 1]) and how often a logistic regression
trained on the real digits labels the denoised sample as the requested digit.

    python -m starflow_mlx.benchmarks.jacobi_variants --per-class 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from starflow_mlx.io.loading import load_flow
from starflow_mlx.sampling.denoise import score_denoise
from starflow_mlx.sampling.jacobi import SCHEDULES, JacobiStats


def conditioning(classes: int, per_class: int):
    labels = np.repeat(np.arange(classes), per_class)
    eye = np.eye(classes + 1, dtype=np.float32)
    return labels, mx.array(eye[labels][:, None, :]), mx.array(np.broadcast_to(eye[classes], (len(labels), 1, classes + 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-sizes", default="16,64")
    parser.add_argument("--thresholds", default="0.005,0.001")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    from starflow_mlx.benchmarks.demo_quality import digit_classifier, to_features
    from starflow_mlx.training.data import load_digits_split

    flow = load_flow(a.model)
    cfg = flow.config
    labels, y, y_u = conditioning(cfg.num_classes, a.per_class)
    z = mx.random.normal((len(labels), cfg.latent_size, cfg.latent_size, cfg.in_channels), key=mx.random.key(a.seed))
    clf = digit_classifier(load_digits_split()[0])
    tokens = (cfg.latent_size // cfg.patch_size) ** 2 * sum(1 for b in flow.blocks if not b.is_identity)

    def run(**options):
        stats = JacobiStats()
        mx.eval(flow.reverse(z, y, y_uncond=y_u, cfg=cfg.cfg, **options))  # first call: traces
        times = []
        for _ in range(a.repeats):
            stats = JacobiStats()
            start = time.perf_counter()
            x = flow.reverse(z, y, y_uncond=y_u, cfg=cfg.cfg, stats=stats, **options)
            mx.eval(x)
            times.append(time.perf_counter() - start)
        return x, stats, statistics.median(times)

    def accuracy(x) -> float:
        clean = np.array(score_denoise(flow, x, y, cfg.noise_std))
        return float((clf.predict(to_features(clean[..., 0])) == labels).mean())

    exact, _, seq_seconds = run(jacobi=False)
    print(f"demo, {len(labels)} samples ({a.per_class} per digit), cfg {cfg.cfg}, {a.repeats} warm runs each")
    blocks = [b.index for b in reversed(flow.blocks) if not b.is_identity]  # sampling order: deep first
    side = tokens // len(blocks)
    print("| sampler | block | threshold | round-trips | token evals | per block, deep first (trips/evals) | seconds "
          "| max diff | mean diff | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| sequential | | | {tokens} | {tokens} | {', '.join([f'{side}/{side}'] * len(blocks))} | {seq_seconds:.2f} "
          f"| 0 | 0 | {accuracy(exact):.1%} |")
    for schedule in SCHEDULES:
        for size in (int(s) for s in a.block_sizes.split(",")):
            for threshold in (float(t) for t in a.thresholds.split(",")):
                x, stats, seconds = run(jacobi=True, jacobi_schedule=schedule, jacobi_block_size=size,
                                        jacobi_threshold=threshold)
                diff = np.abs(np.array(x) - np.array(exact))
                per_block = ", ".join(f"{stats.iterations(b)}/{stats.token_evaluations(b)}" for b in blocks)
                print(f"| Jacobi, {schedule} | {size} | {threshold:g} | {stats.iterations()} | "
                      f"{stats.token_evaluations()} | {per_block} | {seconds:.2f} | {diff.max():.3f} | {diff.mean():.4f} | "
                      f"{accuracy(x):.1%} |", flush=True)


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
