"""What ``generate``, its video branch and ``edit`` share: the default model, where output files go, and what a
file's metadata may ask of a job (its sampler's settings, its kind of model)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "apple/starflow"


@dataclass
class OutputPlan:
    """One file (a grid when several images), or one file per image index in a folder."""

    file: Optional[Path] = None
    names: dict[int, Path] = field(default_factory=dict)
    taken: Optional[Path] = None  # the default name, when it was taken and ``file`` is the next free one

    @property
    def paths(self) -> list[Path]:
        return [self.file] if self.file is not None else list(self.names.values())


def refuse_edits(path: Path, meta: dict) -> None:
    """Files that ``starflow edit`` or ``generate --from-noise`` made record another job: name the command that
    redoes it."""
    if meta.get("operation") in ("edit", "inpaint"):
        raise ValueError(f"{path} was made by starflow edit: redo it with starflow edit --from-metadata {path}")
    if meta.get("operation") == "from-noise":
        raise ValueError(f"{path} was decoded from the noise file {meta.get('noise')}: decode it again with "
                         "starflow generate --from-noise")


def ran_settings(record: dict) -> dict:
    """A file's options with Jacobi settings only when Jacobi ran (older files recorded unused ones)."""
    from starflow_mlx.sampling.auto import JACOBI_SETTINGS

    return record if record["jacobi"] else dict(record, **dict.fromkeys(JACOBI_SETTINGS))


def file_stem(prompt: str, seed: int) -> str:
    from starflow_mlx.pipelines.image_files import slug

    return f"{slug(prompt)}-seed{seed}"


def check_writable(path: Path) -> None:
    """Fail before minutes of sampling, not after, when an output cannot be created."""
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder (give a file name, or use --output-dir)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {parent} is not a writable folder")


def plan_outputs(prompt: str, seed: int, indices: range, output: Optional[Path], output_dir: Optional[Path],
                 overwrite: bool, default: Optional[Path], suffix: str = ".png", check_format=None) -> OutputPlan:
    """The files to write; an existing one is an error unless ``overwrite``, a default name picks a free one.

    ``suffix`` names default and folder files; ``check_format(path)`` refuses an --output it cannot write.
    """
    from starflow_mlx.pipelines.image_files import free_name, image_format

    if output is not None and output_dir is not None:
        raise ValueError("give --output FILE or --output-dir DIR, not both")
    if output_dir is not None:
        width = max(3, len(str(indices.stop - 1)))
        stem = file_stem(prompt, seed)
        names = {i: output_dir / f"{stem}-{i:0{width}d}{suffix}" for i in indices}
        taken = [path for path in names.values() if path.exists()] if not overwrite else []
        if taken:
            raise ValueError(f"{taken[0]} already exists ({len(taken)} of the files would be replaced): pass --resume "
                             "to keep them and make the rest (an interrupted job), --overwrite to replace them, or "
                             "use another --output-dir or --seed")
        return OutputPlan(names=names)
    if output is None:
        wanted = default or Path(f"{file_stem(prompt, seed)}{suffix}")
        file = free_name(wanted)
        return OutputPlan(file=file, taken=wanted if file != wanted else None)
    (check_format or image_format)(output)
    if output.exists() and not overwrite:
        raise ValueError(f"{output} already exists: pass --overwrite to replace it, or choose another name")
    return OutputPlan(file=output)


def check_model_kind(model: str, video: bool, source: Path) -> None:
    """Refuse a file whose metadata names a model of the other kind (an image's naming a video model, an mp4's an
    image model): its job could not run on it. A repo id not registered here is known only once downloaded."""
    kind = model_is_video(model)
    if kind is not None and kind != video:
        raise ValueError(f"{source} names {model}, {'a video' if kind else 'an image'} model, but is "
                         f"{'a video' if video else 'an image'}: its metadata is damaged (regenerate with a prompt "
                         "and --model instead)")


def model_is_video(model: str) -> Optional[bool]:
    """Whether ``model`` (a folder, built-in or registered model) makes videos; None when that is not known here."""
    from starflow_mlx.io.model_folder import BUILT_IN, MANIFEST, VIDEO_KINDS, Manifest

    folder = Path(model).expanduser()
    if not folder.is_dir() and model in BUILT_IN:
        folder = BUILT_IN[model]
    if folder.is_dir():
        return (folder / MANIFEST).is_file() and Manifest.load(folder).kind in VIDEO_KINDS
    from starflow_mlx.io.hub import load_registry

    entry = load_registry().get("models", {}).get(model)
    return entry.get("kind") == "text-to-video" if isinstance(entry, dict) else None
