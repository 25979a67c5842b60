"""Encode captioned data once: VAE latents and T5 features, cached on disk, then the encoders are freed.

A cache folder holds one safetensors file per item latent (``latents/<file sha256>-<id>``) and per
prompt (``text/<prompt sha256>-<id>``), where ``<id>`` identifies the encoders and the model settings
that shape their output (:func:`encoder_identity`): change (or rewrite) a file, a caption, the VAE or the text
encoder and only what changed is encoded again. Files are written to a temporary name and renamed,
so an interrupted run leaves no half entry; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from starflow_mlx.config import FlowConfig
from starflow_mlx.io.model_folder import Manifest
from starflow_mlx.pipelines.prompts import latent_size, nearest_aspect_ratio, prepare_prompt
from starflow_mlx.pipelines.video_io import file_sha256
from starflow_mlx.training.captions import BadItems, Bucket, CaptionedDataset, CaptionedItem
from starflow_mlx.training.data import DataError

# What of a flow's config changes the latents or text features it is trained on.
_SHAPING = ("latent_size", "vae_factor", "patch_size", "mix_aspect", "txt_size", "fps_cond", "cond_noise_level",
            "noise_std", "num_frames", "local_attn_window", "vae_temporal_scale")


def _files(folder: Path) -> list[tuple[str, int, int]]:
    # Hashing the contents would read gigabytes (a T5-XL) on every run; a rewritten file has a new mtime.
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def clip_latent_frames(config: FlowConfig, frames: int | None) -> int:
    """Latent frames of the training clips: ``frames`` pixel frames (1 + 4k, the Wan2.2 VAE's rule), or the
    model's training length."""
    if frames is None:
        return config.local_attn_window or config.num_frames or 1
    if frames < 1 or (frames - 1) % 4:
        raise DataError(f"--frames must be 1 + 4k (1, 5, 9, ..., 81: the video VAE's frame rule), got {frames}")
    return (frames - 1) // 4 + 1


def encoder_identity(folder: Path, manifest: Manifest, config: FlowConfig, fps: int, frames: int = 0) -> str:
    """A hash of the encoders' files (names, sizes, modification times) and of the settings that shape what they
    produce."""
    record = {"text": _files(folder / manifest.text_encoder) if manifest.text_encoder else [],
              "vae": _files(folder / manifest.vae) if manifest.vae else [],
              "config": {k: getattr(config, k) for k in _SHAPING}, "fps": fps, "frames": frames, "format": 1}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


class Encoders:
    """The model's text encoder and VAE, loaded on first use (a fully cached run never loads them)."""

    def __init__(self, folder: Path, manifest: Manifest, video: bool):
        self.folder, self.manifest, self.video = folder, manifest, video
        self._text = self._vae = None
        self.loaded: list[str] = []  # which were loaded, in order (for messages and tests)

    @property
    def text(self):
        if self._text is None:
            from starflow_mlx.io.text_encoder import load_text_encoder

            self._text = load_text_encoder(self.folder / self.manifest.text_encoder)  # as stored, as generate loads it
            self.loaded.append("text")
        return self._text

    @property
    def vae(self):
        if self._vae is None:
            if self.video:
                from starflow_mlx.io.video_vae import load_video_vae

                self._vae = load_video_vae(self.folder / self.manifest.vae)
                if not self._vae.has_encoder:
                    raise DataError(f"the video VAE of {self.folder} has no encoder: convert the model again with the "
                                    "full Wan2.2_VAE.pth to train on clips")
            else:
                from starflow_mlx.io.vae import load_vae

                self._vae = load_vae(self.folder / self.manifest.vae)
            self.loaded.append("vae")
        return self._vae

    def free(self) -> None:
        """Drop both models and MLX's cached buffers: training needs the memory."""
        self._text = self._vae = None
        mx.clear_cache()


class FeatureCache:
    def __init__(self, folder: Path, identity: str):
        self.folder, self.identity = Path(folder), identity
        self.hits = self.misses = 0

    def _path(self, kind: str, digest: str) -> Path:
        return self.folder / kind / f"{digest}-{self.identity}.safetensors"

    def get(self, kind: str, digest: str) -> tuple[np.ndarray, dict] | None:
        path = self._path(kind, digest)
        if not path.is_file():
            return None
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
            value = np.array(arrays["value"])
        except Exception:  # a damaged entry is recomputed, never trusted
            return None
        self.hits += 1
        return value, meta

    def put(self, kind: str, digest: str, value: mx.array, meta: dict | None = None) -> None:
        path = self._path(kind, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
        mx.save_safetensors(str(tmp), {"value": value}, metadata=meta or {})
        os.replace(tmp, path)
        self.misses += 1


class CaptionEncoder:
    """Items -> (latents, ratio) and prompts -> features, through the cache, for one model."""

    def __init__(self, folder: Path, manifest: Manifest, config: FlowConfig, cache_dir: Path, bad: BadItems,
                 latent_frames: int = 0):
        from starflow_mlx.io.model_folder import VIDEO_KINDS
        from starflow_mlx.pipelines.settings import VIDEO_DEFAULTS

        self.config, self.bad = config, bad
        self.video = manifest.kind in VIDEO_KINDS
        self.fps = VIDEO_DEFAULTS["fps"] if self.video else 0
        latent_frames = latent_frames or clip_latent_frames(config, None)
        self.frames = 4 * (latent_frames - 1) + 1 if self.video else 0  # the Wan2.2 VAE: 1 + 4k pixel frames
        self.encoders = Encoders(folder, manifest, self.video)
        self.cache = FeatureCache(cache_dir, encoder_identity(folder, manifest, config, self.fps, self.frames))

    def pixel_size(self, ratio: str) -> tuple[int, int]:
        h, w = latent_size(self.config, ratio)
        return h * self.config.vae_factor, w * self.config.vae_factor

    def _pixels(self, item: CaptionedItem) -> tuple[np.ndarray, str] | None:
        """The item's pixels at its bucket's size ((H, W, 3) or (T, H, W, 3) in [-1, 1]), or None if unusable."""
        from starflow_mlx.pipelines.video import clip_pixels, cover_crop

        if not self.video:
            from starflow_mlx.io.image_input import ImageInputError, open_image

            try:
                image = open_image(item.path)
            except ImageInputError as exc:
                return self.bad(item.path, str(exc))
            ratio = nearest_aspect_ratio(self.config, image.width, image.height)
            return cover_crop(image, *self.pixel_size(ratio), Image.BICUBIC)[0], ratio
        from starflow_mlx.pipelines.video_io import read_video

        try:
            frames, _ = read_video(item.path, fps=self.fps, frames=self.frames * 64)
        except (ValueError, OSError) as exc:
            return self.bad(item.path, str(exc))
        if len(frames) < self.frames:
            return self.bad(item.path, f"{len(frames)} frames at {self.fps} fps; the model trains on {self.frames}")
        ratio = nearest_aspect_ratio(self.config, frames.shape[2], frames.shape[1])
        return clip_pixels(frames[:self.frames], *self.pixel_size(ratio))[0], ratio

    def latents(self, item: CaptionedItem) -> tuple[np.ndarray, str] | None:
        digest = file_sha256(item.path)
        hit = self.cache.get("latents", digest)
        if hit is not None:
            return hit[0], hit[1]["ratio"]
        found = self._pixels(item)
        if found is None:
            return None
        pixels, ratio = found
        x = self.encoders.vae.encode(mx.array(pixels[None]))
        if self.video:  # as the video pipeline encodes: frames after the first are scaled
            x = mx.concatenate([x[:, :1], x[:, 1:] * (self.config.vae_temporal_scale or 1.0)], axis=1)
        x = x[0].astype(mx.float32)
        self.cache.put("latents", digest, x, {"ratio": ratio})
        return np.array(x), ratio

    def text(self, caption: str, ratio: str, where: Path | None = None) -> np.ndarray | None:
        prompt = prepare_prompt(caption, self.config, ratio, self.fps)
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        hit = self.cache.get("text", digest)
        if hit is not None:
            return hit[0]
        length = self.config.txt_size
        tokens = self.encoders.text.count_tokens(prompt)
        if tokens > length:
            return self.bad(where, f"the caption is {tokens} tokens with the model's prompt template but the model "
                                   f"reads {length}: shorten it")
        y = self.encoders.text.encode([prompt], length)[0].astype(mx.float32)
        self.cache.put("text", digest, y)
        return np.array(y)


def encode_captioned(encoder: CaptionEncoder, items: list[CaptionedItem],
                     progress: Callable[[str, int, int], None] | None = None) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(latents, caption features, ratio) of every usable item, in order; unusable ones go to ``encoder.bad``."""
    report = progress or (lambda *a: None)
    out = []
    for done, item in enumerate(items):
        report("encoding", done, len(items))
        found = encoder.latents(item)
        if found is not None:
            y = encoder.text(item.caption, found[1], item.path)
            if y is not None:
                out.append((found[0], y, found[1]))
    report("encoding", len(items), len(items))
    return out


def to_dataset(encoder: CaptionEncoder, encoded: list[tuple[np.ndarray, np.ndarray, str]]) -> CaptionedDataset:
    """Group encoded items into aspect-ratio buckets, each with its empty caption's features."""
    ratios = sorted({r for _, _, r in encoded})
    buckets = []
    for ratio in ratios:
        rows = [(x, y) for x, y, r in encoded if r == ratio]
        empty = encoder.text("", ratio)
        buckets.append(Bucket(ratio, np.stack([x for x, _ in rows]), np.stack([y for _, y in rows]), empty))
    return CaptionedDataset(buckets)


def load_captioned(folder: Path, manifest: Manifest, config: FlowConfig, data: str | Path, cache_dir: Path,
                   holdout: float, seed: int, bad: BadItems,
                   progress: Callable[[str, int, int], None] | None = None,
                   latent_frames: int = 0) -> tuple[CaptionedDataset, CaptionedDataset, CaptionEncoder]:
    """(train, held-out) encoded from a captioned folder through the cache; the encoders are freed after.
    ``latent_frames``: clips of that many latent frames (default: the model's training length)."""
    from starflow_mlx.training.captions import scan_captioned, split_holdout

    encoder = CaptionEncoder(folder, manifest, config, cache_dir, bad, latent_frames)
    items = scan_captioned(data, encoder.video, bad)
    encoded = encode_captioned(encoder, items, progress)
    train_idx, held_idx = split_holdout(len(encoded), holdout, seed)
    train, held = (to_dataset(encoder, [encoded[i] for i in idx]) for idx in (train_idx, held_idx))
    encoder.encoders.free()
    return train, held, encoder
