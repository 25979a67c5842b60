"""The parameters of one generation, typed and bounded: what a PNG's metadata may ask ``generate`` to do.

PNG metadata comes from whoever made the file, so it goes through the project's one config
validator (:mod:`starflow_mlx.jsonconfig`): a seed of 2**70, a block size of 1e12, a NaN
threshold or 100000 images are refused with one line instead of crashing or never finishing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from starflow_mlx.jsonconfig import ConfigError, JSONConfig

MAX_IMAGES = 2**40  # a folder job can be this large (batched); one image of it is made again from its index
DTYPES = (None, "float32", "float16", "bfloat16")


class FromMetadata:
    """Typed options from a file's metadata, as a plain dict; keys added by later versions are ignored."""

    @classmethod
    def from_metadata(cls, meta: Any, where: str) -> dict[str, Any]:
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if k in {f.name for f in dataclasses.fields(cls)}}
        try:
            return dataclasses.asdict(cls.from_dict(meta, where))
        except ConfigError as exc:  # the cross-field check names the label, not the file
            raise ConfigError(str(exc).replace(cls.LABEL, where, 1)) from None


@dataclass
class GenerationOptions(FromMetadata, JSONConfig):
    LABEL = "generation options"

    prompt: str = field(metadata={"max_len": 10000})
    model: str = field(metadata={"max_len": 4096})
    seed: int = field(metadata={"min": 0, "max": 2**63 - 1})
    cfg: float = field(metadata={"min": 0, "max": 1000})
    aspect_ratio: str = field(metadata={"max_len": 16})
    num_images: int = field(metadata={"min": 1, "max": MAX_IMAGES})
    jacobi: bool
    jacobi_block_size: int = field(metadata={"min": 1, "max": 1 << 16})
    jacobi_threshold: float = field(metadata={"min": 1e-12, "max": 1e3})
    jacobi_max_iter: int = field(metadata={"min": 1, "max": 10000})
    dtype: str | None = field(default=None, metadata={"choices": DTYPES})
    index: int | None = field(default=None, metadata={"min": 0, "max": MAX_IMAGES - 1})
    batch_size: int | None = field(default=None, metadata={"min": 1, "max": MAX_IMAGES})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.index is not None and self.index >= self.num_images:
            raise ConfigError(f"{self.LABEL}: index {self.index} is not one of the {self.num_images} images")


@dataclass
class VideoOptions(FromMetadata, JSONConfig):
    """What an mp4's metadata may ask ``generate`` to do on a video model."""

    LABEL = "video options"

    prompt: str = field(metadata={"max_len": 10000})
    model: str = field(metadata={"max_len": 4096})
    seed: int = field(metadata={"min": 0, "max": 2**63 - 1})
    cfg: float = field(metadata={"min": 0, "max": 1000})
    aspect_ratio: str = field(metadata={"max_len": 16})
    num_videos: int = field(metadata={"min": 1, "max": 64})
    frames: int = field(metadata={"min": 1, "max": 2001})
    fps: int = field(metadata={"min": 1, "max": 120})
    jacobi: bool
    jacobi_block_size: int = field(metadata={"min": 1, "max": 1 << 16})
    jacobi_threshold: float = field(metadata={"min": 1e-12, "max": 1e3})
    jacobi_max_iter: int = field(metadata={"min": 1, "max": 10000})
    image: str | None = field(default=None, metadata={"max_len": 4096})
    video: str | None = field(default=None, metadata={"max_len": 4096})
    dtype: str | None = field(default=None, metadata={"choices": DTYPES})
    index: int | None = field(default=None, metadata={"min": 0, "max": 63})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.index is not None and self.index >= self.num_videos:
            raise ConfigError(f"{self.LABEL}: index {self.index} is not one of the {self.num_videos} videos")
