"""A complete model folder: the flow plus what turns prompts into features and latents into pixels.

Layout::

    MODEL/config.json, MODEL/model.safetensors   the flow (what ``load_flow`` reads)
    MODEL/text_encoder/                           T5 encoder + tokenizer/ (text models)
    MODEL/vae/                                    SD-VAE (latent models)
    MODEL/starflow.json                           this manifest

A flow-only folder (just the first two files) is valid for ``load_flow``; the
pipeline needs the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from starflow_mlx.advice import with_cli_message
from starflow_mlx.jsonconfig import ConfigError, JSONConfig, read_json, write_json

MANIFEST = "starflow.json"
KINDS = ("text-to-image", "class-to-image", "text-to-video", "class-to-video")
VIDEO_KINDS = ("text-to-video", "class-to-video")
CLASS_KINDS = ("class-to-image", "class-to-video")
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
# Models that ship in the package, by the name --model takes: the digits image model and the moving-digits video model.
BUILT_IN = {"demo": DEMO_DIR, "demo-video": DEMO_DIR.with_name("demo_video")}


@dataclass
class Manifest(JSONConfig):
    LABEL = "model manifest"

    kind: str
    text_encoder: str | None = None  # sub-folder, for text models
    vae: str | None = None  # sub-folder; None means the flow works in pixel space
    classes: list[str] = field(default_factory=list, metadata={"max_len": 1 << 16})  # class names; index len(classes) is the empty class
    prompt_help: str | None = field(default=None, metadata={"max_len": 500})  # class models: what a prompt looks like
    words: list[str] = field(default_factory=list, metadata={"max_len": 1024})  # class models: the label's vocabulary (prompts.class_features)
    pixel_scale: float = field(default=1.0, metadata={"min": 1e-3, "max": 1e3})  # pixel-space models: data = pixels in [-1, 1] times this
    source: dict[str, Any] = field(default_factory=dict)  # where each part came from (repo ids, files)
    format: int = 1

    def __post_init__(self):
        super().__post_init__()
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"{MANIFEST} lists a class twice: class names must be unique")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown model kind {self.kind!r} in {MANIFEST}: expected one of {', '.join(KINDS)}")

    def save(self, folder: str | Path) -> None:
        write_json(Path(folder, MANIFEST), asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder, MANIFEST)
        if not path.is_file():
            message = f"{folder} has no {MANIFEST}: build a full model folder with starflow convert "
            raise with_cli_message(ConfigError(message + "(with a text encoder and a VAE), or use the built-in 'demo' or 'demo-video'"),
                                   message + "--text-encoder/--vae, or use --model demo or demo-video")
        data = read_json(path, "model manifest")
        if isinstance(data, dict):  # fields added by later versions are ignored, not refused
            data = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        return cls.from_dict(data, str(path))


def model_record(name: str | Path) -> str:
    """How a file's metadata names a model or adapter: a local folder by its absolute path (so that
    ``--from-metadata`` works from any folder), a built-in name or Hugging Face repo id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)


def local_model(name: str | Path) -> Path | None:
    """The folder of a local path or a built-in model name; None for anything else (a repo id, a typo)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if str(name) in BUILT_IN:
        folder = BUILT_IN[str(name)]
        if not (folder / "config.json").is_file():
            raise ConfigError(f"the built-in {name} model is missing from this install: reinstall starflow-mlx")
        return folder
    return None
