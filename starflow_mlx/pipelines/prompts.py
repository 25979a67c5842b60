"""Text preparation exactly as upstream: templates, aspect-ratio sizes."""

from __future__ import annotations

from starflow_mlx.config import FlowConfig

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")


def prepare_prompt(prompt: str, config: FlowConfig, aspect_ratio: str | None, fps: int = 0) -> str:
    """Apply the templates the model was trained with (fps, noise level, aspect ratio)."""
    text = prompt
    if config.fps_cond:
        text = f"A video with {fps} fps:\n{text}\n" if fps > 0 else f"An image:\n{text}\n"
    if config.cond_noise_level:
        text = f"Noise Level {int(config.noise_std * 1000)}:\n{text}"
    if config.mix_aspect and aspect_ratio is not None:
        text = f"{text}\n in a {aspect_ratio} aspect ratio.\n"
    return text


def nearest_multiple(value: float, base: int) -> int:
    return int(round(value / base)) * base


def latent_size(config: FlowConfig, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) in latent tokens for an aspect ratio, keeping the trained area."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"unknown aspect ratio {aspect_ratio!r}: use one of {', '.join(ASPECT_RATIOS)}")
    rw, rh = map(int, aspect_ratio.split(":"))
    ratio = rw / rh
    factor = max(config.vae_factor, 1)
    pixels = config.latent_size * factor
    multiple = factor * config.patch_size
    h = nearest_multiple((pixels**2 / ratio) ** 0.5, multiple)
    w = nearest_multiple((pixels**2 * ratio) ** 0.5, multiple)
    return h // factor, w // factor
