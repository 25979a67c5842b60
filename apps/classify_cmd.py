"""``starflow classify``: the class under which an image (or clip) is most likely, by Bayes' rule.

p(class | x) is the softmax over classes of log p(x | class) in nats, a uniform prior over the
model's classes (or the candidate prompts of ``--prompts``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from starflow_mlx.apps.job_files import DEFAULT_MODEL

MAX_PROMPTS_BYTES = 1 << 20
MAX_PROMPTS = 1000  # each candidate is a forward pass


def read_prompts(path: Path) -> list[str]:
    """One candidate prompt a line (blank lines skipped), from a bounded text file."""
    if not path.is_file():
        raise ValueError(f"--prompts {path} not found (one candidate prompt a line)")
    if path.stat().st_size > MAX_PROMPTS_BYTES:
        raise ValueError(f"--prompts {path} is larger than {MAX_PROMPTS_BYTES >> 20} MB: give one prompt a line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not 2 <= len(prompts) <= MAX_PROMPTS:
        raise ValueError(f"--prompts {path} holds {len(prompts)} prompts: give 2 to {MAX_PROMPTS}, one a line")
    return prompts


def classify(
    path: Path = typer.Argument(..., readable=False, help="Image to classify, or an .mp4 for a video model."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="Model folder, 'demo', 'demo-video', or a Hugging Face repo id."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", readable=False,
                                           help="Text file of candidate prompts, one a line (default: the model's "
                                                "classes)."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Video models: the frame rate the clip is resampled to."),
    top: Optional[int] = typer.Option(None, "--top", help="List only the K most probable classes."),
) -> None:
    """Print the most probable class, then p(class | input) and bits/dim for each class, most probable first."""
    from starflow_mlx.pipelines.load import load_pipeline
    from starflow_mlx.safe_text import printable

    if top is not None and top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    candidates = read_prompts(prompts) if prompts is not None else None
    pipe = load_pipeline(model)
    if fps is not None and not pipe.VIDEO:
        raise ValueError("--fps is for classifying .mp4 clips with a video model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe.classify(path, candidates, fps=fps)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    order = sorted(range(len(result.prompts)), key=lambda i: -result.log_likelihoods[i])[:top]
    best = order[0]
    typer.echo(f"{printable(result.best, 300)}  (p = {result.probabilities[best]:.4f})")
    for i in order:
        typer.echo(f"  {result.probabilities[i]:.4f}  {result.bits_per_dim[i]:8.4f} bits/dim  "
                   f"{printable(result.prompts[i], 300)}")
    for k, marginal in result.word_marginals().items():
        ranked = sorted(marginal.items(), key=lambda item: -item[1])
        typer.echo(f"word {k + 1}: " + ", ".join(f"{printable(w, 60)} {p:.4f}" for w, p in ranked))
