"""How much slower quantized models sample on a CPU, by batch size: float16, 8-bit and 4-bit, side by side.

The demo model (or ``--model``) is quantized into a temporary folder and each variant samples
``--batches`` images the way ``starflow generate -n N`` does (the default sampler, then the
denoising step), the variants taking turns so that a busy machine slows them alike; the
median of ``--repeats`` timed runs (after one untimed run that builds the kernels) is
reported with each variant's ratio to float16 at the same batch. Both the wall-clock time and
the process's CPU time are given; the ratio is of CPU time, the work done, which other
processes on a shared machine disturb far less than the wall clock. ``--mlx-kernel`` also times
the quantized variants with MLX's own quantized product at every size (what ran before
``starflow_mlx.models.quantized_linear``), in the same run.

    python -m starflow_mlx.benchmarks.quantized_speed --model demo --batches 1 4 16 --mlx-kernel
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from starflow_mlx.models import quantized_linear


def sample_seconds(pipe, batch: int, mlx_kernel: bool) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one sample of ``batch`` images."""
    saved = quantized_linear.DEQUANTIZE_ROWS
    quantized_linear.DEQUANTIZE_ROWS = 1 << 62 if mlx_kernel else saved  # never dequantize: MLX's kernel throughout
    try:
        start, cpu = time.perf_counter(), time.process_time()
        mx.eval(pipe.sample("7" if pipe.is_class_model else "a photo of a cat", seed=0, num_images=batch))
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        quantized_linear.DEQUANTIZE_ROWS = saved


def measure(model: str, batches: list[int], repeats: int, mlx_kernel: bool) -> list[dict]:
    from starflow_mlx.pipelines.image import Pipeline
    from starflow_mlx.quantize.quantize_folder import quantize_model_folder

    with tempfile.TemporaryDirectory() as tmp:
        variants = {"float16": Pipeline.from_pretrained(model, dtype="float16")}
        for bits in (8, 4):
            quantize_model_folder(model, Path(tmp, f"int{bits}"), bits)
            variants[f"int{bits}"] = Pipeline.from_pretrained(Path(tmp, f"int{bits}"))
        runs = [(name, False) for name in variants] + [(name, True) for name in variants if mlx_kernel and name != "float16"]
        rows = []
        for batch in batches:
            times = {run: [] for run in runs}
            for attempt in range(repeats + 1):  # the first round builds kernels and traces: not timed
                for name, kernel in runs:
                    seconds = sample_seconds(variants[name], batch, kernel)
                    if attempt:
                        times[(name, kernel)].append(seconds)
            base = statistics.median(cpu for _, cpu in times[("float16", False)])
            for (name, kernel), values in times.items():
                cpu = statistics.median(c for _, c in values)
                rows.append({"batch": batch, "variant": name + (" (MLX's quantized kernel)" if kernel else ""),
                             "seconds": statistics.median(w for w, _ in values), "cpu_seconds": cpu,
                             "ratio_to_float16": cpu / base})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mlx-kernel", action="store_true", help="also time MLX's own quantized product")
    args = parser.parse_args()
    rows = measure(args.model, args.batches, args.repeats, args.mlx_kernel)
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| -n | variant | wall s | CPU s | x float16 (CPU) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
              f"{r['ratio_to_float16']:.2f} |")


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
