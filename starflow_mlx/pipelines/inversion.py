"""What only an invertible model can do: an image or clip to its noise and back, edits, inpainting.

* :func:`invert` maps an input to the noise ``z`` that sampling (with the same prompt and
  guidance weight) maps back to it: the flow's forward pass, guided as sampling guides
  (:mod:`starflow_mlx.sampling.inversion`). The input is the flow's data: VAE latents (the
  posterior mean) for latent models, pixels for pixel-space ones, prepared as ``score`` prepares it.
* :func:`from_noise` is the way back. It samples sequentially by default, which solves every
  token exactly (Jacobi stops at a residual threshold), and it skips the denoising step: the
  inverted input is clean data, so the round trip gives it back to float32 rounding.
* :func:`edit` decodes the inverted noise under another prompt, ``strength`` of fresh noise mixed
  in (``z' = sqrt(1 - s^2) z + s eps``: 0 keeps the structure, 1 is a fresh sample), then
  denoises as generation does. For a clip this is video-to-video: the motion lives in the noise.
* :func:`inpaint` regenerates the masked part (white = regenerate) and keeps the rest exactly,
  pixel for pixel. ``method="replace"``: every block is inverted token by token with the known
  tokens held at their values in the filled-in input; ``method="resample"``: the known part's
  noise comes from inverting the filled-in input, the hole's is fresh, plain sampling, known pixels
  pasted back. Each of ``rounds`` re-encodes the last result, so both see the hole's new content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from starflow_mlx.advice import option_error
from starflow_mlx.sampling import inversion as flow_inversion
from starflow_mlx.sampling.denoise import score_denoise

METHODS = ("replace", "resample")
DEFAULT_ROUNDS = {"replace": 3, "resample": 4}  # benchmarks/README.md: 3 rounds of replace win on clips
MAX_ROUNDS = 100


@dataclass
class Inversion:
    """An input's noise, the flow data it came from, and what it was inverted under."""

    noise: mx.array  # (1, h, w, c) or (1, T, h, w, c)
    # The flow's input: latents for latent models, scaled pixels for pixel-space ones (None when read from a
    # noise file, which keeps only latents).
    data: mx.array | None
    prompt: str
    cfg: float
    aspect_ratio: str
    fps: int = 0  # video: the frame rate the clip was read at (0 for images)


def guidance(pipe, cfg: float | None) -> float:
    """The guidance weight to use: ``cfg``, or the model's own."""
    cfg = (pipe.default_cfg if pipe.VIDEO else pipe.config.cfg) if cfg is None else cfg
    if not 0 <= cfg < math.inf:
        raise ValueError(f"cfg must be a number 0 or more, got {cfg}")
    return float(cfg)


def prepare(pipe, source, fps: int | None = None) -> tuple[mx.array, str, int]:
    """(flow data (1, ...), aspect ratio, fps) of an image (path or PIL) or a clip (path or uint8 frames)."""
    if pipe.VIDEO:
        from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

        pipe._reload()  # a long video's decode may have released the flow
        fps = fps or VIDEO_DEFAULTS["fps"]
        if isinstance(source, (str, Path)):
            from starflow_mlx.pipelines.video_io import read_video

            source = read_video(source, fps=fps)[0]
        x, ratio, usable = pipe.clip_input(np.asarray(source))
        return x, ratio, fps if usable > 1 else 0
    if fps is not None:
        raise ValueError("fps is for video models")
    if not isinstance(source, Image.Image):
        from starflow_mlx.io.image_input import open_image

        source = open_image(source)
    x, ratio = pipe.to_model_input(source)
    return x, ratio, 0


def invert(pipe, source, prompt: str, cfg: float | None = None, fps: int | None = None) -> Inversion:
    """The noise that sampling ``prompt`` with guidance ``cfg`` (None: the model's) maps back to ``source``."""
    cfg = guidance(pipe, cfg)
    x, ratio, fps = prepare(pipe, source, fps)
    y, y_u = pipe.conditioning(prompt, 1, ratio, fps)
    z = flow_inversion.encode(pipe.flow, x, y, y_u, cfg)
    mx.eval(z)
    return Inversion(z, x, prompt, cfg, ratio, fps)


def _sampler(jacobi: bool | None, pipe) -> bool:
    return bool(jacobi) and pipe.config.sos


def _reverse(pipe, z: mx.array, prompt: str, cfg: float, ratio: str, fps: int, jacobi: bool | None,
             progress=None) -> tuple[mx.array, mx.array]:
    """Noise -> flow data under ``prompt``; also the prompt's features (for denoising)."""
    y, y_u = pipe.conditioning(prompt, z.shape[0], ratio, fps)
    x = pipe.flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=_sampler(jacobi, pipe), progress=progress)
    return x, y


