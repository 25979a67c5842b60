"""Prompt (or class) in, PIL images out: text encoding, flow sampling, denoising, decoding, all in MLX."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from starflow_mlx.loading import load_flow
from starflow_mlx.model_folder import Manifest, resolve_model
from starflow_mlx.pipelines.prompts import latent_size, prepare_prompt
from starflow_mlx.sampling.denoise import score_denoise

MIN_PIXEL_SIDE = 64  # tiny pixel-space outputs (8x8 digits) are enlarged so they can be seen


class InsufficientMemoryError(MemoryError):
    """The model does not fit in this machine's memory."""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def check_memory(folder: Path) -> None:
    """Refuse early, with the numbers, when the weights alone would not fit."""
    needed = int(folder_bytes(folder) * 1.3)  # weights + working memory for activations and the KV cache
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if needed > total:
        raise InsufficientMemoryError(
            f"this model needs about {needed / 2**30:.1f} GB but the machine has {total / 2**30:.1f} GB: "
            f"quantize it first (starflow quantize {folder} --bits 4 -o {folder.name}-4bit)")


class Pipeline:
    def __init__(self, folder: Path, flow, manifest: Manifest, text_encoder=None, vae=None):
        self.folder, self.flow, self.manifest = folder, flow, manifest
        self.text_encoder, self.vae = text_encoder, vae
        self.config = flow.config

    @classmethod
    def from_pretrained(cls, name: str | Path, dtype: str | None = None) -> "Pipeline":
        folder = resolve_model(name)
        manifest = Manifest.load(folder)
        check_memory(folder)
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

    def class_index(self, prompt: str) -> int:
        classes = self.manifest.classes
        if prompt not in classes:
            raise ValueError(f"unknown class {prompt!r}: this model generates {', '.join(classes)}")
        return classes.index(prompt)

    def conditioning(self, prompt: str, count: int, aspect_ratio: str | None) -> tuple[mx.array, mx.array]:
        """(y, y_uncond), each (count, L, D)."""
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
        y = mx.repeat(feats[:1], count, axis=0)
        y_u = mx.repeat(feats[1:], count, axis=0)
        return y, y_u

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
        jacobi: bool = True,
        jacobi_block_size: int = 64,
        jacobi_threshold: float = 0.005,
        jacobi_max_iter: int = 32,
        progress: Callable[..., None] | None = None,
    ) -> mx.array:
        """Denoised samples in the flow's data space (latents, or pixels in [-1, 1] x pixel_scale)."""
        if num_images < 1:
            raise ValueError("num_images must be at least 1")
        cfg = self.config.cfg if cfg is None else cfg
        shape = self.noise_shape(num_images, aspect_ratio)
        report = progress or (lambda *a, **k: None)
        report("text", 0, 1)
        y, y_u = self.conditioning(prompt, num_images, aspect_ratio)
        mx.eval(y, y_u)
        report("text", 1, 1)
        z = mx.random.normal(shape, key=mx.random.key(seed))
        x = self.flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=jacobi, jacobi_block_size=jacobi_block_size,
                              jacobi_threshold=jacobi_threshold, jacobi_max_iter=jacobi_max_iter, progress=progress)
        if not self.manifest.source.get("finetuned_decoder"):
            x = score_denoise(self.flow, x, y, self.config.noise_std)
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
        if self.vae is not None:
            pixels = self.vae.decode(x)
        else:
            pixels = x / self.manifest.pixel_scale
        arr = np.array(mx.clip((pixels.astype(mx.float32) + 1.0) * 127.5, 0, 255).round().astype(mx.uint8))
        images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
        return [self._enlarge(img) for img in images] if self.vae is None else images

    @staticmethod
    def _enlarge(img: Image.Image) -> Image.Image:
        factor = max(1, math.ceil(MIN_PIXEL_SIDE / min(img.size)))
        return img.resize((img.width * factor, img.height * factor), Image.NEAREST) if factor > 1 else img

    # -- likelihood ----------------------------------------------------------------------
    def to_model_input(self, image: Image.Image) -> mx.array:
        """An image as the flow's data: VAE latents, or pixels at the model's size."""
        if self.vae is not None:
            w, h = image.size
            f = self.config.vae_factor * self.config.patch_size
            image = image.convert("RGB").resize((max(f, w // f * f), max(f, h // f * f)), Image.BICUBIC)
            arr = np.asarray(image, np.float32) / 127.5 - 1.0
            return self.vae.encode(mx.array(arr[None]))
        size = self.config.latent_size
        mode = "L" if self.config.in_channels == 1 else "RGB"
        arr = np.asarray(image.convert(mode).resize((size, size), Image.BOX), np.float32) / 127.5 - 1.0
        arr = arr[..., None] if arr.ndim == 2 else arr
        return mx.array(arr[None] * self.manifest.pixel_scale)

    def score(self, image: Image.Image | str | Path, prompt: str) -> float:
        """Bits per dimension of the image (its VAE latent, or its pixels) under the flow, given ``prompt``."""
        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as img:
                    image = img.copy()
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read image {image}: {exc}") from None
        x = self.to_model_input(image)
        y, _ = self.conditioning(prompt, 1, None)
        log_prob = self.flow.log_prob(x, y)
        dims = math.prod(x.shape[1:])
        return float(-log_prob[0].item() / (dims * math.log(2)))
