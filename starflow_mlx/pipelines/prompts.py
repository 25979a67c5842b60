"""Text and size preparation exactly as upstream samples: prompt templates, aspect ratio -> latent size."""

from __future__ import annotations

import math

import numpy as np

from starflow_mlx.config import ConfigError, FlowConfig

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")


def check_prompt(prompt: str) -> None:
    """Refuse a prompt that is not text: a non-string, or bytes that were not UTF-8 (a prompt file in another
    encoding or a terminal's stray bytes reach Python as lone surrogates, which no tokenizer can take)."""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the prompt is not valid UTF-8 text (character {exc.start + 1} of {len(prompt)} is a byte "
                         "of another encoding): give it as UTF-8") from None


def prepare_prompt(prompt: str, config: FlowConfig, aspect_ratio: str | None, fps: int = 0) -> str:
    """Apply the templates the model was trained with: only those its config switches on."""
    text = prompt
    if config.fps_cond:
        text = f"A video with {fps} fps:\n{text}\n" if fps > 0 else f"An image:\n{text}\n"
    if config.cond_noise_level:
        text = f"Noise Level {int(config.noise_std * 1000)}:\n{text}"
    if config.mix_aspect and aspect_ratio is not None:
        text = f"{text}\n in a {aspect_ratio} aspect ratio.\n"
    return text


def class_features(classes: list[str], words: list[str] | None = None) -> np.ndarray:
    """The "text" of every class, then of the empty class (last, for guidance): (classes + 1, L, D) float32.

    Without ``words`` a class is one one-hot row over the classes plus the empty class, like upstream's label
    conditioning. With ``words`` a class name is a short sentence, and each of its words found in ``words`` is a
    one-hot row over them plus an empty word, so classes that share a word share what was learnt from it: "7 moving
    right" and "7 moving up" both teach the model its 7s.
    """
    if not words:
        return np.eye(len(classes) + 1, dtype=np.float32)[:, None, :]
    vocabulary = {word: i for i, word in enumerate(words)}
    rows = [[vocabulary[w] for w in name.split() if w in vocabulary] for name in classes]
    if not rows or any(len(r) != len(rows[0]) or not r for r in rows):
        raise ConfigError("every class name must hold the same number of words from the model's vocabulary")
    eye = np.eye(len(words) + 1, dtype=np.float32)
    return np.stack([eye[r] for r in rows] + [np.repeat(eye[-1:], len(rows[0]), axis=0)])


def check_aspect_ratio(aspect_ratio: str) -> None:
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"unknown aspect ratio {aspect_ratio!r}: use one of {', '.join(ASPECT_RATIOS)}")


def nearest_multiple(value: float, base: int) -> int:
    return int(round(value / base)) * base


def latent_size(config: FlowConfig, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) in latent cells for an aspect ratio, keeping the trained pixel area.

    Upstream honours the ratio only for models trained with mixed aspect ratios and
    samples every other model square; asking such a model for another ratio is an error
    here rather than being ignored.
    """
    check_aspect_ratio(aspect_ratio)
    if not config.mix_aspect:
        if aspect_ratio != "1:1":
            raise ValueError(f"aspect ratio {aspect_ratio}: this model was trained on square images only (use 1:1)")
        return config.latent_size, config.latent_size
    factor = max(config.vae_factor, 1)
    side = config.latent_size * factor
    multiple = factor * config.patch_size
    rw, rh = map(int, aspect_ratio.split(":"))
    ratio = rw / rh
    h = nearest_multiple(math.sqrt(side**2 / ratio), multiple)
    w = nearest_multiple(math.sqrt(side**2 * ratio), multiple)
    return h // factor, w // factor


def nearest_aspect_ratio(config: FlowConfig, width: int, height: int) -> str:
    """The generation aspect ratio closest to an image's shape (always 1:1 for square-only models)."""
    if not config.mix_aspect:
        return "1:1"

    def distance(name: str) -> float:
        rw, rh = map(int, name.split(":"))
        return abs(math.log((rw / rh) / (width / height)))

    return min(ASPECT_RATIOS, key=distance)
