"""The pipeline for a model, image or video, picked from its manifest: the one place that knows both kinds."""

from __future__ import annotations

from pathlib import Path

from starflow_mlx.io.model_folder import VIDEO_KINDS, Manifest
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.pipelines.video import VideoPipeline
from starflow_mlx.io.resolve import resolve_model


def load_pipeline(name: str | Path, dtype: str | None = None, lora: str | Path | list | None = None,
                  lora_scale: float | list[float] = 1.0, layers: range | None = None) -> Pipeline:
    """``Pipeline.from_pretrained`` for an image model, ``VideoPipeline.from_pretrained`` for a video model."""
    folder = resolve_model(name)
    if Manifest.load(folder).kind in VIDEO_KINDS:
        return VideoPipeline.from_pretrained(folder, dtype=dtype, lora=lora, lora_scale=lora_scale, layers=layers)
    return Pipeline.from_pretrained(folder, dtype=dtype, lora=lora, lora_scale=lora_scale, layers=layers)
