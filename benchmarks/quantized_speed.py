"""How much slower quantized models sample on a CPU, by batch size: float16, 8-bit and 4-bit, side by side.

The demo model (or ``--model``) is quantized into a temporary folder and each variant samples
``--batches`` images the way ``starflow generate -n N`` does (the default sampler, then the
denoising step), the variants taking turns so that a busy machine slows them alike; the
median of ``--repeats`` timed runs (after one untimed run that builds the kernels) is
reported with each variant's ratio to float16 at the same batch (and float32, the demo as stored).
Both the wall-clock time and
the process's CPU time are given; the ratio is of CPU time, the work done, which other
processes on a shared machine disturb far less than the wall clock. ``--mlx-kernel`` also times
the quantized variants loaded a second time with MLX's own quantized layer (what ran before
``starflow_mlx.models.quantized_linear``), in the same run.

``--products`` times one layer's product alone instead (the demo's 64->256 MLP input, 8 and
4 bits): MLX's quantized kernel against dequantizing the weight and multiplying, by rows.

    python -m starflow_mlx.benchmarks.quantized_speed --model demo --batches 1 4 16 --mlx-kernel
    python -m starflow_mlx.benchmarks.quantized_speed --products
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from starflow_mlx.models import quantized_linear


def sample_seconds(pipe, batch: int) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one sample of ``batch`` images."""
    start, cpu = time.perf_counter(), time.process_time()
    mx.eval(pipe.sample("7" if pipe.is_class_model else "a photo of a cat", seed=0, num_images=batch))
    return time.perf_counter() - start, time.process_time() - cpu


def with_mlx_layers(pipe):
    """``pipe`` with MLX's own quantized layer back in place of the row-aware one."""
    for _, module in pipe.flow.named_modules():
        if type(module) is quantized_linear.QuantizedLinear:
            module.__class__ = nn.QuantizedLinear
    return pipe


def products(rows_list=(2, 8, 16, 32, 128, 512), repeats: int = 20) -> list[dict]:
    """CPU milliseconds per product, median of ``repeats``: MLX's kernel, dequantize + BLAS, float32."""
    def cpu_ms(fn):
        mx.eval(fn())
        times = []
        for _ in range(repeats):
            start = time.process_time()
            mx.eval(fn())
            times.append((time.process_time() - start) * 1e3)
        return statistics.median(times)

    weight = mx.random.normal((256, 64), key=mx.random.key(0)) * 0.05
    rows = []
    for bits in (8, 4):
        q, scales, biases = mx.quantize(weight, group_size=64, bits=bits)
        for count in rows_list:
            x = mx.random.normal((count, 64), key=mx.random.key(count))
            kernel = cpu_ms(lambda: mx.quantized_matmul(x, q, scales, biases, transpose=True, group_size=64, bits=bits))
            dequantized = cpu_ms(lambda: x @ mx.dequantize(q, scales, biases, group_size=64, bits=bits).T)
            rows.append({"bits": bits, "rows": count, "kernel_ms": kernel, "dequantized_ms": dequantized,
                         "float_ms": cpu_ms(lambda: x @ weight.T)})
    return rows


def measure(model: str, batches: list[int], repeats: int, mlx_kernel: bool) -> list[dict]:
    from starflow_mlx.pipelines.image import Pipeline
    from starflow_mlx.quantize.quantize_folder import quantize_model_folder

    with tempfile.TemporaryDirectory() as tmp:
        # Each variant its own pipeline: compiled steps are cached per model, so none reuses another's trace.
        variants = {"float32": Pipeline.from_pretrained(model, dtype="float32"),
                    "float16": Pipeline.from_pretrained(model, dtype="float16")}
        for bits in (8, 4):
            quantize_model_folder(model, Path(tmp, f"int{bits}"), bits)
            variants[f"int{bits}"] = Pipeline.from_pretrained(Path(tmp, f"int{bits}"))
            if mlx_kernel:
                variants[f"int{bits} (MLX's quantized layer)"] = with_mlx_layers(
                    Pipeline.from_pretrained(Path(tmp, f"int{bits}")))
        rows = []
        for batch in batches:
            times = {name: [] for name in variants}
            for attempt in range(repeats + 1):  # the first round builds kernels and traces: not timed
                for name, pipe in variants.items():
                    seconds = sample_seconds(pipe, batch)
                    if attempt:
                        times[name].append(seconds)
            base = {ref: statistics.median(cpu for _, cpu in times[ref]) for ref in ("float16", "float32")}
            for name, values in times.items():
                cpu = statistics.median(c for _, c in values)
                rows.append({"batch": batch, "variant": name, "seconds": statistics.median(w for w, _ in values),
                             "cpu_seconds": cpu, "ratio_to_float16": cpu / base["float16"],
                             "ratio_to_float32": cpu / base["float32"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mlx-kernel", action="store_true", help="also time MLX's own quantized layer")
    parser.add_argument("--products", action="store_true", help="time one layer's product alone, by rows")
    args = parser.parse_args()
    if args.products:
        print("| bits | rows | MLX's kernel ms | dequantize + BLAS ms | float32 ms |\n|---|---|---|---|---|")
        for r in products():
            print(f"| {r['bits']} | {r['rows']} | {r['kernel_ms']:.3f} | {r['dequantized_ms']:.3f} | "
                  f"{r['float_ms']:.3f} |")
        print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        return
    rows = measure(args.model, args.batches, args.repeats, args.mlx_kernel)
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| -n | variant | wall s | CPU s | x float16 | x float32 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
              f"{r['ratio_to_float16']:.2f} | {r['ratio_to_float32']:.2f} |")


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
