"""What quantization costs: size, memory, speed and accuracy of float16, 8-bit, 4-bit and mixed flows.

Everything is measured against the float32 model on the same inputs and noise:
forward ``z`` and ``log_prob`` errors on the float32 model's own samples, and
the difference of samples drawn from the same noise. For the class-conditional
digits demo it adds test bits/dim and the digit classifier's accuracy.

    python -m starflow_mlx.benchmarks.quantization --model demo
    starflow quantize demo --report
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from starflow_mlx.io.loading import load_flow
from starflow_mlx.io.model_folder import MANIFEST, Manifest
from starflow_mlx.progress import about
from starflow_mlx.io.resolve import resolve_model
from starflow_mlx.quantize.quantize_folder import block_bits, quantize_flow, save_flow

# A quantized variant's time over the float16 variant's (the first one, measured in the same run): what the
# estimate of the rest multiplies by. 1.42 in `starflow quantize demo --report --samples 4 --per-class 1` (int8 25 s,
# int4 45 s, mixed 20 s after float16 21 s; the shared 2-core CPU at load average 12).
QUANTIZED_FACTOR = 1.4

VARIANTS = (
    ("float16", None, None),
    ("int8", 8, None),
    ("int4", 4, None),
    ("mixed (deep 4 / shallow 8)", 4, "mixed"),
)


def conditioning(flow, batch: int, seed: int = 0):
    """Features and unconditional features for a batch: class one-hots, or random text features."""
    cfg = flow.config
    if not cfg.txt_dim:
        return None, None
    if cfg.num_classes:
        labels = np.arange(batch) % cfg.num_classes
        y = np.eye(cfg.txt_dim, dtype=np.float32)[labels][:, None, :]
        y_u = np.broadcast_to(np.eye(cfg.txt_dim, dtype=np.float32)[cfg.txt_dim - 1], y.shape)
        return mx.array(y), mx.array(np.ascontiguousarray(y_u))
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((batch, cfg.txt_size, cfg.txt_dim)).astype(np.float32)
    return mx.array(y), mx.zeros_like(mx.array(y))


def check_samples(folder: Path, config, samples: int) -> None:
    """Every variant samples all of them in one batch: refuse, with the numbers, what memory cannot hold."""
    from starflow_mlx.io.memory import InsufficientMemoryError, image_bytes, memory_limit, needed_bytes

    if samples < 1:
        raise ValueError(f"--samples must be at least 1, got {samples}")
    total = memory_limit()
    if total is not None and needed_bytes(folder, config, samples) > total:
        fits = max((total - needed_bytes(folder, config, 0)) // image_bytes(config), 1)
        raise InsufficientMemoryError(
            f"--samples {samples} needs about {needed_bytes(folder, config, samples) / 2**30:.1f} GB of memory but "
            f"{total / 2**30:.1f} GB is available: use --samples {fits} or less")


def noise(flow, batch: int, seed: int = 0) -> mx.array:
    cfg = flow.config
    size = cfg.latent_size
    shape = (batch, cfg.num_frames, size, size, cfg.in_channels) if cfg.num_frames else (batch, size, size, cfg.in_channels)
    return mx.random.normal(shape, key=mx.random.key(seed))


def timed(fn):
    mx.reset_peak_memory()
    start = time.perf_counter()
    out = fn()
    mx.eval(out)
    return out, time.perf_counter() - start, mx.get_peak_memory()


def measure_flow(flow, reference: dict, z, y, y_u, cfg_weight: float, step=lambda: None) -> dict:
    """Speed, memory and errors of one variant against the float32 reference; ``step()`` after each part."""
    x_seq, t_seq, _ = timed(lambda: flow.reverse(z, y, y_uncond=y_u, cfg=cfg_weight))
    step()
    x_jac, t_jac, peak = timed(lambda: flow.reverse(z, y, y_uncond=y_u, cfg=cfg_weight, jacobi=True))
    step()
    z_q, _ = flow.forward(reference["x"], y)
    lp = flow.log_prob(reference["x"], y)
    dims = math.prod(z.shape[1:])
    z_ref, lp_ref = np.array(reference["z"]), np.array(reference["log_prob"])
    return {
        "seconds_sequential": t_seq,
        "seconds_jacobi": t_jac,
        "peak_memory_mb": peak / 2**20,
        "z_rel_error": float(np.abs(np.array(z_q) - z_ref).max() / np.abs(z_ref).max()),
        "log_prob_bpd_error": float(np.abs(np.array(lp) - lp_ref).mean() / (dims * math.log(2))),
        "sample_mean_abs_diff": float(np.abs(np.array(x_jac) - np.array(reference["samples"])).mean()),
        "sequential_vs_jacobi": float(np.abs(np.array(x_seq) - np.array(x_jac)).max()),
    }


def demo_metrics(folder: Path, per_class: int, dtype: str | None, step=lambda: None) -> dict:
    """Classifier accuracy and test bits/dim for class-conditional pixel models (the digits demo)."""
    from starflow_mlx.benchmarks.demo_quality import measure

    result = measure(folder, per_class=per_class, dtype=dtype, step=step)
    return {"accuracy": result["accuracy"], "test_bits_per_dim": result["bits_per_dim"]}


def measure_variants(model: str | Path, group_size: int = 64, samples: int = 32, seed: int = 0,
                     per_class: int = 10, progress=None, log=None) -> list[dict]:
    """One row per variant; ``progress(label, done, total)`` reports the reference and each variant's parts,
    ``log(line)`` how long the rest will take, once the float16 variant has shown the machine's speed."""
    report = progress or (lambda *a, **k: None)
    folder = resolve_model(model)
    ref = load_flow(folder, dtype="float32")
    if ref.config.quantization:
        raise ValueError(f"{folder} is already quantized: report on the float model")
    check_samples(folder, ref.config, samples)
    is_demo = (folder / MANIFEST).is_file() and Manifest.load(folder).kind == "class-to-image"
    z = noise(ref, samples, seed)
    y, y_u = conditioning(ref, samples, seed)
    cfg_weight = ref.config.cfg if y is not None else 0.0
    report("float32 reference", 0, 1)
    x_ref = ref.reverse(z, y, y_uncond=y_u, cfg=cfg_weight, jacobi=True)
    z_ref, _ = ref.forward(x_ref, y)
    reference = {"x": x_ref, "z": z_ref, "log_prob": ref.log_prob(x_ref, y), "samples": x_ref}
    mx.eval(reference)
    report("float32 reference", 1, 1)
    # quantize, sequential, Jacobi; the demo's quality measure, most of the time, reports each digit and bits/dim
    parts = 3 + 11 if is_demo else 3
    # MLX's CPU kernels for quantized products are far slower with float16 scales, so on a CPU the
    # float parts (scales, biases, kept layers) run in float32; on a GPU they stay as stored.
    compute = "float32" if mx.default_device() == mx.cpu else None
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, bits, mode in VARIANTS:
            def step(name=name, ticks=itertools.count(1)):
                report(name, next(ticks), parts)

            report(name, 0, parts)
            out = Path(tmp, name.split()[0])
            out.mkdir()
            if bits is None:
                flow = load_flow(folder, dtype="float16")
            else:
                blocks = block_bits(ref.config.num_blocks, 4, 8) if mode == "mixed" else None
                flow, _ = quantize_flow(folder, bits, group_size, blocks=blocks)
            save_flow(flow, out)
            for extra in folder.iterdir():
                if extra.name not in ("config.json", "model.safetensors"):
                    (out / extra.name).symlink_to(extra.resolve())
            row = {"variant": name, "file_mb": (out / "model.safetensors").stat().st_size / 2**20}
            step()
            row.update(measure_flow(load_flow(out, dtype=compute), reference, z, y, y_u, cfg_weight, step))
            if is_demo:
                row.update(demo_metrics(out, per_class, compute, step))
            rows.append(row)
            mx.clear_cache()
            if log is not None and len(rows) == 1:  # a whole variant, timed on this machine, sizes the rest
                left = len(VARIANTS) - 1
                log(f"{about((time.perf_counter() - started) * QUANTIZED_FACTOR * left)} for the {left} quantized "
                    "variants left (estimated from the float16 one)")
    return rows


COLUMNS = (
    ("variant", "variant", "{}"), ("file_mb", "file MB", "{:.2f}"), ("peak_memory_mb", "peak MB", "{:.1f}"),
    ("seconds_sequential", "seq s", "{:.2f}"), ("seconds_jacobi", "jacobi s", "{:.2f}"),
    ("z_rel_error", "z rel err", "{:.2e}"), ("log_prob_bpd_error", "log p err (bpd)", "{:.4f}"),
    ("sample_mean_abs_diff", "sample diff", "{:.4f}"), ("accuracy", "accuracy", "{:.1%}"),
    ("test_bits_per_dim", "test bpd", "{:.3f}"),
)


def format_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from starflow_mlx.progress import StageProgress

    with StageProgress() as stages:
        rows = measure_variants(args.model, args.group_size, args.samples, per_class=args.per_class, progress=stages,
                                log=stages.log)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
