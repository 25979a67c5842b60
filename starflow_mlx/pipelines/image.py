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
from starflow_mlx.io.loading import load_flow
from starflow_mlx.io.memory import check_memory, plan_batch
from starflow_mlx.io.model_folder import CLASS_KINDS, VIDEO_KINDS, Manifest
from starflow_mlx.pipelines.prompts import (check_prompt, class_features, latent_size, nearest_aspect_ratio,
                                           prepare_prompt)
from starflow_mlx.pipelines.settings import IMAGE_JACOBI, check_finite, check_options
from starflow_mlx.io.resolve import resolve_model
from starflow_mlx.sampling.auto import jacobi_settings
from starflow_mlx.sampling.denoise import score_denoise

MIN_PIXEL_SIDE = 64  # tiny pixel-space outputs (8x8 digits) are enlarged so they can be seen


def class_index(manifest: Manifest, prompt: str) -> int:
    """The class a prompt names; the empty prompt is the unconditional (last) class."""
    classes = manifest.classes
    if prompt == "":
        return len(classes)
    if prompt not in classes:
        wanted = manifest.prompt_help or ", ".join(classes)
        raise ValueError(f"unknown class {prompt!r}: this model generates {wanted}")
    return classes.index(prompt)


class Pipeline:
    VIDEO = False  # which manifest kind this class runs (load_pipeline picks the class for a folder)

    layers: range | None = None  # the deep block's layers this process holds (pipeline parallel), None: all
    lora: str | Path | list | None = None  # the LoRA adapter(s) on the flow, and their scale(s)
    lora_scale: float | list[float] = 1.0

    def __init__(self, folder: Path, flow, manifest: Manifest, text_encoder=None, vae=None):
        self.folder, self.flow, self.manifest = folder, flow, manifest
        self.text_encoder, self.vae = text_encoder, vae
        self.config = flow.config
        self._last_text = None  # (prompt, aspect ratio) -> features: batches of one prompt encode it once

    @classmethod
    def from_pretrained(cls, name: str | Path, dtype: str | None = None, lora: str | Path | list | None = None,
                        lora_scale: float | list[float] = 1.0, layers: range | None = None) -> "Pipeline":
        """Load a model folder, ``demo``, or a Hugging Face repo id (downloaded and converted once).

        ``lora``: a LoRA adapter folder (``starflow train --lora``) added to the flow, its update times ``lora_scale``;
        or a list of folders with a list of scales (one each), their updates added up.
        ``layers``: hold only those layers of the deep block (a rank's share, :mod:`starflow_mlx.io.distributed`).
        """
        folder = resolve_model(name)
        manifest = Manifest.load(folder)
        if (manifest.kind in VIDEO_KINDS) != cls.VIDEO:
            wanted = "starflow_mlx.Pipeline" if cls.VIDEO else "starflow_mlx.VideoPipeline"
            raise ValueError(f"{name} is a {manifest.kind} model: use {wanted}, or starflow_mlx.load_pipeline, "
                             "which picks the pipeline for the model")
        check_memory(folder, FlowConfig.load(folder / "config.json"), layers)
        flow = load_flow(folder, dtype=dtype, lora=lora, lora_scale=lora_scale, layers=layers)
        text_encoder = vae = None
        if manifest.text_encoder:
            from starflow_mlx.io.text_encoder import load_text_encoder

            text_encoder = load_text_encoder(folder / manifest.text_encoder, dtype=dtype)
        if manifest.vae:
            vae = cls.load_vae(folder / manifest.vae, dtype)
        pipe = cls(folder, flow, manifest, text_encoder, vae)
        pipe.layers = layers
        pipe.lora, pipe.lora_scale = lora, lora_scale  # a video pipeline reloads its flow with them
        return pipe

    @classmethod
    def load_vae(cls, path: Path, dtype: str | None):
        from starflow_mlx.io.vae import load_vae

        return load_vae(path, dtype=dtype)

    # -- conditioning --------------------------------------------------------------------
    @property
    def is_class_model(self) -> bool:
        return self.manifest.kind in CLASS_KINDS

    @property
    def has_finetuned_decoder(self) -> bool:
        return bool(self.manifest.source.get("finetuned_decoder"))

    def class_index(self, prompt: str) -> int:
        return class_index(self.manifest, prompt)

    def conditioning(self, prompt: str, count: int, aspect_ratio: str | None, fps: int = 0) -> tuple[mx.array, mx.array]:
        """(y, y_uncond), each (count, L, D): the prompt's features and the empty prompt's (``fps`` for video)."""
        y, y_u = self.text_features(prompt, aspect_ratio, fps)
        return mx.repeat(y, count, axis=0), mx.repeat(y_u, count, axis=0)

    def text_features(self, prompt: str, aspect_ratio: str | None, fps: int = 0) -> tuple[mx.array, mx.array]:
        """(y, y_uncond), each (1, L, D): computed once per prompt, repeated for every image."""
        check_prompt(prompt)
        key = (prompt, aspect_ratio, fps)
        if self._last_text is None or self._last_text[0] != key:
            self._last_text = key, self._text_features(prompt, aspect_ratio, fps)
        return self._last_text[1]

    def _text_features(self, prompt: str, aspect_ratio: str | None, fps: int) -> tuple[mx.array, mx.array]:
        if self.is_class_model:
            table = class_features(self.manifest.classes, self.manifest.words)
            return mx.array(table[self.class_index(prompt)][None]), mx.array(table[-1][None])
        length = self.config.txt_size
        text = prepare_prompt(prompt, self.config, aspect_ratio, fps)
        tokens = self.text_encoder.count_tokens(text)
        if tokens > length:
            # The user wrote the prompt, not the training template around it: count both, say which is which.
            own = self.text_encoder.count_tokens(prompt)
            warnings.warn(f"the prompt is {own} tokens, {tokens} with the model's prompt template; the model reads "
                          f"{length}, the rest is cut off", stacklevel=5)
        feats = self.text_encoder.encode([text, prepare_prompt("", self.config, aspect_ratio, fps)], length)
        return feats[:1], feats[1:]

    # -- generation ----------------------------------------------------------------------
    def noise_shape(self, count: int, aspect_ratio: str) -> tuple[int, ...]:
        h, w = latent_size(self.config, aspect_ratio)
        return (count, h, w, self.config.in_channels)

    def noise(self, seed: int, start: int, stop: int, aspect_ratio: str) -> mx.array:
        """Noise of images ``start`` to ``stop``: image i draws from seed + i, so batches can be cut anywhere."""
        one = self.noise_shape(1, aspect_ratio)
        return mx.concatenate([mx.random.normal(one, key=mx.random.key(seed + i)) for i in range(start, stop)])

    def sample(
        self,
        prompt: str,
        *,
        seed: int = 0,
        cfg: float | None = None,
        aspect_ratio: str = "1:1",
        num_images: int = 1,
        jacobi: bool | None = None,
        jacobi_block_size: int | None = None,
        jacobi_threshold: float | None = None,
        jacobi_max_iter: int | None = None,
        kv_bits: int | None = None,
        progress: Callable[..., None] | None = None,
        images: tuple[int, int] | None = None,
    ) -> mx.array:
        """Clean samples in the flow's data space (scaled latents, or pixels in [-1, 1] x pixel_scale).

        ``cfg=None`` uses the model's guidance weight. ``jacobi=None`` picks the faster
        sampler for the device (``starflow_mlx.sampling.auto``), or Jacobi when a ``jacobi_*``
        setting is given (None: 64, 0.005 and 32); a setting with ``jacobi=False`` is an error.
        Jacobi needs a start-of-sequence token; models without one are sampled sequentially.
        ``images=(start, stop)`` samples only those images of the ``num_images`` (image i
        uses seed + i). ``kv_bits`` (8 or 4) keeps the KV caches quantized.
        """
        cfg = self.config.cfg if cfg is None else cfg
        jacobi, settings = jacobi_settings(jacobi, self.config, IMAGE_JACOBI, jacobi_block_size=jacobi_block_size,
                                           jacobi_threshold=jacobi_threshold, jacobi_max_iter=jacobi_max_iter)
        check_options(seed, cfg, num_images, **(settings or IMAGE_JACOBI))
        start, stop = images or (0, num_images)
        if not 0 <= start < stop <= num_images:
            raise ValueError(f"images {start} to {stop} are not among the {num_images} images")
        report = progress or (lambda *a, **k: None)
        report("text", 0, 1)
        y, y_u = self.conditioning(prompt, stop - start, aspect_ratio)
        mx.eval(y, y_u)
        report("text", 1, 1)
        z = self.noise(seed, start, stop, aspect_ratio)
        x = self.flow.reverse(z, y, y_uncond=y_u, cfg=cfg, jacobi=jacobi and self.config.sos, kv_bits=kv_bits,
                              progress=progress, **settings)
        # The flow samples latents with its training noise; a fine-tuned decoder expects exactly that.
        if not self.has_finetuned_decoder:
            report("denoise", 0, 1)
            x = score_denoise(self.flow, x, y, self.config.noise_std)
            mx.eval(x)
            report("denoise", 1, 1)
        return check_finite(x)

    def generate(self, prompt: str, *, progress: Callable[..., None] | None = None, batch_size: int | None = None,
                 **options) -> list[Image.Image]:
        """Images for ``prompt`` (a class name for class models); same arguments, same pixels.

        Options are those of :meth:`sample`: seed, cfg, aspect_ratio, num_images, jacobi,
        jacobi_block_size, jacobi_threshold, jacobi_max_iter. Images are sampled
        ``batch_size`` at a time (default: as many as memory allows, at most 16).
        """
        return [image for _, batch in self.generate_batches(prompt, progress=progress, batch_size=batch_size,
                                                            **options) for image in batch]

    def generate_batches(self, prompt: str, *, progress: Callable[..., None] | None = None,
                         batch_size: int | None = None, images: tuple[int, int] | None = None, **options):
        """Yield ``(first_index, images)`` batch by batch, so a long job never holds more than one batch.

        ``images=(start, stop)`` generates only those images (batches stay cut at multiples of
        ``batch_size``, so each image is computed exactly as in the whole run).
        """
        num_images = options.get("num_images", 1)
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        size = plan_batch(self.folder, self.config, num_images, batch_size, self.layers)
        start, stop = images or (0, num_images)
        report = progress or (lambda *a, **k: None)
        for first in range(start - start % size, stop, size):
            last = min(first + size, num_images)
            x = self.sample(prompt, progress=progress, images=(first, last), **options)
            report("decode", 0, 1)
            batch = self.decode(x)
            report("decode", 1, 1)
            keep = range(max(first, start), min(last, stop))
            yield keep.start, batch[keep.start - first: keep.stop - first]

    def image_size(self, aspect_ratio: str) -> tuple[int, int, int]:
        """(width, height, channels) of the images :meth:`generate` returns."""
        h, w = latent_size(self.config, aspect_ratio)
        if self.vae is not None:
            return w * self.vae.factor, h * self.vae.factor, 3
        factor = max(1, math.ceil(MIN_PIXEL_SIDE / min(h, w)))
        return w * factor, h * factor, self.config.in_channels

    def decode(self, x: mx.array) -> list[Image.Image]:
        """Samples in the flow's data space -> 8-bit images."""
        pixels = check_finite(self.vae.decode(x)) if self.vae is not None else x / self.manifest.pixel_scale
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
        width, height, _ = self.image_size(ratio)
        exact = (image.width, image.height) == (width, height) or (
            self.vae is None and image.width % w == 0 and image.width * h == image.height * w)
        if not exact:
            # Only a different aspect ratio changes the picture's shape; a plain rescale does not.
            reshaped = image.width * height != image.height * width
            warnings.warn(f"the image is {image.width}x{image.height} but the model scores {width}x{height} images: "
                          f"it was resized{' (and its shape changed)' if reshaped else ''} before scoring",
                          stacklevel=3)
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
        if not isinstance(image, (Image.Image, str, os.PathLike)):
            raise ValueError(f"an image model scores a PIL image or an image file, got {type(image).__name__} "
                             "(score videos with a video model)")
        if not isinstance(image, Image.Image):
            from starflow_mlx.io.image_input import open_image

            image = open_image(image)
        x, y = self.prepare_score(image, prompt)
        log_prob = self.flow.log_prob(x, y)
        return float(-log_prob[0].item() / (math.prod(x.shape[1:]) * math.log(2)))

    # -- exact inversion: editing, inpainting (starflow_mlx.pipelines.inversion) ---------------
    def invert(self, source, prompt: str, cfg: float | None = None, fps: int | None = None):
        """An image (or a clip, video models) -> the noise sampling ``prompt`` with ``cfg`` maps back to it."""
        from starflow_mlx.pipelines import inversion

        return inversion.invert(self, source, prompt, cfg, fps)

    def from_noise(self, inverted, prompt: str | None = None, cfg: float | None = None, **options):
        """An :meth:`invert` result back to an image (or frames), under its prompt unless another is given."""
        from starflow_mlx.pipelines import inversion

        return inversion.from_noise(self, inverted, prompt, cfg, **options)

    def edit(self, source, source_prompt: str, prompt: str, **options):
        """``source`` remade as ``prompt`` (strength, seed, cfg, fps, jacobi: :func:`inversion.edit`)."""
        from starflow_mlx.pipelines import inversion

        return inversion.edit(self, source, source_prompt, prompt, **options)

    def inpaint(self, source, mask, prompt: str, **options):
        """The mask's white part regenerated under ``prompt``, the rest kept (:func:`inversion.inpaint`)."""
        from starflow_mlx.pipelines import inversion

        return inversion.inpaint(self, source, mask, prompt, **options)
    # -- many inputs (starflow_mlx.pipelines.scoring) -------------------------------------
    def iter_scores(self, inputs, prompt: str, **options):
        """Yield a :class:`~starflow_mlx.pipelines.scoring.ScoreRow` per input (files, folders, globs, images or
        clips), scored in batches; options: fps, batch_size, progress. An unreadable input is a row with its error."""
        from starflow_mlx.pipelines.scoring import iter_scores

        return iter_scores(self, inputs, prompt, **options)

    def score_many(self, inputs, prompt: str, **options) -> list:
        """:meth:`iter_scores` as a list."""
        return list(self.iter_scores(inputs, prompt, **options))

    def classify(self, item, prompts: list[str] | None = None, **options):
        """p(class | item) over the model's classes (or ``prompts``) by Bayes with a uniform prior
        (:func:`starflow_mlx.pipelines.scoring.classify`); options: fps, batch_size."""
        from starflow_mlx.pipelines.scoring import classify

        return classify(self, item, prompts, **options)

    def token_map(self, item, prompt: str, fps: int | None = None):
        """Each token's share of the input's bits/dim (they sum to :meth:`score`), for a heat map
        (:mod:`starflow_mlx.pipelines.heatmap` says how the shallow blocks and the prior are assigned)."""
        from starflow_mlx.pipelines.heatmap import token_map

        return token_map(self, item, prompt, fps)
