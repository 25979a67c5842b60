"""Peak memory and time of a streamed Wan2.2 VAE decode at the real widths (random weights).

Decodes ``--frames`` frames (1 + 4k) of ``--height`` x ``--width`` one latent frame at a
time through ``VideoVAE.decode_frames`` and prints one JSON line per dtype: seconds per
chunk, the peak MLX memory (weights included) and the weights' own size. The second
chunk is the steady state of streaming: every later chunk has the same shapes.

    python -m starflow_mlx.benchmarks.wan_vae                       # 5 frames at 32 x 64: minutes on a CPU
    python -m starflow_mlx.benchmarks.wan_vae --frames 5 --height 64 --width 112 --dtype float32
    python -m starflow_mlx.benchmarks.wan_vae --compare-conv   # mx.conv3d vs per-frame conv2d sums
    python -m starflow_mlx.benchmarks.wan_vae --psnr --frames 5 --height 64 --width 64   # float16/bfloat16 vs float32
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from starflow_mlx.io.loading import cast_floats, parse_dtype
from starflow_mlx.progress import about
from starflow_mlx.models.wan_vae import CausalConv3d, WanVAE, WanVAEConfig
from starflow_mlx.io.video_vae import VideoVAE

# The streamed float32 decode at the real widths took about 0.02 s per output pixel (frames x height x width) on
# the shared 2-core CPU of benchmarks/README.md: 199 s for 5 frames at 32 x 64, 788 s for 5 at 64 x 112.
SECONDS_PER_PIXEL = 0.02
WEIGHT_BYTES = {"float32": 2.22e9, "float16": 1.11e9, "bfloat16": 1.11e9}  # measured, the same table


def check_size(frames: int, height: int, width: int, dtype: str, tile: int | None) -> None:
    """Refuse, in one line, a decode this machine cannot hold; say up front how long the rest will take."""
    from starflow_mlx.io.memory import memory_limit
    from starflow_mlx.pipelines.video import VAE_BYTES_PER_PIXEL

    if (frames - 1) % 4 or height % 16 or width % 16:
        raise SystemExit("error: --frames must be 1 + 4k and --height, --width multiples of 16")
    total, needed = memory_limit(), WEIGHT_BYTES[dtype] + VAE_BYTES_PER_PIXEL * height * width
    if tile is None and total is not None and needed > total:
        raise SystemExit(f"error: decoding {height} x {width} needs about {needed / 2**30:.0f} GB but "
                         f"{total / 2**30:.0f} GB is available: use a smaller --height/--width, or --tile 16")
    seconds = SECONDS_PER_PIXEL * frames * height * width
    print(f"decoding {frames} frames of {height} x {width} in {dtype}: {about(seconds)} on the shared 2-core "
          "CPU of benchmarks/README.md (less on a GPU); Ctrl-C stops it", file=sys.stderr, flush=True)


def decode_run(frames: int, height: int, width: int, dtype: str, dim: int, dec_dim: int, tile: int | None = None,
               seed: int = 0, progress=None) -> dict:
    """``progress(label, done, total)`` hears of each decoded chunk."""
    report = progress or (lambda *a, **k: None)
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError("frames must be 1 + 4k and height, width multiples of 16")
    mx.random.seed(seed)
    model = WanVAE(WanVAEConfig(dim=dim, dec_dim=dec_dim, has_encoder=False, dtype=dtype))
    cast_floats(model, parse_dtype(dtype))
    mx.eval(model.parameters())
    weights = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    vae = VideoVAE(model, tile=tile)
    latents = mx.random.normal((1, (frames - 1) // 4 + 1, height // 16, width // 16, 48))
    mx.eval(latents)
    mx.reset_peak_memory()
    count = latents.shape[1]
    report("decode chunks", 0, count)
    chunks, start = [], time.perf_counter()
    for out in vae.decode_frames(latents):
        now = time.perf_counter()
        chunks.append({"frames": out.shape[1], "seconds": round(now - start, 2),
                       "peak_bytes": mx.get_peak_memory()})
        del out  # streamed: frames are handed on, never accumulated
        report("decode chunks", len(chunks), count)
        start = time.perf_counter()
    return {"frames": frames, "height": height, "width": width, "dtype": dtype, "dim": dim, "dec_dim": dec_dim,
            "tile": tile, "weights_bytes": weights, "peak_bytes": mx.get_peak_memory(),
            "seconds": round(sum(c["seconds"] for c in chunks), 2), "chunks": chunks,
            "machine": f"{platform.machine()} {platform.system()}, mlx {mx.__version__}, {mx.default_device()}"}


def psnr_run(frames: int, height: int, width: int, dim: int, dec_dim: int, seed: int = 0) -> dict:
    """PSNR of float16 and bfloat16 decodes against float32, same random weights and latents.

    The peak is the float32 output's range (max - min), so the figure means the same for
    random weights as for a trained VAE's [-1, 1] frames.
    """
    mx.random.seed(seed)
    model = WanVAE(WanVAEConfig(dim=dim, dec_dim=dec_dim, has_encoder=False))
    mx.eval(model.parameters())
    master = dict(tree_flatten(model.parameters()))
    latents = mx.random.normal((1, (frames - 1) // 4 + 1, height // 16, width // 16, 48))
    reference = VideoVAE(model).decode(latents)
    peak = (reference.max() - reference.min()).item()
    result = {"frames": frames, "height": height, "width": width, "dim": dim, "dec_dim": dec_dim,
              "reference_range": round(peak, 4)}
    for dtype in ("float16", "bfloat16"):
        model.load_weights(list(master.items()))
        cast_floats(model, parse_dtype(dtype))
        got = VideoVAE(model).decode(latents)
        mse = mx.mean((got - reference) ** 2).item()
        result[f"psnr_{dtype}_db"] = round(10 * math.log10(peak * peak / mse), 2) if mse > 0 else math.inf
        result[f"max_abs_error_{dtype}"] = round(mx.abs(got - reference).max().item(), 5)
    return result


def compare_conv(channels: int, height: int, width: int, repeats: int = 2) -> dict:
    """One decoder-style 3x3x3 convolution over 4 frames + the 2-frame past, both ways."""
    conv = CausalConv3d(channels, channels, 3, padding=1)
    x = mx.random.normal((1, 6, height, width, channels))
    mx.eval(conv.parameters(), x)

    def conv3d():
        return mx.conv3d(x, conv.weight, padding=(0, 1, 1)) + conv.bias

    results = {}
    for name, fn in (("conv3d", conv3d), ("conv2d_sum", lambda: conv.conv(x))):
        mx.eval(fn())  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            mx.eval(fn())
        results[name + "_seconds"] = round((time.perf_counter() - start) / repeats, 4)
    diff = mx.abs(conv3d() - conv.conv(x)).max() / mx.abs(conv3d()).max()
    return {"channels": channels, "height": height, "width": width, **results, "relative_difference": diff.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5)
    # The largest size measured here; 480 x 848 would need about 60 GB untiled and hours per chunk on a CPU.
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--dim", type=int, default=160)
    parser.add_argument("--dec-dim", type=int, default=256)
    parser.add_argument("--compare-conv", action="store_true")
    parser.add_argument("--tile", type=int, default=None, help="spatial tile side in latent cells (off by default)")
    parser.add_argument("--psnr", action="store_true")
    args = parser.parse_args()
    if args.compare_conv:
        # Decoder widths at small sizes (this CPU manages a few GFLOP/s; shapes scale the same way).
        for channels, h, w in ((64, 30, 53), (128, 30, 53), (256, 15, 27)):
            print(json.dumps(compare_conv(channels, h, w)), flush=True)
        return
    if args.psnr:
        print(json.dumps(psnr_run(args.frames, args.height, args.width, args.dim, args.dec_dim)), flush=True)
        return
    from starflow_mlx.progress import StageProgress

    for dtype in args.dtype:
        check_size(args.frames, args.height, args.width, dtype, args.tile)
        with StageProgress() as stages:
            result = decode_run(args.frames, args.height, args.width, dtype, args.dim, args.dec_dim, args.tile,
                                progress=stages)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
