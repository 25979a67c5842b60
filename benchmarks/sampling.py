"""Sampling latency, sequential and block-wise Jacobi, per block: against the roofline, the products alone, upstream.

A flow of a named shape (or a ``config.json``) gets random weights; each
sampler's first call (tracing and compiling the chunk steps) is timed apart,
then it runs ``repeats`` times warm (the cached steps are reused, so no
tracing), each run timed with ``time.perf_counter`` around ``mx.eval`` and the
median reported. The report names the sampler ``jacobi=None`` (auto) picks here. With upstream's sources (``--upstream``), upstream's own PyTorch
sampler runs on the same weights, noise and text features, alternating with
ours, and the samples are compared.

    starflow bench --config small --sampler both --repeats 3
    python -m starflow_mlx.benchmarks.sampling --config tiny --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from starflow_mlx import blas
from starflow_mlx.benchmarks.configs import build_flow, load_config
from starflow_mlx.benchmarks.matmul_floor import block_floor
from starflow_mlx.benchmarks.roofline import measure_bandwidth, parameter_bytes, roofline
from starflow_mlx.io.loading import parse_dtype
from starflow_mlx.sampling.auto import choose_jacobi
from starflow_mlx.sampling.jacobi import SCHEDULES, JacobiStats
from starflow_mlx.sampling.stepper import compiled_steps

SAMPLERS = ("sequential", "jacobi")
# Largest |ours - upstream| accepted as the same sample, relative to the sample's scale.
MATCH_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}


class BenchError(ValueError):
    """Benchmark options that cannot work."""


@dataclass
class BenchOptions:
    config: str = "small"
    samplers: tuple[str, ...] = SAMPLERS
    batch: int = 1
    cfg: float | None = None  # None: the config's own guidance weight (0 without text)
    block_size: int = 64
    threshold: float = 0.005
    max_iter: int = 32
    repeats: int = 3
    dtype: str = "float32"
    seed: int = 0
    bandwidth_mb: int = 1024
    upstream: str | None = None
    threads: int | None = None  # torch threads for upstream; None: as many cores as MLX keeps busy
    schedule: str = "chunk"  # our Jacobi schedule (upstream always runs its own chunk schedule)

    def check(self) -> None:
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown or not self.samplers:
            raise BenchError(f"unknown sampler {unknown[0] if unknown else ''!r}: use sequential, jacobi or both")
        if self.batch < 1 or self.repeats < 1 or self.block_size < 1 or self.max_iter < 1:
            raise BenchError("batch, repeats, block size and max iterations must be at least 1")
        if not 0 < self.threshold < math.inf:  # NaN fails too
            raise BenchError("the Jacobi threshold must be positive")
        if self.cfg is not None and not 0 <= self.cfg < math.inf:
            raise BenchError(f"--cfg must be a number 0 or more, got {self.cfg}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {self.threads}")
        if not 0 <= self.seed < 2**63:
            raise BenchError(f"--seed must be 0 or more and below 2**63, got {self.seed}")
        if self.schedule not in SCHEDULES:
            raise BenchError(f"unknown Jacobi schedule {self.schedule!r}: use {' or '.join(SCHEDULES)}")
        parse_dtype(self.dtype)


# -- machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    if sys.platform == "darwin":
        import subprocess

        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return done.stdout.strip() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_libraries() -> list[str]:
    """BLAS/LAPACK libraries mapped into this process (Linux): MLX's CPU matmuls run on one of them."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if re.search(r"(blas|lapack|mkl|accelerate)", line, re.I)}
    except OSError:
        return []
    return sorted(os.path.basename(p) for p in paths if p.startswith("/"))


def machine_info() -> dict:
    return {"cpu": cpu_model(), "cores": blas.cpu_cores(), "platform": platform.platform(), "python": platform.python_version(),
            "mlx": mx.__version__, "device": str(mx.default_device()), "blas": blas_libraries()}


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (all of it, torch included when loaded)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# -- inputs ----------------------------------------------------------------------------------
def make_inputs(config, batch: int, seed: int):
    """Noise ``z`` (channels-last), text features ``y`` and the unconditional features (zeros)."""
    size = config.latent_size
    grid = (config.num_frames, size, size) if config.is_video else (size, size)
    z = mx.random.normal((batch, *grid, config.in_channels), key=mx.random.key(seed + 1))
    y = y_u = None
    if config.txt_dim:
        y = mx.random.normal((batch, config.txt_size, config.txt_dim), key=mx.random.key(seed + 2))
        y_u = mx.zeros_like(y)
    mx.eval(z, *(a for a in (y, y_u) if a is not None))
    return z, y, y_u


