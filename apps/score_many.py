"""``starflow score``: one file as before, or many (files, folders, globs) as a table of rows.

One image or clip with no table option prints its score (:func:`score_one`).
Anything more streams the inputs in batches with a progress bar and prints one row per input;
``--csv``/``--json`` write the rows to a file whole or not at all (``staging.write_file``), never over an
existing file without ``--overwrite``. An input
that cannot be read is a row with its error, the run goes on, and the exit status is 1.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path
from typing import List, Optional

import typer

from starflow_mlx.apps.job_files import DEFAULT_MODEL
from starflow_mlx.apps.lora_options import Lora, LoraScale

OOD_STATS = ("bits", "complexity", "typicality", "ratio")


def _single(paths: list[Path]) -> bool:
    return len(paths) == 1 and not paths[0].is_dir() and (paths[0].exists() or not glob.has_magic(str(paths[0])))


def check_target(path: Optional[Path], option: str, overwrite: bool) -> None:
    """Fail before scoring, not after, when an output file cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{option} {path}: folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path} already exists: pass --overwrite to replace it, or choose another name")


def row_line(row, extra: dict | None = None) -> str:
    from starflow_mlx.safe_text import printable

    name = printable(row.path, 300)
    if row.error is not None:
        return f"{'failed':>9}  {name}: {printable(row.error, 500)}"
    line = f"{row.bits_per_dim:9.4f}  {name}"
    if row.frame_bits is not None:
        line += "  frames " + " ".join(f"{b:.4f}" for b in row.frame_bits)
    for key, value in (extra or {}).items():
        line += f"  {key} {value:.4f}" if isinstance(value, float) else f"  {key} {value}"
    return line


def rows_csv(records: list[dict]) -> bytes:
    out = io.StringIO()
    fields = list(records[0])
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: (" ".join(f"{b:.6f}" for b in v) if isinstance(v, list) and k == "frame_bits"
                             else "; ".join(v) if isinstance(v, list) else v) for k, v in record.items()})
    return out.getvalue().encode("utf-8")


def ranked(rows: list, sort: bool, top: Optional[int]) -> list[int]:
    """Row indices to print: as given, or least likely (highest bits/dim) first, the first ``top`` of them;
    failed rows always, last."""
    order = list(range(len(rows)))
    if not sort and top is None:
        return order
    scored = sorted((i for i in order if rows[i].error is None), key=lambda i: rows[i].bits_per_dim, reverse=True)
    return scored[:top] + [i for i in order if rows[i].error is not None]


