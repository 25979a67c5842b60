"""``starflow score ... --ood STAT --reference FOLDER``: an outlier statistic per row, thresholded on a reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

ALPHA = 0.05  # the threshold is the reference's 95th percentile: about 5% of inliers are flagged


def ood_columns(pipe, rows, items, stat: str, reference: Path, prompt: str, fps, batch_size) -> list[dict]:
    """Per row: the statistic, the threshold fitted on ``reference``, and whether the row is above it."""
    from starflow_mlx.pipelines.outliers import statistic, threshold, typicality_test
    from starflow_mlx.pipelines.scoring import expand_inputs
    from starflow_mlx.safe_text import printable

    if not reference.is_dir():
        raise ValueError(f"--reference {reference} is not a folder: give a folder of in-distribution inputs")
    reference_items = expand_inputs([reference])
    reference_rows = list(pipe.iter_scores(reference_items, prompt, fps=fps, batch_size=batch_size))
    for row in reference_rows:
        if row.error is not None:
            typer.echo(f"warning: reference {printable(row.path, 300)} left out: {printable(row.error, 300)}", err=True)
    reference_bits = np.array([r.bits_per_dim for r in reference_rows if r.error is None])
    if not len(reference_bits):
        raise ValueError(f"no input in --reference {reference} could be scored")
    options = dict(fps=fps, batch_size=batch_size, reference_bits=reference_bits)
    limit = threshold(statistic(pipe, stat, reference_items, reference_rows, prompt, **options), ALPHA)
    values = statistic(pipe, stat, items, rows, prompt, **options)
    typer.echo(f"# {stat}: threshold {limit:.4f}, the {100 * (1 - ALPHA):.0f}th percentile over {len(reference_bits)} "
               f"reference inputs; above it is an outlier")
    scored = np.array([r.bits_per_dim for r in rows if r.error is None])
    if stat == "typicality" and len(scored):
        test = typicality_test(scored, reference_bits, ALPHA)
        typer.echo(f"# typicality test of the {test.batch} inputs together: mean bits/dim {scored.mean():.4f} is "
                   f"{test.distance:.4f} from the reference's {reference_bits.mean():.4f} (threshold "
                   f"{test.threshold:.4f} from bootstrap batches of {test.batch}): "
                   f"{'typical' if test.typical else 'atypical'}")
    return [{stat: None if np.isnan(v) else float(v), "threshold": limit,
             "outlier": None if np.isnan(v) else bool(v > limit)} for v in values]
