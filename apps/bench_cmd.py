"""``starflow bench``: time sequential and Jacobi sampling of a model shape with random weights."""

from __future__ import annotations

import os
from typing import Optional

import typer


def bench(
    config: str = typer.Option("small", "--config", "-c",
                               help="tiny, small, digits-demo, starflow-3b, starflow-v-7b, or a config.json."),
    sampler: str = typer.Option("both", "--sampler", help="sequential, jacobi or both."),
    batch: int = typer.Option(1, "--batch", "-b", help="Samples per run."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance weight (default: the config's; 0 turns it off)."),
    block_size: int = typer.Option(64, "--block-size", help="Jacobi chunk size in tokens."),
    threshold: float = typer.Option(0.005, "--threshold", help="Jacobi stopping residual."),
    max_iter: int = typer.Option(32, "--max-iter", help="Jacobi iterations per chunk at most."),
    repeats: int = typer.Option(3, "--repeats", "-r", help="Timed runs per sampler (the median is reported)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16 weights."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights, noise and text features."),
    bandwidth_mb: int = typer.Option(1024, "--bandwidth-mb", help="Array size for the memory-bandwidth measurement."),
    upstream: Optional[str] = typer.Option(None, "--upstream",
                                           help="apple/ml-starflow checkout to time side by side "
                                                "(default: $STARFLOW_UPSTREAM; needs torch)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads for upstream (default: as MLX uses)."),
    jacobi_schedule: str = typer.Option("chunk", "--jacobi-schedule",
                                        help="Our Jacobi schedule: chunk (upstream's), window (sliding, commits "
                                             "converged tokens) or adaptive (chunk sizes per block from "
                                             "measured convergence)."),
    json_out: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
) -> None:
    """Sampling latency per block, Jacobi iterations, memory, bandwidth roofline, products alone (optionally vs upstream)."""
    import json

    from starflow_mlx.benchmarks.sampling import SAMPLERS, BenchOptions, format_report, run_benchmark
    from starflow_mlx.io.generation_options import check_jacobi

    if sampler not in ("sequential", "jacobi", "both"):
        raise ValueError(f"unknown sampler {sampler!r}: use sequential, jacobi or both")
    flags = {"jacobi_block_size": "--block-size", "jacobi_threshold": "--threshold", "jacobi_max_iter": "--max-iter"}
    check_jacobi(flags, jacobi_block_size=block_size, jacobi_threshold=threshold, jacobi_max_iter=max_iter)
    opts = BenchOptions(config=config, samplers=SAMPLERS if sampler == "both" else (sampler,), batch=batch, cfg=cfg,
                        block_size=block_size, threshold=threshold, max_iter=max_iter, repeats=repeats, dtype=dtype,
                        seed=seed, bandwidth_mb=bandwidth_mb, upstream=upstream or os.environ.get("STARFLOW_UPSTREAM"),
                        threads=threads, schedule=jacobi_schedule)
    result = run_benchmark(opts, log=lambda message: typer.echo(message, err=True))
    typer.echo(json.dumps(result, indent=2) if json_out else format_report(result))