def score(
    paths: list[Path] = typer.Argument(..., readable=False, help="Images or .mp4 clips (video models): files, "
                                                                   "folders (searched recursively) or globs."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt (or class name) to condition on; '' for none."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="Model folder, 'demo', 'demo-video', or a Hugging Face repo id."),
    lora: Lora = None,
    lora_scale: LoraScale = None,
    fps: Optional[int] = typer.Option(None, "--fps", help="Video models: the frame rate the clip is resampled to "
                                                          "and named in the prompt (default 16)."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Also write the rows to this CSV file."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the rows to this JSON file."),
    sort: bool = typer.Option(False, "--sort", help="Rank the rows: least likely (highest bits/dim) first."),
    top: Optional[int] = typer.Option(None, "--top", help="Show only the K least likely inputs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Inputs per forward pass (default 16)."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="Write a PNG of each token's share of the "
                                                                   "bits/dim over the input (one input only)."),
    ood: Optional[str] = typer.Option(None, "--ood", help="Outlier statistic: bits, complexity, typicality or "
                                                          "ratio; needs --reference."),
    reference: Optional[Path] = typer.Option(None, "--reference", readable=False,
                                             help="Folder of in-distribution inputs that --ood fits its threshold on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --csv, --json or --heatmap file."),
) -> None:
    """Print exact negative log-likelihoods under the flow, in bits per dimension.

    One file prints its score (a clip also one line per latent frame, each given the frames before
    it). Several files, folders or globs print one row per input: bits/dim, per-frame bits/dim for
    clips, path; --sort and --top rank them. Lower is more likely.
    """
    from starflow_mlx.io.adapters import adapter_options

    if top is not None and top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    if (ood is None) != (reference is None):
        raise ValueError("--ood and --reference go together: --ood STAT --reference FOLDER")
    if ood is not None and ood not in OOD_STATS:
        raise ValueError(f"unknown --ood statistic {ood!r}: use one of {', '.join(OOD_STATS)}")
    table = any(v is not None for v in (csv_file, json_file, top, batch_size, ood)) or sort
    if heatmap is not None:
        if not _single(paths) or table:
            raise ValueError("--heatmap maps one input: give one file, without the table options")
        check_target(heatmap, "--heatmap", overwrite)
    for path, option in ((csv_file, "--csv"), (json_file, "--json")):
        check_target(path, option, overwrite)
    lora, lora_scale = adapter_options(lora, lora_scale)
    if heatmap is not None:
        from starflow_mlx.apps.heatmap_cmd import write_heatmap

        write_heatmap(paths[0], prompt, model, lora, lora_scale, fps, heatmap, overwrite)
    elif _single(paths) and not table:
        score_one(paths[0], prompt, model, lora, lora_scale, fps)
    else:
        score_table(paths, prompt, model, lora, lora_scale, fps, csv_file, json_file, sort, top, batch_size, ood,
                    reference, overwrite)


def score_one(path: Path, prompt: str, model: str, lora, lora_scale, fps: Optional[int]) -> None:
    """One image or clip: its bits/dim (a clip also one line per latent frame, each given the frames before it)."""
    import warnings

    from starflow_mlx.pipelines.load import load_pipeline
    from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS
    from starflow_mlx.pipelines.video import VideoPipeline

    video = path.suffix.lower() == ".mp4"
    if video:
        from starflow_mlx.pipelines.video_io import read_video

        clip, _ = read_video(path, fps=fps or VIDEO_DEFAULTS["fps"])  # a missing or broken file before the model
    else:
        from starflow_mlx.io.image_input import open_image

        if fps is not None:
            raise ValueError("--fps is for scoring an .mp4 with a video model")
        picture = open_image(path)
    pipe = load_pipeline(model, lora=lora, lora_scale=lora_scale)
    if video != isinstance(pipe, VideoPipeline):
        raise ValueError(f"{model} is {'a video' if not video else 'an image'} model: score "
                         f"{'an .mp4' if not video else 'an image'} with it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_frame = pipe.score_frames(clip, prompt, fps=fps or VIDEO_DEFAULTS["fps"]) if video else None
        bpd = sum(per_frame) / len(per_frame) if video else pipe.score(picture, prompt)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    for k, frame_bpd in enumerate(per_frame or []):
        first, last = (pipe.pixel_frames(k) if k else 0), pipe.pixel_frames(k + 1) - 1
        pixels = f"pixel frame {first}" if first == last else f"pixel frames {first}-{last}"
        typer.echo(f"latent frame {k} ({pixels}): {frame_bpd:.4f} bits/dim")
    typer.echo(f"{bpd:.4f} bits/dim" + (" (all frames)" if video else ""))


def score_table(paths, prompt, model, lora, lora_scale, fps, csv_file, json_file, sort, top, batch_size, ood,
                reference, overwrite: bool) -> None:
    from starflow_mlx.apps.errors import fail
    from starflow_mlx.pipelines.load import load_pipeline
    from starflow_mlx.pipelines.scoring import expand_inputs
    from starflow_mlx.progress import StageProgress
    from starflow_mlx.safe_text import printable

    items = expand_inputs(paths)  # an empty folder or a glob matching nothing, before the model loads
    pipe = load_pipeline(model, lora=lora, lora_scale=lora_scale)
    if fps is not None and not pipe.VIDEO:
        raise ValueError("--fps is for scoring .mp4 clips with a video model")
    streaming = not sort and top is None and ood is None
    typer.echo(f"# bits/dim given {prompt!r} (lower is more likely), path")
    rows = []
    with StageProgress() as stages:
        for row in pipe.iter_scores(items, prompt, fps=fps, batch_size=batch_size, progress=stages):
            rows.append(row)
            for message in row.warnings:
                typer.echo(f"warning: {printable(row.path, 300)}: {message}", err=True)
            if streaming:
                typer.echo(row_line(row))
    extras = [{} for _ in rows]
    if ood is not None:
        from starflow_mlx.apps.ood_cmd import ood_columns

        extras = ood_columns(pipe, rows, items, ood, reference, prompt, fps, batch_size)
    if not streaming:
        for i in ranked(rows, sort, top):
            typer.echo(row_line(rows[i], extras[i]))
    records = [dict(row.as_dict(), **extra) for row, extra in zip(rows, extras)]
    if csv_file is not None:
        from starflow_mlx.io.staging import write_file

        write_file(csv_file, rows_csv(records), overwrite)
        typer.echo(f"wrote {csv_file}")
    if json_file is not None:
        from starflow_mlx.io.staging import write_file

        write_file(json_file, (json.dumps(records, indent=2, allow_nan=False) + "\n").encode("utf-8"), overwrite)
        typer.echo(f"wrote {json_file}")
    failed = [r for r in rows if r.error is not None]
    if failed:
        fail(f"{len(failed)} of {len(rows)} inputs could not be scored (their rows say why)")
