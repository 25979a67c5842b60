"""The parameters of one generation, typed and bounded: what a PNG's metadata may ask ``generate`` to do.

PNG metadata comes from whoever made the file, so it goes through the project's one config
validator (:mod:`starflow_mlx.jsonconfig`): a seed of 2**70, a block size of 1e12, a NaN
threshold or 100000 images are refused with one line instead of crashing or never finishing.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from starflow_mlx.advice import option_error
from starflow_mlx.jsonconfig import ConfigError, JSONConfig
from starflow_mlx.models.kv_cache import KV_BITS

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


@dataclass(kw_only=True)
class SamplingOptions(FromMetadata, JSONConfig):
    """What images and videos share: the prompt, model, noise and sampler settings."""

    prompt: str = field(metadata={"max_len": 10000})
    model: str = field(metadata={"max_len": 4096})
    seed: int = field(metadata={"min": 0, "max": 2**63 - 1})
    cfg: float = field(metadata={"min": 0, "max": 1000})
    aspect_ratio: str = field(metadata={"max_len": 16})
    jacobi: bool
    # Recorded only when Jacobi ran.
    jacobi_block_size: int | None = field(default=None, metadata={"min": 1, "max": 1 << 16})
    jacobi_threshold: float | None = field(default=None, metadata={"min": 1e-12, "max": 1e3})
    jacobi_max_iter: int | None = field(default=None, metadata={"min": 1, "max": 10000})
    dtype: str | None = field(default=None, metadata={"choices": DTYPES})
    kv_bits: int | None = field(default=None, metadata={"choices": (None, *KV_BITS)})

    def _check_index(self, index: int | None, count: int, what: str) -> None:
        if index is not None and index >= count:
            raise ConfigError(f"{self.LABEL}: index {index} is not one of the {count} {what}")


@dataclass(kw_only=True)
class GenerationOptions(SamplingOptions):
    """What a PNG's (or JPEG's, WebP's) metadata may ask ``generate`` to do."""

    LABEL = "generation options"

    num_images: int = field(metadata={"min": 1, "max": MAX_IMAGES})
    index: int | None = field(default=None, metadata={"min": 0, "max": MAX_IMAGES - 1})
    batch_size: int | None = field(default=None, metadata={"min": 1, "max": MAX_IMAGES})
    lora: str | list[str] | None = field(default=None, metadata={"max_len": 4096})  # adapter folder(s) on the model
    lora_scale: float | list[float] = field(default=1.0, metadata={"min": -1000, "max": 1000})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_index(self.index, self.num_images, "images")


@dataclass(kw_only=True)
class VideoOptions(SamplingOptions):
    """What an mp4's metadata may ask ``generate`` to do on a video model."""

    LABEL = "video options"

    num_videos: int = field(metadata={"min": 1, "max": 64})
    frames: int = field(metadata={"min": 1, "max": 2001})
    fps: int = field(metadata={"min": 1, "max": 120})
    image: str | None = field(default=None, metadata={"max_len": 4096})
    video: str | None = field(default=None, metadata={"max_len": 4096})
    image_sha256: str | None = field(default=None, metadata={"max_len": 64})
    video_sha256: str | None = field(default=None, metadata={"max_len": 64})
    index: int | None = field(default=None, metadata={"min": 0, "max": 63})
    lora: str | list[str] | None = field(default=None, metadata={"max_len": 4096})  # adapter folder(s) on the model
    lora_scale: float | list[float] = field(default=1.0, metadata={"min": -1000, "max": 1000})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_index(self.index, self.num_videos, "videos")


def check_jacobi(flags: dict[str, str] | None = None, **options: Any) -> None:
    """Refuse Jacobi settings outside the bounds metadata gets (the Python API and the CLI come here): a
    block size of 1e8 would allocate a cache of that many tokens, NaN would never stop a chunk.
    ``flags`` names a command's options where they are not ``--jacobi-...``."""
    bounds = {f.name: f for f in dataclasses.fields(SamplingOptions)}
    for name, value in options.items():
        kind, lo, hi = bounds[name].type, bounds[name].metadata["min"], bounds[name].metadata["max"]
        whole = kind.split(" | ")[0] == "int"  # "int | None" since unset settings are recorded as null
        number = isinstance(value, numbers.Integral if whole else numbers.Real) and not isinstance(value, bool)
        if not (number and lo <= value <= hi):  # NaN fails the comparison
            raise option_error(ValueError, name, f" must be {'an integer' if whole else 'a number'} from {lo} to {hi}, "
                               f"got {value!r}", (flags or {}).get(name))
