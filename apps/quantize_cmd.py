"""``starflow quantize``: write an INT8 / 4-bit copy of a model folder, or measure what it costs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def quantize(
    model: str = typer.Argument(..., help="Model folder or name ('demo', 'demo-video')."),
    bits: int = typer.Option(4, "--bits", "-b", help="4 or 8."),
    group_size: int = typer.Option(64, "--group-size", help="32, 64 or 128 weights share one scale and bias."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", readable=False, help="New folder for the quantized model."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if starflow-mlx wrote it (only when done)."),
    deep_bits: Optional[int] = typer.Option(None, help="Bits for the deep block (instead of --bits there; its "
                                                       "input/output projections still stay float16)."),
    shallow_bits: Optional[int] = typer.Option(None, help="Bits for the shallow blocks (the same way)."),
    override: List[str] = typer.Option([], "--override", help="PATTERN=BITS for matching layers; 0 keeps float16."),
    text_bits: int = typer.Option(8, help="Bits for the T5 encoder of a full model folder (0: keep float16)."),
    report: bool = typer.Option(False, "--report", help="Measure float16, 8-bit, 4-bit and mixed instead of writing "
                                                             "(minutes: it says how many once it has started)."),
    json_out: bool = typer.Option(False, "--json", help="With --report: print JSON."),
    samples: int = typer.Option(32, help="With --report: images sampled per variant for the speed and error "
                                         "columns."),
    per_class: int = typer.Option(10, help="With --report on the demo: digits sampled per class for the accuracy "
                                           "column."),
) -> None:
    """Quantize the linear layers group-wise (input/output projections and norms stay float16)."""
    from starflow_mlx.io.resolve import resolve_model
    from starflow_mlx.quantize.quantize_folder import block_bits, parse_overrides, quantize_model_folder

    folder = resolve_model(model)
    if report:
        from starflow_mlx.benchmarks.quantization import format_table, measure_variants

        from starflow_mlx.progress import StageProgress

        with StageProgress() as stages:
            rows = measure_variants(folder, group_size=group_size, samples=samples, per_class=per_class,
                                    progress=stages, log=stages.log)
        if json_out:
            import json

            typer.echo(json.dumps(rows, indent=2))
        else:
            typer.echo(format_table(rows))
        return
    if output is None:
        raise ValueError("pass --output DIR for the quantized model (or --report to measure)")
    from starflow_mlx.config import FlowConfig

    num_blocks = FlowConfig.load(folder / "config.json").num_blocks
    blocks = block_bits(num_blocks, deep_bits, shallow_bits)
    summary = quantize_model_folder(folder, output, bits, group_size, parse_overrides(override), text_bits or None,
                                    force, blocks)
    typer.echo(f"{output}: {summary}")
