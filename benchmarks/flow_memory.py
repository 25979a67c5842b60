"""Peak memory of loading a quantized flow at real size, with random weights that never exist in float.

A model folder for a named shape (default ``starflow-v-7b``) is written at 4 or 8 bits with
the default quantization policy: every tensor is drawn at its final dtype and streamed to
``model.safetensors`` one at a time, so writing a 7B folder needs about one tensor of memory.
A fresh process then loads it with :func:`starflow_mlx.load_flow` and reports its peak
resident memory, MLX's peak allocation and the time taken.

    python -m starflow_mlx.benchmarks.flow_memory --bits 4 --bits 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LOADER = """
import json, resource, sys, time
start = time.perf_counter()
import mlx.core as mx
from starflow_mlx import load_flow
flow = load_flow(sys.argv[1])
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"seconds": seconds, "peak_rss": rss, "mlx_peak": mx.get_peak_memory(),
                  "mlx_active": mx.get_active_memory()}))
"""


def write_random_folder(shape: str, bits: int, folder: Path, group_size: int = 64, seed: int = 0) -> int:
    """A quantized model folder of ``shape`` with random weights; returns the safetensors size in bytes."""
    from mlx.utils import tree_flatten

    from starflow_mlx.benchmarks.configs import load_config
    from starflow_mlx.convert.safetensors_stream import write_safetensors
    from starflow_mlx.models.starflow import STARFlow
    from starflow_mlx.quantize.policy import apply_quantization, plan_quantization

    config = load_config(shape)
    flow = STARFlow(config)  # lazy: parameters are shapes until evaluated, and they never are
    plan = plan_quantization(flow, bits, group_size)
    apply_quantization(flow, plan)
    config.quantization, config.dtype = plan, "float16"
    rng = np.random.default_rng(seed)

    def producer(name: str, shape_: tuple[int, ...], dtype: str):
        def make() -> np.ndarray:
            if dtype == "uint32":  # packed quantized integers: any bit pattern is a valid weight
                return rng.integers(0, 2**32, size=shape_, dtype=np.uint32)
            if name.endswith("scales"):
                return np.full(shape_, 0.02 / 2**bits, np.float16)
            return (rng.standard_normal(shape_, dtype=np.float32) * 0.02).astype(np.float16)
        return make

    entries = []
    for name, value in tree_flatten(flow.parameters()):
        dtype = str(value.dtype).removeprefix("mlx.core.")
        dtype = "float16" if dtype in ("float32", "bfloat16") else dtype
        entries.append((name, dtype, tuple(value.shape), producer(name, tuple(value.shape), dtype)))
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", entries, metadata={"format": "mlx"})
    config.save(folder / "config.json")
    return (folder / "model.safetensors").stat().st_size


def measure(shape: str, bits: int, work: Path) -> dict:
    folder = work / f"{shape}-{bits}bit"
    start = time.perf_counter()
    size = write_random_folder(shape, bits, folder)
    written = time.perf_counter() - start
    out = subprocess.run([sys.executable, "-c", LOADER, str(folder)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"shape": shape, "bits": bits, "file_bytes": size, "write_seconds": written, **result}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="starflow-v-7b")
    parser.add_argument("--bits", type=int, action="append", choices=(4, 8))
    parser.add_argument("--workdir", type=Path, default=None, help="where the folders go (default: a temp folder)")
    args = parser.parse_args(argv)
    from starflow_mlx.benchmarks.configs import load_config
    from starflow_mlx.pipelines.prompts import latent_size
    from starflow_mlx.pipelines.video import kv_cache_bytes

    config = load_config(args.shape)
    if config.is_video:
        h, w = latent_size(config, "16:9")
        kv = kv_cache_bytes(config, config.num_frames, h * w, 1, 2)
        print(f"{args.shape}: deep-block KV cache for {4 * config.num_frames - 3} frames at {16 * h}x{16 * w} with "
              f"guidance, float16: {kv / 2**30:.1f} GiB", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for bits in args.bits or [4, 8]:
            r = measure(args.shape, bits, Path(tmp))
            print(f"{r['shape']} {r['bits']}-bit: file {r['file_bytes'] / 2**30:.2f} GiB, load {r['seconds']:.1f} s, "
                  f"peak resident {r['peak_rss'] / 2**30:.2f} GiB, MLX peak {r['mlx_peak'] / 2**30:.2f} GiB",
                  flush=True)
            for old in Path(tmp).iterdir():
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
