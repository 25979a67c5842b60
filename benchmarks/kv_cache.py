"""Quantized KV caches: the deep block's cache at STARFlow-V's size, and what they do to the demo's samples.

First the memory of the deep block's guided cache for 81 frames at 480x848 (the
real model's shape, computed, nothing allocated); then the trained demo model
sampled with a float, an 8-bit and a 4-bit cache on the same noise: the largest
and mean |x - x_float| of the flow's samples (pixels in [-1, 1]), the demo
classifier's accuracy on the denoised digits, and the median seconds of
``--repeats`` warm runs, the three caches alternating.

    python -m starflow_mlx.benchmarks.kv_cache --per-class 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from starflow_mlx.benchmarks.configs import load_config
from starflow_mlx.benchmarks.jacobi_variants import conditioning
from starflow_mlx.io.loading import load_flow
from starflow_mlx.pipelines.video import kv_cache_bytes
from starflow_mlx.sampling.denoise import score_denoise

CACHES = (None, 8, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jacobi", action="store_true", help="Sample with Jacobi (default: sequential).")
    a = parser.parse_args()
    from starflow_mlx.benchmarks.demo_quality import digit_classifier, to_features
    from starflow_mlx.training.data import load_digits_split

    video = load_config("starflow-v-7b")
    print("STARFlow-V deep block, 81 frames at 480x848 (21 x 30 x 53 latent tokens), guided, float16 scales:")
    for bits in CACHES:
        print(f"  {'float16' if bits is None else f'{bits}-bit'} cache: "
              f"{kv_cache_bytes(video, 21, 30 * 53, 1, 2, bits) / 2**30:.1f} GiB")

    flow = load_flow("demo")
    cfg = flow.config
    labels, y, y_u = conditioning(cfg.num_classes, a.per_class)
    z = mx.random.normal((len(labels), cfg.latent_size, cfg.latent_size, cfg.in_channels), key=mx.random.key(0))
    clf = digit_classifier(load_digits_split()[0])

    def sample(bits):
        return flow.reverse(z, y, y_uncond=y_u, cfg=cfg.cfg, jacobi=a.jacobi, kv_bits=bits)

    samples = {bits: np.array(sample(bits)) for bits in CACHES}  # also the first call: traces
    times = {bits: [] for bits in CACHES}
    for _ in range(a.repeats):
        for bits in CACHES:
            start = time.perf_counter()
            mx.eval(sample(bits))
            times[bits].append(time.perf_counter() - start)
    print(f"demo, {len(labels)} samples ({a.per_class} per digit), cfg {cfg.cfg}, "
          f"{'Jacobi' if a.jacobi else 'sequential'}, {a.repeats} warm runs each")
    print("| KV cache | max diff | mean diff | accuracy | seconds |")
    print("|---|---|---|---|---|")
    for bits in CACHES:
        diff = np.abs(samples[bits] - samples[None])
        clean = np.array(score_denoise(flow, mx.array(samples[bits]), y, cfg.noise_std))
        accuracy = float((clf.predict(to_features(clean[..., 0])) == labels).mean())
        print(f"| {'float' if bits is None else f'{bits}-bit'} | {diff.max():.3f} | {diff.mean():.4f} | "
              f"{accuracy:.1%} | {statistics.median(times[bits]):.2f} |")


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