def denoise(pipe, x: mx.array, y: mx.array, progress=None) -> mx.array:
    """The cleanup generation applies to the flow's (noisy) samples (a clip's reports to ``progress``)."""
    if pipe.VIDEO:
        return pipe.denoise(x, y, progress or (lambda *a, **k: None))
    if pipe.has_finetuned_decoder:
        return x
    x = score_denoise(pipe.flow, x, y, pipe.config.noise_std)
    mx.eval(x)
    return x


def to_output(pipe, x: mx.array, progress=None):
    """Flow data -> what ``generate`` returns: a PIL image, or uint8 frames (T, H, W, 3) (a clip's decode reports to
    ``progress``)."""
    from starflow_mlx.pipelines.settings import check_finite

    check_finite(x)
    if pipe.VIDEO:
        return np.concatenate(list(pipe.decode_frames(x, progress)), axis=1)[0]
    return pipe.decode(x)[0]


def from_noise(pipe, inversion: Inversion, prompt: str | None = None, cfg: float | None = None,
               jacobi: bool | None = False, progress=None):
    """Noise back to an image (or frames); under its own prompt this gives the inverted input back.

    ``cfg`` must be the one the noise was inverted with (None: that one).
    """
    if cfg is not None and cfg != inversion.cfg:
        raise ValueError(f"the noise was inverted with cfg {inversion.cfg:g}: decoding it with cfg {cfg:g} does "
                         "not give the input back (use edit to change the image)")
    prompt = inversion.prompt if prompt is None else prompt
    if pipe.VIDEO:
        pipe._reload()
        pipe.check_memory(inversion.noise.shape[1], 1, inversion.aspect_ratio)
    x, _ = _reverse(pipe, inversion.noise, prompt, inversion.cfg, inversion.aspect_ratio, inversion.fps, jacobi,
                    progress)
    return to_output(pipe, x)


