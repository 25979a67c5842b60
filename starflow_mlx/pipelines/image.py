"""Prompt (or class) in, PIL images out: text encoding, flow sampling, denoising, decoding, all in MLX.

Likelihood convention of :meth:`Pipeline.score`: the image is resized to the size the
model generates at (the nearest allowed aspect ratio for mixed-aspect models), encoded
to the VAE posterior mean (scaled latents; pixels in [-1, 1] times ``pixel_scale`` for
pixel-space models), and its exact log-density under the flow, conditioned on the
prepared prompt, is reported as bits per latent dimension:
``-log p(x) / (numel(x) * ln 2)``. No training noise is added, so the score is
deterministic; the flow's density is that of latents carrying ``noise_std`` noise, which
is what it was trained on.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from starflow_mlx.config import FlowConfig
from starflow_mlx.loading import load_flow
from starflow_mlx.model_folder import Manifest, resolve_model
from starflow_mlx.pipelines.prompts import latent_size, nearest_aspect_ratio, prepare_prompt
from starflow_mlx.sampling.denoise import score_denoise

MIN_PIXEL_SIDE = 64  # tiny pixel-space outputs (8x8 digits) are enlarged so they can be seen
WORKING_BYTES = 1 << 30  # T5 and VAE activations, MLX buffers: measured well under this at 256x256


class InsufficientMemoryError(MemoryError):
    """The model does not fit in this machine's memory."""


