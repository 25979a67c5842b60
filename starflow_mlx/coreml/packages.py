"""The packages every export builds from the same parts: the deep block, the shallow blocks, the text encoder and
image VAE decoder, and the options that size them. Image and video exports both build on this."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from starflow_mlx.advice import option_error, with_cli_message
from starflow_mlx.config import FlowConfig
from starflow_mlx.coreml.builder import ExportError
from starflow_mlx.coreml.deep_block import COMPUTE_UNITS as DEEP_UNITS
from starflow_mlx.coreml.deep_block import DeepBlockBuilder, DeepShapes
from starflow_mlx.coreml.manifest import PackageInfo
from starflow_mlx.coreml.shallow_block import COMPUTE_UNITS as SHALLOW_UNITS
from starflow_mlx.coreml.shallow_block import ShallowBlockBuilder, ShallowShapes
from starflow_mlx.models.starflow import Layout

DEFAULT_CHUNK = 64


@dataclass
class ExportOptions:
    bits: int | None = None
    group_size: int = 64
    chunk: int | None = None  # None: 64 (capped at the token count) with a start token, else 1
    height: int | None = None  # image pixels; None: the model's training size
    width: int | None = None
    batch: int = 1
    guidance: bool | None = None  # None: guided when the deep block sees text and the config's cfg > 0
    aspect_ratio: str | None = None  # video frames; None: 16:9 for mixed-aspect models, else 1:1


def from_model_manifest(model_manifest) -> dict:
    """What an export's manifest carries over from the model folder's: class names, label words, pixel scale."""
    if model_manifest is None:  # a flow-only folder
        return {}
    return dict(classes=list(model_manifest.classes), words=list(model_manifest.words or []),
                pixel_scale=float(model_manifest.pixel_scale))


def resolve_chunk(chunk: int | None, tokens: int, sos: bool, unit: str = "image") -> int:
    if chunk is None:
        return min(DEFAULT_CHUNK, tokens) if sos else 1
    if chunk < 1:
        raise option_error(ExportError, "chunk", f" must be at least 1, got {chunk}")
    if chunk > tokens:
        raise option_error(ExportError, "chunk", f" {chunk} is larger than the {tokens} tokens of one {unit}: use at "
                           f"most {tokens}")
    if chunk > 1 and not sos:
        message = "{} > 1 (Jacobi) needs a model with a start-of-sequence token: use {} 1"
        raise with_cli_message(ExportError(message.format("chunk", "chunk=")), message.format("--chunk", "--chunk"))
    return chunk


def component_packages(source: Path, folder: Path, model_manifest, text_rows: int, text_len: int,
                       report: Callable[[str], None], vae_latents: tuple[int, int, int] | None,
                       built: Callable[[], None] = lambda: None) -> list[PackageInfo]:
    """The text encoder (with its tokenizer copied next to it) and, given ``vae_latents`` (batch, h, w), the
    image VAE decoder of a full model folder. ``built()`` is called after each package."""
    packages = []
    if model_manifest.text_encoder:
        from starflow_mlx.coreml.text_encoder import COMPUTE_UNITS as TEXT_UNITS
        from starflow_mlx.coreml.text_encoder import TextEncoderBuilder, TextShapes
        from starflow_mlx.io.text_encoder import load_text_encoder

        encoder = load_text_encoder(source / model_manifest.text_encoder)
        shapes = TextShapes(text_rows, text_len, encoder.dim)
        report(f"text encoder: {encoder.config.num_layers} layers, {text_rows} rows x {text_len} tokens")
        builder = TextEncoderBuilder(encoder.model, shapes)
        builder.save(folder / "text_encoder.mlpackage")
        shutil.copytree(source / model_manifest.text_encoder / "tokenizer", folder / "tokenizer")
        built()
        packages.append(PackageInfo("text_encoder", "text_encoder.mlpackage", "text_encoder", TEXT_UNITS,
                                    "channels_last", shapes.functions(), quantized_layers=builder.quantized_layers))
    if model_manifest.vae and vae_latents is not None:
        from starflow_mlx.coreml.vae_decoder import COMPUTE_UNITS as VAE_UNITS
        from starflow_mlx.coreml.vae_decoder import DecoderShapes, VAEDecoderBuilder
        from starflow_mlx.io.vae import load_vae

        batch, lat_h, lat_w = vae_latents
        vae = load_vae(source / model_manifest.vae)
        shapes = DecoderShapes(batch, lat_h, lat_w, vae.latent_channels, vae.factor, vae.config.out_channels)
        report(f"VAE decoder: {lat_h}x{lat_w} latents -> {lat_h * vae.factor}x{lat_w * vae.factor} pixels")
        VAEDecoderBuilder(vae, shapes).save(folder / "vae_decoder.mlpackage")
        built()
        packages.append(PackageInfo("vae_decoder", "vae_decoder.mlpackage", "vae_decoder", VAE_UNITS, "image",
                                    shapes.functions()))
    return packages


def deep_package(flow, folder: Path, shapes: DeepShapes, layout: Layout, report: Callable[[str], None],
                 built: Callable[[], None] = lambda: None) -> PackageInfo:
    """The deep block's stateful package; ``layout`` gives its rotary tables over ``shapes.tokens``."""
    deep = flow.blocks[-1]
    cos, sin = flow.rope(layout, shapes.text_len, pad=shapes.cache_length - shapes.text_len - shapes.tokens)
    report(f"deep block {deep.index}: {len(deep.attn_blocks)} layers, chunk {shapes.chunk}, "
           f"{shapes.rows} cache rows x {shapes.cache_length} positions")
    builder = DeepBlockBuilder(deep, shapes, np.array(cos), np.array(sin))
    builder.save(folder / "deep_block.mlpackage", {"com.starflow.block": str(deep.index)})
    built()
    return PackageInfo("deep_block", "deep_block.mlpackage", "deep_block", DEEP_UNITS, "channels_last",
                       builder.functions(), deep.index, deep.flips, deep.sees_text, shapes.guided,
                       builder.quantized_layers)