def mix_noise(z: mx.array, strength: float, seed: int) -> mx.array:
    """``sqrt(1 - s^2) z + s eps``: keeps unit variance for Gaussian ``z``; eps drawn from ``seed``."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be from 0 to 1, got {strength}")
    if strength == 0:
        return z
    eps = mx.random.normal(z.shape, key=mx.random.key(seed))
    return math.sqrt(1 - strength**2) * z + strength * eps


def edit(pipe, source, source_prompt: str, prompt: str, *, strength: float = 0.0, seed: int = 0,
         cfg: float | None = None, fps: int | None = None, jacobi: bool | None = False, progress=None):
    """``source`` (described by ``source_prompt``) remade as ``prompt``: an image, or frames (T, H, W, 3)."""
    from starflow_mlx.pipelines.settings import check_options

    cfg = guidance(pipe, cfg)
    check_options(seed, cfg, 1, 1, 1.0, 1)
    inverted = invert(pipe, source, source_prompt, cfg, fps)
    z = mix_noise(inverted.noise, strength, seed)
    x, y = _reverse(pipe, z, prompt, cfg, inverted.aspect_ratio, inverted.fps, jacobi, progress)
    return to_output(pipe, denoise(pipe, x, y, progress), progress)


# -- inpainting ---------------------------------------------------------------------------------
def hole_pixels(mask, size: tuple[int, int], frames: int = 0, mask_frames: list[int] | None = None) -> np.ndarray:
    """A mask image (white = regenerate) -> bool hole (H, W), or (T, H, W) for ``frames`` frames.

    ``mask_frames``: the frames the mask applies to (None: all); the others are kept whole.
    """
    if not isinstance(mask, Image.Image):
        from starflow_mlx.io.image_input import open_image

        mask = open_image(mask, "mask")
    if mask.size != size:
        raise ValueError(f"the mask is {mask.width}x{mask.height} but the input is {size[0]}x{size[1]}: "
                         "give a mask of the input's size")
    alpha = mask.getchannel("A") if "A" in mask.getbands() else None
    hole = np.asarray(mask.convert("L")) >= 128
    if alpha is not None and np.asarray(alpha).min() < 255:
        hole &= np.asarray(alpha) >= 128  # transparent pixels are not white
    if frames:
        chosen = range(frames) if mask_frames is None else mask_frames
        bad = [t for t in chosen if not 0 <= t < frames]
        if bad:
            raise ValueError(f"mask frame {bad[0]} is not among the clip's {frames} frames (0 to {frames - 1})")
        hole = np.stack([hole if t in chosen else np.zeros_like(hole) for t in range(frames)])
    return _check_hole(hole)


def _check_hole(hole: np.ndarray) -> np.ndarray:
    if not hole.any():
        raise ValueError("the mask has no white pixels: nothing to regenerate (white marks the part to redo)")
    if hole.all():
        raise ValueError("the mask is all white: nothing would be kept; use generate for a new image")
    return hole


def is_mask_clip(mask) -> bool:
    """Whether ``mask`` gives every frame its own mask: an .mp4 path, or an array of frames (T, H, W[, 1 or 3])."""
    if isinstance(mask, (str, Path)):
        return Path(mask).suffix.lower() == ".mp4"
    return isinstance(mask, np.ndarray)


def hole_frames(mask, size: tuple[int, int], frames: int, fps: int | None = None) -> np.ndarray:
    """A mask clip (white = regenerate), one frame per input frame -> bool hole (T, H, W) (not yet checked to
    leave something to keep and something to redo: that is for the frames the clip is trimmed to).

    ``mask`` is an .mp4 (read at ``fps``, as the input is) or an array (T, H, W[, 1 or 3]), bool or uint8.
    Grey levels are cut at mid-grey (128): H.264 blurs a mask's edges and shifts its flat levels a little.
    """
    rate = ""
    if isinstance(mask, (str, Path)):
        from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS
        from starflow_mlx.pipelines.video_io import read_video

        # One frame past the input's tells a longer mask clip: the rest is never decoded (memory, for an upload).
        mask, fps = read_video(mask, fps=fps or VIDEO_DEFAULTS["fps"], frames=frames + 1)
        rate = f" (both read at {fps:g} fps)"
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[-1] in (1, 3):
        rgb = mask.shape[-1] == 3 and mask.dtype == np.uint8  # luma, as an image mask is read
        mask = np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in mask]) if rgb else mask[..., 0]
    if mask.ndim != 3 or mask.dtype not in (np.bool_, np.uint8):
        raise ValueError(f"a mask clip is bool or uint8 frames (T, H, W) or (T, H, W, 3), got {mask.dtype} "
                         f"{mask.shape}")
    if mask.shape[2:0:-1] != size:
        raise ValueError(f"the mask clip's frames are {mask.shape[2]}x{mask.shape[1]} but the input's are "
                         f"{size[0]}x{size[1]}: give mask frames of the input's size")
    if len(mask) != frames:
        count = f"more than the input's {frames} frames" if len(mask) > frames else \
            f"{len(mask)} frames but the input has {frames}"
        raise ValueError(f"the mask clip has {count}{rate}: give one mask frame per input frame")
    return mask if mask.dtype == np.bool_ else mask >= 128


def clip_hole(mask, size: tuple[int, int], given: int, used: int, fps: int | None = None,
              mask_frames: list[int] | None = None) -> np.ndarray:
    """The checked hole (T, H, W) of the ``used`` first frames of a clip read as ``given`` frames of ``size``: from a
    mask clip (:func:`hole_frames`) or a mask image for every frame, or for ``mask_frames`` (:func:`hole_pixels`)."""
    if not is_mask_clip(mask):
        return hole_pixels(mask, size, used, mask_frames)
    if mask_frames is not None:
        raise option_error(ValueError, "mask_frames", " is for a mask image: a mask clip gives every frame its "
                           "own mask already")
    return _check_hole(hole_frames(mask, size, given, fps)[:used])


def _data_hole(pipe, hole: np.ndarray, data_shape: tuple[int, ...]) -> mx.array:
    """A pixel hole -> the flow data's (True where any pixel it covers is in the hole), data-shaped."""
    h, w = data_shape[-3], data_shape[-2]

    def shrink(frame: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(frame.astype(np.uint8) * 255).resize((w, h), Image.BOX)) > 0

    if hole.ndim == 2:
        grid = shrink(hole)
    else:
        frames = [shrink(f) for f in hole]
        f = pipe.vae.temporal_factor  # latent frame k > 0 holds pixel frames f(k-1)+1 .. fk
        grid = np.stack([frames[0]] + [np.any(frames[f * (k - 1) + 1: f * k + 1], axis=0)
                                       for k in range(1, data_shape[1])])
    return mx.broadcast_to(mx.array(grid)[None, ..., None], data_shape)


def _composite(known: mx.array, fill: mx.array, hole: mx.array) -> mx.array:
    return mx.where(hole, fill, known)