def physical_memory() -> int | None:
    """Installed RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def needed_bytes(folder: Path, config) -> int:
    """Weights plus the deep block's guided KV cache for one image plus working memory."""
    tokens = (config.latent_size // config.patch_size) ** 2 * max(config.num_frames, 1) + config.txt_size
    deep = config.num_blocks - 1
    kv_cache = config.layers_per_block[deep] * 2 * 2 * tokens * config.block_channels(deep) * 4  # k+v, cfg pair, f32
    return weight_bytes(folder) + kv_cache + WORKING_BYTES


def check_memory(folder: Path, config) -> None:
    """Refuse early, with the numbers, when the model cannot fit."""
    total = physical_memory()
    needed = needed_bytes(folder, config)
    if total is not None and needed > total:
        raise InsufficientMemoryError(
            f"this model needs about {needed / 2**30:.1f} GB of memory but the machine has {total / 2**30:.1f} GB: "
            f"quantize it first (starflow quantize {folder} --bits 4 -o {folder.name}-4bit)")


def check_options(seed: int, cfg: float, num_images: int, jacobi_block_size: int, jacobi_threshold: float,
                  jacobi_max_iter: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be 0 or more, got {seed}")
    if cfg < 0:
        raise ValueError(f"cfg must be 0 or more, got {cfg}")
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if jacobi_block_size < 1 or jacobi_max_iter < 1 or jacobi_threshold <= 0:
        raise ValueError("jacobi_block_size and jacobi_max_iter must be at least 1 and jacobi_threshold above 0")


class Pipeline:
    def __init__(self, folder: Path, flow, manifest: Manifest, text_encoder=None, vae=None):
        self.folder, self.flow, self.manifest = folder, flow, manifest
        self.text_encoder, self.vae = text_encoder, vae
        self.config = flow.config

    @classmethod
    def from_pretrained(cls, name: str | Path, dtype: str | None = None) -> "Pipeline":
        """Load a model folder, ``demo``, or a Hugging Face repo id (downloaded and converted once)."""
        folder = resolve_model(name)
        manifest = Manifest.load(folder)
        if manifest.kind == "text-to-video":
            raise ValueError(f"{name} is a text-to-video model: this pipeline generates images")
        check_memory(folder, FlowConfig.load(folder / "config.json"))
        flow = load_flow(folder, dtype=dtype)
        text_encoder = vae = None
        if manifest.text_encoder:
            from starflow_mlx.text_encoder import load_text_encoder

            text_encoder = load_text_encoder(folder / manifest.text_encoder, dtype=dtype)
        if manifest.vae:
            from starflow_mlx.vae import load_vae

            vae = load_vae(folder / manifest.vae, dtype=dtype)
        return cls(folder, flow, manifest, text_encoder, vae)

    # -- conditioning --------------------------------------------------------------------
    @property
    def is_class_model(self) -> bool:
        return self.manifest.kind == "class-to-image"

    @property
    def has_finetuned_decoder(self) -> bool:
        return bool(self.manifest.source.get("finetuned_decoder"))

    def class_index(self, prompt: str) -> int:
        """The class a prompt names; the empty prompt is the unconditional (last) class."""
        classes = self.manifest.classes
        if prompt == "":
            return len(classes)
        if prompt not in classes:
            raise ValueError(f"unknown class {prompt!r}: this model generates {', '.join(classes)}")
        return classes.index(prompt)

    def conditioning(self, prompt: str, count: int, aspect_ratio: str | None) -> tuple[mx.array, mx.array]:
        """(y, y_uncond), each (count, L, D): the prompt's features and the empty prompt's."""
        if self.is_class_model:
            eye = np.eye(len(self.manifest.classes) + 1, dtype=np.float32)
            y = np.repeat(eye[self.class_index(prompt)][None, None], count, axis=0)
            y_u = np.repeat(eye[-1][None, None], count, axis=0)
            return mx.array(y), mx.array(y_u)
        length = self.config.txt_size
        text = prepare_prompt(prompt, self.config, aspect_ratio)
        tokens = self.text_encoder.count_tokens(text)
        if tokens > length:
            warnings.warn(f"prompt is {tokens} tokens; the model reads {length}, the rest is cut off", stacklevel=3)
        feats = self.text_encoder.encode([text, prepare_prompt("", self.config, aspect_ratio)], length)
        return mx.repeat(feats[:1], count, axis=0), mx.repeat(feats[1:], count, axis=0)

    # -- generation ----------------------------------------------------------------------
    def noise_shape(self, count: int, aspect_ratio: str) -> tuple[int, ...]:
        h, w = latent_size(self.config, aspect_ratio)
        return (count, h, w, self.config.in_channels)

    def sample(
        self,
        prompt: str,
        *,
        seed: int = 0,
        cfg: float | None = None,
        aspect_ratio: str = "1:1",
        num_images: int = 1,
        jacobi: bool | None = None,
        jacobi_block_size: int = 64,
        jacobi_threshold: float = 0.005,
        jacobi_max_iter: int = 32,
        progress: Callable[..., None] | None = None,
    ) -> mx.array:
        """Clean samples in the flow's data space (scaled latents, or pixels in [-1, 1] x pixel_scale).

        ``cfg=None`` uses the model's guidance weight. ``jacobi=None`` picks the faster
        sampler for the device (``starflow_mlx.sampling.auto``). Jacobi needs a
        start-of-sequence token; models without one are sampled sequentially.
        """
        cfg = self.config.cfg if cfg is None else cfg
        check_options(seed, cfg, num_images, jacobi_block_size, jacobi_threshold, jacobi_max_iter)
        shape = self.noise_shape(num_images, aspect_ratio)
        report = progress or (lambda *a, **k: None)
        report("text", 0, 1)
        y, y_u = self.conditioning(prompt, num_images, aspect_ratio)
        mx.eval(y, y_u)
        report("text", 1, 1)
        z = mx.random.normal(shape, key=mx.random.key(seed))
        x = self.flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=jacobi and self.config.sos,
                              jacobi_block_size=jacobi_block_size, jacobi_threshold=jacobi_threshold,
                              jacobi_max_iter=jacobi_max_iter, progress=progress)
        # The flow samples latents with its training noise; a fine-tuned decoder expects exactly that.
        if not self.has_finetuned_decoder:
            report("denoise", 0, 1)
            x = score_denoise(self.flow, x, y, self.config.noise_std)
            mx.eval(x)
            report("denoise", 1, 1)
        return x

    def generate(self, prompt: str, *, progress: Callable[..., None] | None = None, **options) -> list[Image.Image]:
        """Images for ``prompt`` (a class name for class models); same arguments, same pixels.

        Options are those of :meth:`sample`: seed, cfg, aspect_ratio, num_images, jacobi,
        jacobi_block_size, jacobi_threshold, jacobi_max_iter.
        """
        x = self.sample(prompt, progress=progress, **options)
        report = progress or (lambda *a, **k: None)
        report("decode", 0, 1)
        images = self.decode(x)
        report("decode", 1, 1)
        return images

    def decode(self, x: mx.array) -> list[Image.Image]:
        """Samples in the flow's data space -> 8-bit images."""
        pixels = self.vae.decode(x) if self.vae is not None else x / self.manifest.pixel_scale
        arr = np.array(mx.clip((pixels.astype(mx.float32) + 1.0) * 127.5, 0, 255).round().astype(mx.uint8))
        images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
        return images if self.vae is not None else [self._enlarge(img) for img in images]

    @staticmethod
    def _enlarge(img: Image.Image) -> Image.Image:
        factor = max(1, math.ceil(MIN_PIXEL_SIDE / min(img.size)))
        return img.resize((img.width * factor, img.height * factor), Image.NEAREST) if factor > 1 else img

    # -- likelihood ----------------------------------------------------------------------
    def to_model_input(self, image: Image.Image) -> tuple[mx.array, str]:
        """An image as the flow's data at the model's generation size, and the aspect ratio used."""
        ratio = nearest_aspect_ratio(self.config, image.width, image.height)
        h, w = latent_size(self.config, ratio)
        if self.vae is not None:
            size = (w * self.vae.factor, h * self.vae.factor)
            rgb = image.convert("RGB")
            rgb = rgb if rgb.size == size else rgb.resize(size, Image.BICUBIC)
            arr = np.asarray(rgb, np.float32) / 127.5 - 1.0
            return self.vae.encode(mx.array(arr[None])), ratio
        mode = "L" if self.config.in_channels == 1 else "RGB"
        # BOX undoes the integer nearest-neighbour enlargement of generated pixel-space images exactly.
        arr = np.asarray(image.convert(mode).resize((w, h), Image.BOX), np.float32) / 127.5 - 1.0
        arr = arr[..., None] if arr.ndim == 2 else arr
        return mx.array(arr[None] * self.manifest.pixel_scale), ratio

    def prepare_score(self, image: Image.Image, prompt: str) -> tuple[mx.array, mx.array]:
        """(x, y) that :meth:`score` evaluates the flow's log-density on."""
        x, ratio = self.to_model_input(image)
        y, _ = self.conditioning(prompt, 1, ratio)
        return x, y

    def score(self, image: Image.Image | str | Path, prompt: str) -> float:
        """Bits per dimension of the image's latent (or pixels) under the flow given ``prompt`` (module doc)."""
        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as img:
                    img.load()
                    image = img.copy()
            except (OSError, ValueError, SyntaxError) as exc:
                raise ValueError(f"cannot read image {image} ({exc})") from None
        x, y = self.prepare_score(image, prompt)
        log_prob = self.flow.log_prob(x, y)
        return float(-log_prob[0].item() / (math.prod(x.shape[1:]) * math.log(2)))
