"""Prompt (and optionally an image or a clip) in, video frames out: STARFlow-V in MLX.

The spine is the image pipeline's (text features, noise, flow sampling, denoising,
decoding); what differs for video lives here:

- sizes: ``frames`` must be 1 + 4k (the Wan2.2 VAE's causal 4x time compression);
  other counts are rounded up, with a warning (pixel-space models, which have no VAE,
  take any count);
- the prompt template carries the frame rate (``A video with 16 fps:``);
- conditioning frames (an image, or a clip to continue) are encoded, noised with the
  training noise, and fed to the flow's deep block as context; the output starts with
  them as given (their clean latents replace the sampled ones after denoising, so a
  pixel-space model returns them exactly and a latent one as its VAE reconstructs them);
- the learnable denoiser runs in overlapping chunks of the training length;
- flow latents are "temporally scaled": latent frames after the first are multiplied
  by ``vae_temporal_scale`` (0.6) in flow space, undone before the VAE decode.

Defaults are those of upstream's video script (cfg 3.5, Jacobi block 32 and threshold
0.001, 81 frames at 16 fps, 16:9), not ``sample.py``'s overriding CLI defaults. The
frame count defaults to the model's training length (81 for STARFlow-V); class models
trained here (``class-to-video``, the built-in moving digits) keep their own guidance
weight, and square-only models generate 1:1.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from PIL import Image

from starflow_mlx.advice import option_error, with_cli_message
from starflow_mlx.io.image_input import open_image
from starflow_mlx.io.loading import load_flow
from starflow_mlx.io.memory import InsufficientMemoryError, memory_limit, weight_bytes
from starflow_mlx.models.kv_cache import check_kv_bits, kv_bytes_per_value
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS, check_finite, check_options
from starflow_mlx.pipelines.prompts import ASPECT_RATIOS, latent_size, nearest_aspect_ratio
from starflow_mlx.io.pixel_video import PixelVideo
from starflow_mlx.sampling.auto import JACOBI_SETTINGS, jacobi_settings
from starflow_mlx.sampling.denoise import learnable_denoise, score_denoise

MAX_FRAMES = 2001  # ~2 minutes at 16 fps: far beyond what the model was trained for
# The streamed VAE decode's working set beyond its weights, per output pixel of a frame (or of a tile):
# measured by benchmarks/wan_vae.py on MLX's CPU backend at the real widths (0.39 GB at 2,048 pixels,
# 1.17 GB at 7,168); it grows with the area, which --vae-tile bounds.
VAE_BYTES_PER_PIXEL = 152_000
MEMORY_COMFORT = 0.75  # above this share of RAM, the flow is released before the VAE decode


def kv_cache_bytes(config, latent_frames: int, frame_tokens: int, count: int, itemsize: int,
                   bits: int | None = None) -> int:
    """The deep block's KV cache for ``latent_frames`` frames and the text, guidance doubling the batch.

    ``bits`` (8, 4): a quantized cache, its scales and biases included.
    """
    deep = config.num_blocks - 1
    tokens = latent_frames * frame_tokens + config.txt_size
    per_token = config.layers_per_block[deep] * 2 * config.block_kv_heads(deep) * config.head_dim
    return int(2 * count * tokens * per_token * kv_bytes_per_value(bits, itemsize, config.head_dim))


def frame_count(frames: int, temporal_factor: int = 4) -> int:
    """``frames`` rounded up to 1 + 4k (what the VAE can produce), with a warning when it changes.

    ``temporal_factor`` is the codec's pixel frames per latent frame after the first (1: any count)."""
    if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= MAX_FRAMES:
        raise option_error(ValueError, "frames", f" must be a whole number from 1 to {MAX_FRAMES}, got {frames!r}")
    f = temporal_factor
    rounded = 1 + f * math.ceil((frames - 1) / f)
    if rounded != frames:
        warnings.warn(f"{frames} frames is not 1 + {f}k: generating {rounded} (the VAE decodes 1 frame, then {f} per "
                      "latent)", stacklevel=3)
    return rounded


