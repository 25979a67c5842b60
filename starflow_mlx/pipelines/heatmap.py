"""Where an input is unlikely: its bits/dim split over the flow's tokens, drawn over the input.

:meth:`STARFlow.log_prob_tokens` splits log p(x) exactly over tokens (one patch of one latent frame).
How the terms are assigned:

* the deep (last) block is autoregressive in its token order, so its log-det plus the Gaussian prior
  of its output at a token is exactly log p(token | tokens before it) in that block's view;
* every shallow block's log-det is counted at the token it transforms, and the prior term
  ``-z²/2 - log(2π)/2`` at the token where ``z`` sits (blocks keep positions, only their order flips).

So the shares add up to the score: ``TokenMap.shares`` holds each token's share of the total bits/dim
(its nats over all dimensions of the input, in bits), and they sum to :meth:`Pipeline.score`'s number.
A token's own bits/dim is its share times the number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from starflow_mlx.pipelines.scoring import is_video_pipeline, prepare

MIN_SIDE = 256  # the drawn input's shorter side, in pixels: 8x8 digits become readable


@dataclass
class TokenMap:
    """Each token's share of the bits/dim: (H/p, W/p) for images, (T, H/p, W/p) for videos."""

    shares: np.ndarray
    bits_per_dim: float  # their sum, as :meth:`Pipeline.score` computes it
    pixels: np.ndarray | None  # the model's input as uint8 (T, H, W, C) when it is pixels, else None


def token_map(pipe, item, prompt: str, fps: int | None = None) -> TokenMap:
    x, y = prepare(pipe, item, prompt, fps)
    nats = np.array(pipe.flow.log_prob_tokens(x, y)[0], dtype=np.float64)
    dims = math.prod(x.shape[1:])
    shares = -nats / (dims * math.log(2))
    if not np.all(np.isfinite(shares)):
        raise ValueError("the model gave a non-finite likelihood (damaged weights, or try dtype float32)")
    pixels = None
    if pipe.manifest.vae is None:
        data = np.array(x[0]) / pipe.manifest.pixel_scale
        pixels = np.clip((data + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        pixels = pixels if is_video_pipeline(pipe) else pixels[None]
    total = float(-np.array(pipe.flow.log_prob(x, y))[0] / (dims * math.log(2)))
    return TokenMap(shares if shares.ndim == 3 else shares[None], total, pixels)


def heat_colors(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """A black-red-yellow-white scale: uint8 RGB, ``high`` (least likely) white."""
    t = np.clip((values - low) / (high - low) if high > low else np.zeros_like(values), 0, 1)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def render(tokens: TokenMap, source: list[Image.Image] | None = None) -> Image.Image:
    """One row per frame: the input (the model's pixels, else ``source``'s frames) beside its heat map.

    All frames share one colour scale, from the map's smallest share (black) to its largest (white).
    """
    frames, th, tw = tokens.shares.shape
    cell = max(1, math.ceil(MIN_SIDE / min(th, tw)))
    width, height = tw * cell, th * cell
    low, high = float(tokens.shares.min()), float(tokens.shares.max())
    canvas = Image.new("RGB", (2 * width + 4, frames * (height + 4) - 4), (128, 128, 128))
    for t in range(frames):
        heat = Image.fromarray(heat_colors(tokens.shares[t], low, high)).resize((width, height), Image.NEAREST)
        if tokens.pixels is not None:
            frame = tokens.pixels[t]
            shown = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).convert("RGB")
            shown = shown.resize((width, height), Image.NEAREST)
        elif source is not None:
            shown = source[min(t * len(source) // frames, len(source) - 1)].convert("RGB").resize((width, height),
                                                                                                   Image.BICUBIC)
        else:
            shown = Image.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(shown, (0, t * (height + 4)))
        canvas.paste(heat, (width + 4, t * (height + 4)))
    return canvas