def tokens_per_sample(config) -> int:
    side = config.latent_size // config.patch_size
    return side * side * max(config.num_frames, 1)


# -- one of our runs -------------------------------------------------------------------------
class BlockClock:
    """A ``progress`` callback that stamps the end of every block of a ``reverse`` call."""

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self.last = time.perf_counter()

    def start(self) -> None:
        self.seconds = {}
        self.last = time.perf_counter()

    def __call__(self, label: str, done: int, total: int, **info) -> None:
        if done < total:
            return
        # Steps are dispatched asynchronously: wait for the block's last token before reading the clock.
        mx.synchronize()
        now = time.perf_counter()
        self.seconds[int(re.match(r"block (\d+)", label).group(1))] = now - self.last
        self.last = now


def traces(flow) -> int:
    """Chunk-step traces so far over all blocks of ``flow``."""
    return sum(compiled_steps(b).traces for b in flow.blocks if not b.is_identity)


def run_ours(flow, inputs, cfg: float, sampler: str, opts: BenchOptions, clock: BlockClock):
    z, y, y_u = inputs
    stats = JacobiStats()
    mx.reset_peak_memory()
    clock.start()
    start = time.perf_counter()
    out = flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=sampler == "jacobi", jacobi_block_size=opts.block_size,
                       jacobi_threshold=opts.threshold, jacobi_max_iter=opts.max_iter, jacobi_schedule=opts.schedule,
                       stats=stats, progress=clock)
    mx.eval(out)
    seconds = time.perf_counter() - start
    return out, seconds, dict(clock.seconds), stats, mx.get_peak_memory()


def jacobi_summary(stats: JacobiStats, blocks: list[int]) -> dict:
    per_block = {}
    for b in blocks:
        its = [c.iterations for c in stats.chunks if c.block == b]
        per_block[str(b)] = {"chunks": len(its), "iterations": its, "total": sum(its),
                             "mean": sum(its) / len(its) if its else 0.0, "max": max(its, default=0),
                             "traces": stats.traces.get(b, 0), "token_evaluations": stats.token_evaluations(b)}
    total = stats.iterations()
    return {"per_block": per_block, "total_iterations": total, "chunks": len(stats.chunks),
            "token_evaluations": stats.token_evaluations(),
            "mean_iterations_per_chunk": total / len(stats.chunks) if stats.chunks else 0.0}


# -- the benchmark ---------------------------------------------------------------------------
def check_memory(config, opts: BenchOptions) -> None:
    """Refuse, with the numbers, a batch or a bandwidth array that memory cannot hold (MLX would crash)."""
    from starflow_mlx.io.memory import InsufficientMemoryError, image_bytes, memory_limit

    total = memory_limit()
    if total is None:
        return
    if opts.batch * image_bytes(config) > total:
        raise InsufficientMemoryError(
            f"a batch of {opts.batch} needs about {opts.batch * image_bytes(config) / 2**30:.1f} GB of memory but "
            f"{total / 2**30:.1f} GB is available: use --batch {max(total // image_bytes(config), 1)} or less")
    if 2 * opts.bandwidth_mb * 2**20 > total:  # the array and its copy
        raise InsufficientMemoryError(f"--bandwidth-mb {opts.bandwidth_mb} needs twice that in memory but "
                                      f"{total >> 20} MB is available: use --bandwidth-mb {total >> 21} or less")