def cover_crop(image: Image.Image, height: int, width: int, resample=Image.BILINEAR) -> tuple[np.ndarray, bool]:
    """RGB ``image`` resized to cover (height, width) and centre-cropped: float32 [-1, 1] and whether it changed.

    Sides are rounded up, never truncated, so the crop never pads a row or column.
    """
    rgb = image.convert("RGB")
    changed = rgb.size != (width, height)
    if changed:
        scale = max(height / rgb.height, width / rgb.width)
        size = (max(width, math.ceil(rgb.width * scale - 1e-6)), max(height, math.ceil(rgb.height * scale - 1e-6)))
        rgb = rgb.resize(size, resample)
        left, top = int(round((size[0] - width) / 2.0)), int(round((size[1] - height) / 2.0))
        rgb = rgb.crop((left, top, left + width, top + height))
    return np.asarray(rgb, np.float32) / 127.5 - 1.0, changed


def clip_pixels(frames: np.ndarray, height: int, width: int, temporal_factor: int = 4,
                resample=Image.BILINEAR) -> tuple[np.ndarray, int, bool]:
    """A uint8 clip (T, H, W, 3) as the codec takes it: trimmed to 1 + 4k frames (``temporal_factor`` k),
    each frame covered and cropped.

    Returns the float32 frames in [-1, 1], how many source frames were kept, and whether they were resized.
    """
    usable = 1 + temporal_factor * ((len(frames) - 1) // temporal_factor)
    converted = [cover_crop(Image.fromarray(np.asarray(f, np.uint8)), height, width, resample)
                 for f in frames[:usable]]
    return np.stack([c[0] for c in converted]), usable, converted[0][1]


def to_uint8(frames: mx.array) -> np.ndarray:
    """Frames in [-1, 1] (clamped) as uint8."""
    return np.array(mx.clip((frames.astype(mx.float32) + 1.0) * 127.5, 0, 255).round().astype(mx.uint8))


def is_pixel_space(manifest, config) -> bool:
    """A model trained on pixels (no VAE named, no spatial factor), like the built-in moving digits."""
    return manifest.vae is None and config.vae_factor == 1


class VideoPipeline(Pipeline):
    """``VideoPipeline.from_pretrained(folder)``, then ``generate(prompt, frames=81, image=..., video=...)``."""

    VIDEO = True
    dtype: str | None = None  # what the flow was cast to, to reload it the same way after a release

    def __init__(self, folder: Path, flow, manifest, text_encoder=None, vae=None):
        if is_pixel_space(manifest, flow.config):  # frames are its data
            vae = PixelVideo(flow.config.in_channels, manifest.pixel_scale)
        missing = "text encoder" if text_encoder is None and manifest.kind == "text-to-video" else (
            "video VAE" if vae is None else None)
        if missing:
            raise ValueError(f"{folder} lacks its {missing}: rebuild it with starflow convert --text-encoder "
                             "google/flan-t5-xl --vae Wan-AI/Wan2.2-TI2V-5B")
        super().__init__(folder, flow, manifest, text_encoder, vae)

    @classmethod
    def from_pretrained(cls, name: str | Path, dtype: str | None = None, lora: str | Path | list | None = None,
                        lora_scale: float | list[float] = 1.0, layers: range | None = None) -> "VideoPipeline":
        """As :meth:`Pipeline.from_pretrained`, LoRA adapters (one or several) included."""
        pipe = super().from_pretrained(name, dtype=dtype, lora=lora, lora_scale=lora_scale, layers=layers)
        pipe.dtype = dtype
        return pipe

    @classmethod
    def load_vae(cls, path: Path, dtype: str | None):
        """The Wan2.2 VAE keeps its own precision whatever ``dtype`` the flow is cast to."""
        from starflow_mlx.io.video_vae import load_video_vae

        return load_video_vae(path)

    # -- sizes and memory ---------------------------------------------------------------
    @property
    def temporal_scale(self) -> float:
        return self.config.vae_temporal_scale or 1.0

    @property
    def training_latent_frames(self) -> int:
        return self.config.local_attn_window or self.config.num_frames or 1

    @property
    def pixel_space(self) -> bool:
        return is_pixel_space(self.manifest, self.config)

    @property
    def resample(self):
        """How input frames are resized: block averages undo the enlargement of pixel-space output exactly."""
        return Image.BOX if self.pixel_space else Image.BILINEAR

    def exact_reduction(self, width: int, height: int, canvas: tuple[int, int]) -> bool:
        """Whether a width x height frame reaches the (height, width) ``canvas`` without loss: a pixel-space model's
        own frames are the canvas enlarged a whole number of times, which block averages undo exactly."""
        h, w = canvas
        return self.pixel_space and width % w == 0 and height % h == 0 and width // w == height // h

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames the codec makes of ``latent_frames``: 4k - 3 for the Wan2.2 VAE, as many in pixel space."""
        return self.vae.temporal_factor * (latent_frames - 1) + 1

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.vae.temporal_factor + 1

    def frame_count(self, frames: int | None) -> int:
        """``frames`` as this model can make them (None: its training length), with a warning when rounded."""
        if frames is None:
            return self.pixel_frames(self.training_latent_frames)
        return frame_count(frames, self.vae.temporal_factor)

    @property
    def default_aspect_ratio(self) -> str:
        return VIDEO_DEFAULTS["aspect_ratio"] if self.config.mix_aspect else "1:1"

    @property
    def default_cfg(self) -> float:
        """Upstream's video script's weight, or the model's own for class models trained here."""
        return self.config.cfg if self.is_class_model else VIDEO_DEFAULTS["cfg"]

    def size(self, aspect_ratio: str) -> tuple[int, int]:
        """(height, width) in pixels: the model's canvas, what inputs are resized to."""
        h, w = latent_size(self.config, aspect_ratio)
        return h * self.vae.factor, w * self.vae.factor

    def frame_size(self, aspect_ratio: str) -> tuple[int, int]:
        """(height, width) of the frames written: the canvas, enlarged for a pixel-space model."""
        height, width = self.size(aspect_ratio)
        k = self.vae.enlargement(height, width) if self.pixel_space else 1
        return height * k, width * k

    def needed_bytes(self, latent_frames: int, count: int, aspect_ratio: str, kv_bits: int | None = None) -> int:
        """Weights, then the larger of the deep block's guided KV cache (sampling) and the VAE's streaming
        working set (decoding, after the cache is freed), plus the frames."""
        cfg = self.config
        h, w = latent_size(cfg, aspect_ratio)
        itemsize = self.flow.blocks[-1].dtype.size if self.flow is not None else (4 if cfg.dtype == "float32" else 2)
        kv = kv_cache_bytes(cfg, min(latent_frames, self.training_latent_frames), h * w, count, itemsize, kv_bits)
        frames = self.pixel_frames(latent_frames)
        pixels = h * w * self.vae.factor**2
        tile = self.vae.tile
        decoded = (min(h, tile) * min(w, tile) if tile else h * w) * self.vae.factor**2  # decoded at once
        vae_work = 0 if self.pixel_space else decoded * VAE_BYTES_PER_PIXEL
        return weight_bytes(self.folder, self.layers) + max(kv, vae_work) + count * frames * pixels * 3

    def release_if_short(self, latent_frames: int, count: int, aspect_ratio: str, kv_bits: int | None = None) -> bool:
        """Free the flow and text encoder before decoding when they would crowd the VAE's working set.

        They are reloaded by the next :meth:`sample`. Returns whether they were released.
        """
        total = memory_limit()
        if total is None or self.needed_bytes(latent_frames, count, aspect_ratio, kv_bits) <= MEMORY_COMFORT * total:
            return False
        self.flow = self.text_encoder = None
        mx.clear_cache()
        return True

    def _reload(self) -> None:
        if self.flow is None:
            from starflow_mlx.io.text_encoder import load_text_encoder

            self.flow = load_flow(self.folder, dtype=self.dtype, lora=self.lora, lora_scale=self.lora_scale,
                                  layers=self.layers)
            if self.manifest.text_encoder:
                self.text_encoder = load_text_encoder(self.folder / self.manifest.text_encoder, dtype=self.dtype)

    def check_memory(self, latent_frames: int, count: int, aspect_ratio: str, kv_bits: int | None = None) -> None:
        total, needed = memory_limit(), self.needed_bytes(latent_frames, count, aspect_ratio, kv_bits)
        if total is not None and needed > total:
            message = (f"{count} video(s) of {self.pixel_frames(latent_frames)} frames need about "
                       f"{needed / 2**30:.1f} GB but the machine has {total / 2**30:.1f} GB: use fewer frames, ")
            cache, cli_cache = ("a quantized KV cache (kv_bits=8 or 4), ",
                                "a quantized KV cache (--kv-bits 8 or 4), ") if kv_bits != 4 else ("", "")
            raise with_cli_message(
                InsufficientMemoryError(message + cache + "decode in tiles (vae.tile = 16) or a 4-bit model "
                                        "(starflow_mlx.quantize)"),
                message + cli_cache + "decode in tiles (--vae-tile 16) or a 4-bit model (starflow quantize)")

    # -- conditioning frames --------------------------------------------------------------
    def encode(self, frames) -> mx.array:
        """Frames (B, T, H, W, 3), uint8 or floats in [-1, 1], -> flow-space latents (temporally scaled)."""
        frames = np.asarray(frames)
        if frames.dtype == np.uint8:
            frames = frames.astype(np.float32) / 127.5 - 1.0
        if not self.vae.has_encoder:
            raise ValueError(f"the video VAE of {self.folder} has no encoder: image and video conditioning need the "
                             "full Wan2.2_VAE.pth (convert it with its encoder)")
        latents = self.vae.encode(mx.array(frames, dtype=mx.float32))
        return mx.concatenate([latents[:, :1], latents[:, 1:] * self.temporal_scale], axis=1)

    def _context(self, image, video, height: int, width: int, fps: int,
                 frames: int | None = None) -> mx.array | None:
        """Flow-space latents (1, P, h, w, c) of the conditioning image or clip, without noise.

        A clip file is read up to ``frames`` frames: one that long already leaves nothing to generate."""
        if image is None and video is None:
            return None
        if image is not None and video is not None:
            raise ValueError("give an image or a video to start from, not both")
        if image is not None:
            picture = image if isinstance(image, Image.Image) else open_image(image)
            pixels, changed = cover_crop(picture, height, width, self.resample)
            if changed and not self.exact_reduction(picture.width, picture.height, (height, width)):
                warnings.warn(f"the image is {picture.width}x{picture.height}: resized to cover {width}x{height} and "
                              "centre-cropped", stacklevel=4)
            clip = pixels[None]
        else:
            from starflow_mlx.pipelines.video_io import read_video

            clip_frames, rate = (read_video(video, fps=fps, frames=frames) if not isinstance(video, np.ndarray)
                                 else (video, fps))
            if isinstance(video, (str, Path)) and abs(rate - fps) > 1e-3:
                warnings.warn(f"the clip is not at {fps} fps: resampled to {fps}", stacklevel=4)
            clip, usable, changed = clip_pixels(clip_frames, height, width, self.vae.temporal_factor, self.resample)
            if usable != len(clip_frames):
                warnings.warn(f"the clip's last {len(clip_frames) - usable} frame(s) are dropped to make 1 + 4k "
                              "frames", stacklevel=4)
            if changed and not self.exact_reduction(clip_frames.shape[2], clip_frames.shape[1], (height, width)):
                warnings.warn(f"the clip is {clip_frames.shape[2]}x{clip_frames.shape[1]}: resized to cover "
                              f"{width}x{height} and centre-cropped", stacklevel=4)
        return self.encode(clip[None])

    # -- generation -----------------------------------------------------------------------
    def sample(
        self,
        prompt: str,
        *,
        frames: int | None = None,
        image=None,
        video=None,
        seed: int = 0,
        cfg: float | None = None,
        aspect_ratio: str | None = None,
        num_videos: int = 1,
        fps: int = VIDEO_DEFAULTS["fps"],
        jacobi: bool | None = VIDEO_DEFAULTS["jacobi"],
        jacobi_block_size: int | None = None,
        jacobi_threshold: float | None = None,
        jacobi_max_iter: int | None = None,
        context_frames: int | None = None,
        kv_bits: int | None = None,
        progress: Callable[..., None] | None = None,
    ) -> mx.array:
        """Denoised flow-space latents (B, T_lat, h, w, c) for ``prompt``.

        ``image`` (path or PIL image) starts the video from that picture; ``video`` (path or
        uint8 frames) is a clip to continue: its frames come first and the rest is generated, ``frames``
        counting both (None: the model's training length). The given image or frames come back unchanged:
        exactly for a pixel-space model, as the VAE reconstructs them for a latent one. ``cfg=None`` is 3.5
        (upstream's video script), or a class model's own weight. ``aspect_ratio=None`` is 16:9, or
        1:1 for square-only models. ``jacobi=None`` runs the faster sampler on this device (sequential on
        a CPU, Jacobi on a GPU; both slide the window past the training length), or Jacobi when a ``jacobi_*``
        setting is given (None: 32, 0.001 and 32); a setting with ``jacobi=False`` is an error. ``kv_bits`` (8 or 4)
        keeps the KV caches quantized: the deep block's is most of a long video's memory.
        """
        self._reload()
        cfg = self.default_cfg if cfg is None else cfg
        aspect_ratio = aspect_ratio or self.default_aspect_ratio
        jacobi, settings = jacobi_settings(jacobi, self.config, VIDEO_DEFAULTS, jacobi_block_size=jacobi_block_size,
                                           jacobi_threshold=jacobi_threshold, jacobi_max_iter=jacobi_max_iter)
        check_options(seed, cfg, num_videos, **(settings or {k: VIDEO_DEFAULTS[k] for k in JACOBI_SETTINGS}))
        if not isinstance(fps, int) or not 1 <= fps <= 120:
            raise ValueError(f"fps must be a whole number from 1 to 120, got {fps!r}")
        frames = self.frame_count(frames)
        latent_frames = self.latent_frames(frames)
        check_kv_bits(kv_bits, self.config.head_dim)
        self.check_memory(latent_frames, num_videos, aspect_ratio, kv_bits)
        h, w = latent_size(self.config, aspect_ratio)
        report = progress or (lambda *a, **k: None)
        # Video i draws from seed + i, so one video of a batch can be made again on its own.
        keys = [mx.random.split(mx.random.key(seed + i)) for i in range(num_videos)]
        given = self._context(image, video, h * self.vae.factor, w * self.vae.factor, fps, frames)
        context = None
        if given is not None:
            if given.shape[1] >= latent_frames:
                message = f"the clip already has {self.pixel_frames(given.shape[1])} frames: ask for more "
                raise with_cli_message(ValueError(message + "frames than that"), message + "--frames than that")
            # As upstream: the conditioning latents carry the training noise, like everything the flow models.
            context = mx.concatenate([given + self.config.noise_std * mx.random.normal(given.shape, key=k[1])
                                      for k in keys])
        report("text", 0, 1)
        y, y_u = self.conditioning(prompt, num_videos, aspect_ratio, fps=fps if frames > 1 else 0)
        mx.eval(y, y_u)
        report("text", 1, 1)
        shape = (1, latent_frames, h, w, self.config.in_channels)
        z = mx.concatenate([mx.random.normal(shape, key=k[0]) for k in keys])
        x = self.flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=jacobi, context_frames=context_frames,
                              context=context, kv_bits=kv_bits, progress=progress, **settings)
        x = check_finite(self.denoise(x, y, report))
        if given is None:
            return x
        # The given frames come back as given, not as the flow and denoiser redrew them from their noised copy.
        known = mx.broadcast_to(given.astype(x.dtype), (x.shape[0], *given.shape[1:]))
        return mx.concatenate([known, x[:, given.shape[1]:]], axis=1)

    def denoise(self, x: mx.array, y: mx.array, report: Callable[..., None]) -> mx.array:
        """Remove the training noise: the learnable denoiser in chunks, or one score step without it."""
        report("denoise", 0, 1)
        if "learnable_self_denoiser" in self.flow:
            steps = min(self.training_latent_frames, x.shape[1])
            window = self.config.denoiser_window
            overlap = steps - 1 if window is None else min(window, steps - 1)
            x = learnable_denoise(self.flow, x, y, steps, overlap, on_chunk=lambda d, t: report("denoise", d, t))
        else:
            x = score_denoise(self.flow, x, y, self.config.noise_std)
            mx.eval(x)
            report("denoise", 1, 1)
        return x

    def unscale(self, latents: mx.array) -> mx.array:
        """Flow-space latents -> VAE latents: frames after the first divided by the temporal scale."""
        return mx.concatenate([latents[:, :1], latents[:, 1:] / self.temporal_scale], axis=1)

    def decode_frames(self, latents: mx.array, progress: Callable[..., None] | None = None) -> Iterator[np.ndarray]:
        """Flow-space latents -> uint8 frames (B, n, H, W, 3), yielded as the VAE streams them out."""
        report = progress or (lambda *a, **k: None)
        latents = self.unscale(latents)
        total = latents.shape[1]
        label = "frames" if self.pixel_space else "VAE frames"
        report(label, 0, self.pixel_frames(total))
        done = 0
        for chunk in self.vae.decode_frames(latents):
            done += chunk.shape[1]
            yield to_uint8(check_finite(chunk))
            report(label, done, self.pixel_frames(total))

    def decode(self, latents: mx.array) -> mx.array:
        """Flow-space latents -> frames (B, T, H, W, 3) in [-1, 1] (temporal scale undone, then clamped)."""
        return mx.clip(check_finite(self.vae.decode(self.unscale(latents))), -1.0, 1.0)

    def stream(self, prompt: str, *, progress: Callable[..., None] | None = None,
               **options) -> Iterator[np.ndarray]:
        """Sample now, then return an iterator of uint8 frames (B, n, H, W, 3) that the VAE decodes as it is read.

        Options are :meth:`sample`'s. When memory is short the flow is released before the decode (with a
        warning saying so).
        """
        latents = self.sample(prompt, progress=progress, **options)
        if self.release_if_short(latents.shape[1], latents.shape[0],
                                 options.get("aspect_ratio") or self.default_aspect_ratio, options.get("kv_bits")):
            warnings.warn("memory is short: the flow was released before the VAE decode", stacklevel=2)
        return self.decode_frames(latents, progress)

    def generate(self, prompt: str, *, progress: Callable[..., None] | None = None, **options) -> list[np.ndarray]:
        """uint8 frames (T, H, W, 3) per video; options are :meth:`sample`'s."""
        return list(np.concatenate(list(self.stream(prompt, progress=progress, **options)), axis=1))

    # -- likelihood -----------------------------------------------------------------------
    def score(self, video, prompt: str, fps: int = VIDEO_DEFAULTS["fps"]) -> float:
        """Exact bits per latent dimension of a clip (path or uint8 frames) under the flow given ``prompt``.

        The clip is resampled to ``fps``, resized to cover the generation size of its aspect
        ratio (the one generating exactly its size, else the nearest), trimmed to 1 + 4k
        frames and encoded (no noise is added).
        """
        x, y = self.prepare_score(video, prompt, fps)
        log_prob = self.flow.log_prob(x, y)
        return float(-log_prob[0].item() / (math.prod(x.shape[1:]) * math.log(2)))

    def score_frames(self, video, prompt: str, fps: int = VIDEO_DEFAULTS["fps"]) -> list[float]:
        """Bits per dimension of each latent frame, prepared as :meth:`score` does; their mean is its result.

        Latent frame k >= 1 holds pixel frames ``pixel_frames(k)`` to ``pixel_frames(k + 1) - 1`` (with Wan2.2:
        frame 0, then 4 a frame); each is scored given the frames before it (``STARFlow.log_prob_frames``).
        """
        x, y = self.prepare_score(video, prompt, fps)
        per_frame = self.flow.log_prob_frames(x, y)[0]
        return (-per_frame / (math.prod(x.shape[2:]) * math.log(2))).tolist()

    def prepare_score(self, video, prompt: str, fps: int = VIDEO_DEFAULTS["fps"]) -> tuple[mx.array, mx.array]:
        """(x, y): the clip's latents and the prompt's features, as :meth:`score` evaluates them."""
        if isinstance(video, (str, Path)):
            from starflow_mlx.pipelines.video_io import read_video

            frames, _ = read_video(video, fps=fps)
        else:
            if isinstance(video, Image.Image):
                raise ValueError("a video model scores clips: give an .mp4 path or uint8 frames (T, H, W, 3), "
                                 "not an image (score images with an image model)")
            frames = np.asarray(video)
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
                raise ValueError(f"a video model scores clips of uint8 frames (T, H, W, 3), got {frames.dtype} "
                                 f"{frames.shape} (an image's rows are not frames)")
        x, ratio, usable = self.clip_input(frames)
        y, _ = self.conditioning(prompt, 1, ratio, fps=fps if usable > 1 else 0)
        return x, y

    def clip_input(self, frames: np.ndarray) -> tuple[mx.array, str, int]:
        """uint8 frames (T, H, W, 3) -> the flow's data (1, T_lat, h, w, c) at the generation size of their aspect
        ratio (the one generating exactly their size, else the nearest), the ratio, and the frames kept."""
        exact = [r for r in ASPECT_RATIOS if self.config.mix_aspect and self.size(r) == frames.shape[1:3]]
        ratio = exact[0] if exact else nearest_aspect_ratio(self.config, frames.shape[2], frames.shape[1])
        height, width = self.size(ratio)
        clip, usable, changed = clip_pixels(frames, height, width, self.vae.temporal_factor, self.resample)
        if usable != len(frames) or changed and not self.exact_reduction(frames.shape[2], frames.shape[1],
                                                                         (height, width)):
            warnings.warn(f"the clip ({len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}) is read as "
                          f"{usable} frames of {width}x{height} ({ratio})", stacklevel=4)
        return self.encode(clip[None]), ratio, usable
