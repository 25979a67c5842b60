"""The parameters of one edit or inpainting, typed and bounded: what an edited file's metadata may ask
``starflow edit --from-metadata`` to redo (files come from anyone; see :mod:`starflow_mlx.io.generation_options`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from starflow_mlx.io.generation_options import FromMetadata
from starflow_mlx.jsonconfig import JSONConfig

OPERATIONS = ("edit", "inpaint")


@dataclass(kw_only=True)
class EditOptions(FromMetadata, JSONConfig):
    LABEL = "edit options"

    operation: str = field(metadata={"choices": OPERATIONS})
    model: str = field(metadata={"max_len": 4096})
    source: str = field(metadata={"max_len": 4096})
    source_sha256: str = field(metadata={"max_len": 64})
    mask: str | None = field(default=None, metadata={"max_len": 4096})
    mask_sha256: str | None = field(default=None, metadata={"max_len": 64})
    source_prompt: str | None = field(default=None, metadata={"max_len": 10000})
    prompt: str = field(metadata={"max_len": 10000})
    strength: float = field(default=0.0, metadata={"min": 0, "max": 1})
    seed: int = field(metadata={"min": 0, "max": 2**63 - 1})
    cfg: float = field(metadata={"min": 0, "max": 1000})
    method: str | None = field(default=None, metadata={"choices": (None, "replace", "resample")})
    rounds: int | None = field(default=None, metadata={"min": 1, "max": 100})
    mask_frames: list[int] | None = field(default=None, metadata={"max_len": 10000})
    fps: int | None = field(default=None, metadata={"min": 1, "max": 120})
    jacobi: bool = False