def run_benchmark(opts: BenchOptions, log=None) -> dict:
    """Everything ``starflow bench`` reports, as a JSON-ready dict."""
    opts.check()
    say = log or (lambda message: None)
    config = load_config(opts.config)
    if "jacobi" in opts.samplers and not config.sos:
        raise BenchError(f"config {opts.config} has no start-of-sequence token: Jacobi needs one (use --sampler sequential)")
    cfg = (config.cfg if config.txt_dim else 0.0) if opts.cfg is None else opts.cfg
    if cfg > 0 and not config.txt_dim:
        raise BenchError(f"config {opts.config} has no text conditioning: guidance needs --cfg 0")
    check_memory(config, opts)
    module = None
    if opts.upstream:
        from starflow_mlx.benchmarks.upstream_runner import UpstreamSampler, import_upstream, matching_threads

        module = import_upstream(opts.upstream)
    say(f"building {opts.config} with random {opts.dtype} weights")
    flow = build_flow(config, parse_dtype(opts.dtype), seed=opts.seed)
    inputs = make_inputs(config, opts.batch, opts.seed)
    upstream = None
    if module is not None:
        say(f"building upstream's Model from {opts.upstream}")
        upstream = UpstreamSampler(module, flow, opts.dtype, opts.threads or matching_threads())
    runs = [time_sampler(flow, inputs, cfg, sampler, opts, upstream, say) for sampler in opts.samplers]
    # Measured last, so that its large arrays stay out of the samplers' peak memory figures.
    say(f"measuring memory bandwidth ({opts.bandwidth_mb} MB array)")
    bandwidth = measure_bandwidth(opts.bandwidth_mb)
    block_bytes = {b.index: parameter_bytes(b) for b in flow.blocks if not b.is_identity}
    for run in runs:
        for row in run["blocks"]:
            row.update(roofline(block_bytes[row["block"]], row["steps"], row["seconds"], bandwidth["gb_per_s"]))
        bound = sum(row["bound_seconds"] for row in run["blocks"])
        run["roofline"] = {"bound_seconds": bound, "bandwidth_fraction": bound / run["seconds"]}
    return {
        "config": opts.config, "shape": config.to_dict(), "options": {**asdict(opts), "cfg": cfg},
        "tokens_per_sample": tokens_per_sample(config), "params_bytes": parameter_bytes(flow),
        "block_params_bytes": {str(b): n for b, n in block_bytes.items()},
        "machine": machine_info(), "bandwidth": bandwidth, "runs": runs,
        "auto_sampler": "jacobi" if choose_jacobi(config) else "sequential",
    }