def inpaint(pipe, source, mask, prompt: str, *, method: str = "replace", rounds: int | None = None,
            seed: int = 0, cfg: float | None = None, fps: int | None = None, mask_frames: list[int] | None = None,
            jacobi: bool | None = False, progress=None):
    """Regenerate the white part of ``mask`` under ``prompt``; every other pixel of ``source`` is kept.

    For a clip, ``mask`` is an image applied to every frame (or to ``mask_frames``), or a mask clip with one frame
    per input frame: an .mp4 path or an array (T, H, W[, 3]) (:func:`hole_frames`).

    Returns an image of ``source``'s size, or uint8 frames (T, H, W, 3) for a clip.
    """
    from starflow_mlx.pipelines.settings import check_options

    if method not in METHODS:
        raise ValueError(f"method must be {' or '.join(METHODS)}, got {method!r}")
    rounds = DEFAULT_ROUNDS[method] if rounds is None else rounds
    if not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be a whole number from 1 to {MAX_ROUNDS}, got {rounds!r}")
    cfg = guidance(pipe, cfg)
    check_options(seed, cfg, 1, 1, 1.0, 1)
    pixels, given_frames = _source_pixels(pipe, source, fps)
    height, width = pixels.shape[1:3] if pipe.VIDEO else pixels.shape[:2]
    if pipe.VIDEO:
        hole = clip_hole(mask, (width, height), given_frames, len(pixels), fps, mask_frames)
    else:
        hole = hole_pixels(mask, (width, height), 0, mask_frames)
    known_x, ratio, fps = prepare(pipe, pixels if pipe.VIDEO else Image.fromarray(pixels), fps)
    data_hole = _data_hole(pipe, hole, known_x.shape)
    y, y_u = pipe.conditioning(prompt, 1, ratio, fps)
    noise = mx.random.normal(known_x.shape, key=mx.random.key(seed))
    x = inpaint_data(pipe.flow, known_x, data_hole, noise, y, y_u, cfg, method, rounds, _sampler(jacobi, pipe),
                     progress)
    made = to_output(pipe, denoise(pipe, x, y, progress), progress)
    return _paste(pixels, made, hole, pipe.VIDEO)


def inpaint_data(flow, known: mx.array, hole: mx.array, noise: mx.array, y, y_uncond, cfg: float,
                 method: str = "replace", rounds: int = 1, jacobi: bool = False, progress=None) -> mx.array:
    """Inpainting on the flow's data (batched): ``known`` data, ``hole`` (bool, data-shaped: True = regenerate),
    ``noise`` for the hole. Returns the flow's sample (not denoised, known part not yet pasted back).

    ``progress(label, done, total)`` hears every round's blocks as sampling reports them (each its own stage:
    ``block 2 (deep), round 1/3``), so ``rounds`` times the model's blocks in all."""
    tokens_known = flow_inversion.token_mask(flow, mx.logical_not(hole))
    x = _composite(known, mx.zeros_like(known), hole)  # mid-grey (zero latents) in the hole to start
    for r in range(rounds):
        filled = _composite(known, x, hole)
        report = _round_progress(progress, r, rounds)
        if method == "replace":
            _, inputs = flow_inversion.encode_blocks(flow, filled, y, y_uncond, cfg)
            x = flow_inversion.reverse_known(flow, noise, inputs, tokens_known, y, y_uncond, cfg, report)
        else:
            z = flow_inversion.encode(flow, filled, y, y_uncond, cfg)
            z = mx.where(flow._unpatchify(tokens_known), z, noise)
            x = flow.reverse(z, y, y_uncond=y_uncond, cfg=cfg, jacobi=jacobi, progress=report)
        mx.eval(x)
    return x


def _round_progress(progress, r: int, rounds: int):
    """``progress`` with the round in each stage's name: a later round's blocks are stages of their own, not the
    first round's run again."""
    if progress is None or rounds == 1:
        return progress
    return lambda label, done, total, **info: progress(f"{label}, round {r + 1}/{rounds}", done, total, **info)


def _source_pixels(pipe, source, fps: int | None) -> tuple[np.ndarray, int]:
    """The input as uint8 pixels: (H, W) or (H, W, 3) for an image, (T, H, W, 3) for a clip (1 + 4k frames);
    and how many frames it had (0 for an image)."""
    if pipe.VIDEO:
        from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

        if isinstance(source, (str, Path)):
            from starflow_mlx.pipelines.video_io import read_video

            source = read_video(source, fps=fps or VIDEO_DEFAULTS["fps"])[0]
        frames = np.asarray(source)
        f = pipe.vae.temporal_factor
        return frames[: 1 + f * ((len(frames) - 1) // f)], len(frames)
    if not isinstance(source, Image.Image):
        from starflow_mlx.io.image_input import open_image

        source = open_image(source)
    return np.asarray(source.convert("L" if pipe.config.in_channels == 1 else "RGB")), 0


def _paste(pixels: np.ndarray, made, hole: np.ndarray, video: bool):
    """The generated pixels inside the hole, the source's everywhere else, at the source's size."""
    height, width = hole.shape[-2:]
    if video:
        frames = np.stack([_resized(f, width, height) for f in made])
        return np.where(hole[..., None], frames, pixels)
    mode = "L" if pixels.ndim == 2 else "RGB"
    generated = np.asarray(_resized(np.asarray(made.convert(mode)), width, height))
    return Image.fromarray(np.where(hole if pixels.ndim == 2 else hole[..., None], generated, pixels))


def _resized(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))