def shallow_packages(flow, folder: Path, batch: int, guided: bool, layout: Layout, tokens: int,
                     report: Callable[[str], None], built: Callable[[], None] = lambda: None) -> list[PackageInfo]:
    """One stateless package per shallow block, in sampling order, each over ``tokens`` (an image or a frame)."""
    config: FlowConfig = flow.config
    packages = []
    for block in reversed(flow.blocks[:-1]):
        if block.is_identity:
            continue
        sees = block.sees_text
        s_len = config.txt_size if sees else 0
        s_shapes = ShallowShapes(batch, guided and sees, s_len, config.txt_dim, tokens, config.token_channels)
        s_cos, s_sin = flow.rope(layout, s_len)
        name = f"shallow_block_{block.index}"
        report(f"shallow block {block.index}: {len(block.attn_blocks)} layers, {tokens} tokens")
        s_builder = ShallowBlockBuilder(block, s_shapes, np.array(s_cos), np.array(s_sin))
        s_builder.save(folder / f"{name}.mlpackage", {"com.starflow.block": str(block.index)})
        built()
        packages.append(PackageInfo(name, f"{name}.mlpackage", "shallow_block", SHALLOW_UNITS, "channels_first",
                                    s_builder.functions(), block.index, block.flips, sees, guided and sees,
                                    s_builder.quantized_layers))
    return packages


def is_guided(flow, options: ExportOptions) -> bool:
    deep = flow.blocks[-1]
    if options.guidance and not deep.sees_text:
        raise ExportError("--guidance needs a text- or class-conditioned model; this one has no text")
    return deep.sees_text and (options.guidance if options.guidance is not None else flow.config.cfg > 0)