def sequence_lengths(config, blocks: list[int]) -> dict[int, int]:
    """Tokens of one sequence per block: a frame for the shallow blocks of a frame-local video model."""
    deep = config.num_blocks - 1
    frames = config.num_frames if config.is_video and config.shallow_block_local else 1
    return {b: tokens_per_sample(config) // (1 if b == deep else frames) for b in blocks}


def step_rows(config, lengths: dict[int, int], batches: dict[int, int],
              stats: JacobiStats | None) -> dict[int, Counter]:
    """Per block, {rows per step: steps} of a run: one token per step when sequential, else each chunk's
    valid tokens per iteration, times the block's batch (``batches``, guidance's doubling included);
    a frame-local block runs every frame at once."""
    steps = {}
    for b, length in lengths.items():
        per_token = batches[b] * (tokens_per_sample(config) // length)
        if stats is None:
            steps[b] = Counter({per_token: length})
        else:
            steps[b] = Counter()
            for chunk in (c for c in stats.chunks if c.block == b):
                steps[b][per_token * chunk.size] += chunk.iterations
    return steps


def blas_threads(sampler: str):
    """The BLAS threads ``sampler`` runs its products with (the Jacobi sampler's are threaded: ``blas.threads``)."""
    return blas.threads() if sampler == "jacobi" else nullcontext()


def time_sampler(flow, inputs, cfg: float, sampler: str, opts: BenchOptions, upstream, say) -> dict:
    """Warm up, then time ours (and upstream's, alternating) ``opts.repeats`` times; medians per block."""
    config = flow.config
    with blas_threads(sampler):
        mkl_threads = blas.max_threads()  # what the products get, inside threads() for Jacobi
        if upstream is not None and opts.threads is None:  # torch gets the threads this sampler's products get
            from starflow_mlx.benchmarks.upstream_runner import matching_threads

            upstream.set_threads(matching_threads())
    blocks = [b.index for b in flow.blocks if not b.is_identity]
    tokens = opts.batch * tokens_per_sample(config)
    clock = BlockClock()
    say(f"{sampler}: first call (traces and compiles)")
    before = traces(flow)
    first = run_ours(flow, inputs, cfg, sampler, opts, clock)[1]
    first_traces = traces(flow) - before

    def theirs():
        start = time.perf_counter()
        out = upstream(*inputs, cfg, jacobi=sampler == "jacobi", block_size=opts.block_size,
                       threshold=opts.threshold, max_iter=opts.max_iter)
        return out, time.perf_counter() - start, dict(upstream.block_seconds)

    if upstream is not None:
        theirs()
    ours_runs, their_runs, peak = [], [], 0
    before = traces(flow)
    for r in range(opts.repeats):
        out, seconds, per_block, stats, run_peak = run_ours(flow, inputs, cfg, sampler, opts, clock)
        ours_runs.append((seconds, per_block))
        peak = max(peak, run_peak)
        say(f"{sampler}: run {r + 1}/{opts.repeats} ours {seconds:.3f} s")
        if upstream is not None:
            their_out, their_seconds, their_blocks = theirs()
            their_runs.append((their_seconds, their_blocks))
            say(f"{sampler}: run {r + 1}/{opts.repeats} upstream {their_seconds:.3f} s")
    warm_traces = traces(flow) - before
    seconds = statistics.median(s for s, _ in ours_runs)
    run = {"sampler": sampler, "seconds": seconds, "all_seconds": [s for s, _ in ours_runs],
           "first_call_seconds": first, "first_call_traces": first_traces, "warm_traces": warm_traces,
           "tokens_per_s": tokens / seconds, "peak_memory_bytes": peak, "rss_peak_bytes": peak_rss_bytes(),
           "mkl_threads": mkl_threads}
    jac = jacobi_summary(stats, blocks) if sampler == "jacobi" else None
    lengths = sequence_lengths(config, blocks)
    say(f"{sampler}: timing its matrix products alone")
    by_index = {b.index: b for b in flow.blocks}
    # Guidance doubles the batch of the blocks that see the text only.
    batches = {b: opts.batch * (2 if cfg > 0 and by_index[b].sees_text else 1) for b in blocks}
    floors = step_rows(config, lengths, batches, stats if jac else None)
    run["blocks"] = []
    with blas_threads(sampler):  # the products alone, threaded as in the run
        products = {b: block_floor(by_index[b], floors[b]) for b in blocks}
    for b in reversed(blocks):
        block_seconds = statistics.median(pb[b] for _, pb in ours_runs)
        run["blocks"].append({"block": b, "deep": b == config.num_blocks - 1, "seconds": block_seconds,
                              "tokens_per_s": tokens / block_seconds,
                              "steps": jac["per_block"][str(b)]["total"] if jac else lengths[b],
                              "matmul_seconds": products[b]})
    floor = sum(row["matmul_seconds"] for row in run["blocks"])
    run["matmul_floor"] = {"seconds": floor, "fraction": floor / seconds}
    if jac:
        run["jacobi"] = jac
    if upstream is not None:
        run["upstream"] = compare(np.array(out), their_out, seconds, their_runs, opts.dtype)
        run["upstream"]["threads"] = upstream.threads
        run["matmul_floor"]["vs_upstream"] = floor / run["upstream"]["seconds"]
    mx.clear_cache()
    return run


def compare(ours: np.ndarray, theirs: np.ndarray, our_seconds: float, their_runs, dtype: str) -> dict:
    their_seconds = statistics.median(s for s, _ in their_runs)
    diff = float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max())
    scale = max(float(np.abs(theirs).max()), 1.0)
    blocks = {str(b): statistics.median(pb[b] for _, pb in their_runs) for b in their_runs[0][1]}
    return {"seconds": their_seconds, "all_seconds": [s for s, _ in their_runs], "block_seconds": blocks,
            "ratio": our_seconds / their_seconds, "speedup": their_seconds / our_seconds,
            "max_abs_diff": diff, "tolerance": MATCH_TOLERANCE[dtype] * scale,
            "match": diff <= MATCH_TOLERANCE[dtype] * scale}


# -- text report -----------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def format_report(result: dict) -> str:
    m, bw, opts = result["machine"], result["bandwidth"], result["options"]
    lines = [
        f"config {result['config']}: {result['tokens_per_sample']} tokens/sample, weights {_gb(result['params_bytes'])} "
        f"({opts['dtype']}), batch {opts['batch']}, cfg {opts['cfg']}",
        f"machine: {m['cpu']}, {m['cores']} cores, MLX {m['mlx']} on {m['device']}"
        + (f", BLAS {', '.join(m['blas'])}" if m["blas"] else ""),
        f"memory bandwidth: {bw['gb_per_s']:.2f} GB/s (MLX sum {bw['sum_gb_per_s']:.2f}, copy {bw['copy_gb_per_s']:.2f}"
        + (f"; numpy sum {bw['numpy_sum_gb_per_s']:.2f}, copy {bw['numpy_copy_gb_per_s']:.2f})" if "numpy_sum_gb_per_s" in bw
           else ")"),
    ]
    for run in result["runs"]:
        head = (f"\n{run['sampler']}: {run['seconds']:.3f} s median of {len(run['all_seconds'])} warm runs "
                f"({run['warm_traces']} traces; first call {run['first_call_seconds']:.3f} s, "
                f"{run['first_call_traces']} traces), {run['tokens_per_s']:.1f} tokens/s, "
                + (f"MKL threads {run['mkl_threads']}, " if run.get("mkl_threads") else "")
                + f"peak MLX memory {_gb(run['peak_memory_bytes'])}, peak RSS {_gb(run['rss_peak_bytes'])}, "
                f"roofline {run['roofline']['bandwidth_fraction']:.1%}, "
                f"matrix products alone {run['matmul_floor']['seconds']:.3f} s "
                f"({run['matmul_floor']['fraction']:.0%} of the run)")
        lines.append(head)
        up = run.get("upstream")
        lines.append("| block | seconds | tokens/s | steps | MB/step | bound s | BW fraction | products s |"
                     + (" upstream s | ours/upstream |" if up else ""))
        lines.append("|---|---|---|---|---|---|---|---|" + ("---|---|" if up else ""))
        for row in run["blocks"]:
            name = f"{row['block']}{' (deep)' if row['deep'] else ''}"
            cells = [name, f"{row['seconds']:.3f}", f"{row['tokens_per_s']:.1f}", str(row["steps"]),
                     f"{row['bytes_per_step'] / 2**20:.1f}", f"{row['bound_seconds']:.3f}", f"{row['bandwidth_fraction']:.1%}",
                     f"{row['matmul_seconds']:.3f}"]
            if up:
                theirs = up["block_seconds"].get(str(row["block"]))
                cells += [f"{theirs:.3f}", f"{row['seconds'] / theirs:.2f}"] if theirs else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        if "jacobi" in run:
            jac = run["jacobi"]
            per = ", ".join(f"block {b}: {v['iterations']}" for b, v in jac["per_block"].items())
            lines.append(f"Jacobi ({opts['schedule']} schedule) iterations per chunk (block size {opts['block_size']}, "
                         f"threshold {opts['threshold']}): mean {jac['mean_iterations_per_chunk']:.2f}; {per}; "
                         f"{jac['token_evaluations']} token evaluations")
        if up:
            lines.append(f"upstream ({up['threads']} torch threads): {up['seconds']:.3f} s; ours/upstream {up['ratio']:.2f} "
                         f"(speed-up {up['speedup']:.2f}x); max |ours - upstream| {up['max_abs_diff']:.2e} "
                         f"({'match' if up['match'] else 'MISMATCH'}, tolerance {up['tolerance']:.1e}); "
                         f"these matrix products alone take {run['matmul_floor']['vs_upstream']:.2f} of upstream's time")
    lines.append(f"\nauto sampler (jacobi=None) on {m['device']}: {result['auto_sampler']}")
    if not any("upstream" in run for run in result["runs"]):  # say so, rather than leave the comparison out silently
        lines.append("upstream: not compared (no upstream sources: pass --upstream PATH to a checkout of "
                     "apple/ml-starflow, or set STARFLOW_UPSTREAM; needs torch)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--sampler", default="both", choices=["sequential", "jacobi", "both"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.005)
    parser.add_argument("--max-iter", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--bandwidth-mb", type=int, default=1024)
    parser.add_argument("--upstream", default=os.environ.get("STARFLOW_UPSTREAM"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jacobi-schedule", default="chunk", choices=list(SCHEDULES))
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    samplers = SAMPLERS if a.sampler == "both" else (a.sampler,)
    opts = BenchOptions(a.config, samplers, a.batch, a.cfg, a.block_size, a.threshold, a.max_iter, a.repeats, a.dtype,
                        bandwidth_mb=a.bandwidth_mb, upstream=a.upstream, threads=a.threads, schedule=a.jacobi_schedule)
    result = run_benchmark(opts, log=lambda message: print(message, file=sys.stderr))
    print(json.dumps(result, indent=2) if a.json else format_report(result))


if __name__ == "__main__":
    from starflow_mlx.benchmarks.entry import run

    run(main)
