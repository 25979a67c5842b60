"""Export a model folder to Core ML packages plus ``manifest.json`` (written whole, or not at all)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from starflow_mlx.advice import option_error, with_cli_message
from starflow_mlx.config import FlowConfig
from starflow_mlx.coreml.builder import ExportError, to_numpy
from starflow_mlx.coreml.deep_block import COMPUTE_UNITS as DEEP_UNITS
from starflow_mlx.coreml.deep_block import DeepBlockBuilder, DeepShapes
from starflow_mlx.coreml.manifest import ExportManifest, PackageInfo, drive_steps
from starflow_mlx.coreml.shallow_block import COMPUTE_UNITS as SHALLOW_UNITS
from starflow_mlx.coreml.shallow_block import ShallowBlockBuilder, ShallowShapes
from starflow_mlx.models.starflow import Layout
from starflow_mlx.staging import check_output, staged_folder

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


@dataclass
class ExportResult:
    folder: Path
    manifest: ExportManifest
    checks: list = field(default_factory=list)


def unsupported(what: str) -> ExportError:
    return ExportError(f"export-coreml supports image models and STARFlow-V; {what} is not supported")


def check_supported(config: FlowConfig) -> None:
    if config.is_video:
        # The packages are per frame (shallow) and per window (deep): that needs frame-local shallow
        # blocks, and a start token for the windowed Jacobi sampler.
        if config.num_blocks > 1 and not config.shallow_block_local:
            raise unsupported("a video model without frame-local shallow blocks")
        if not config.sos:
            raise unsupported("a video model without a start-of-sequence token")
        return
    if config.temporal_causal:
        raise unsupported("temporal_causal")
    if config.learnable_self_denoiser:
        raise unsupported("learnable_self_denoiser")


def _model_manifest(folder: Path):
    from starflow_mlx.model_folder import MANIFEST, Manifest

    return Manifest.load(folder) if (folder / MANIFEST).is_file() else None


def _pixel_factor(config: FlowConfig, folder: Path, model_manifest) -> int:
    """Image pixels per latent pixel: the VAE's factor for latent models, 1 in pixel space."""
    if model_manifest is None:
        return config.vae_factor if config.vae else 1
    if model_manifest.vae is None:
        return 1
    from starflow_mlx.models.sd_vae import VAEConfig

    return VAEConfig.load(folder / model_manifest.vae / "config.json").factor


def _latent_size(config: FlowConfig, factor: int, height: int | None, width: int | None) -> tuple[int, int]:
    step = factor * config.patch_size
    default = config.latent_size * factor
    sizes = []
    for name, value in (("--height", height), ("--width", width)):
        value = default if value is None else value
        if value <= 0 or value % step:
            raise ExportError(f"{name} {value} must be a positive multiple of {step} (VAE factor x patch size)")
        sizes.append(value // factor)
    check_export_memory(config, factor, *sizes)
    return sizes[0], sizes[1]


def check_export_memory(config: FlowConfig, factor: int, lat_h: int, lat_w: int) -> None:
    """Refuse, with the numbers, a size this machine cannot export: numpy would fail on a terabyte array, or the
    process be killed. The estimate is sampling's at that size plus the shallow packages' float16 causal mask
    over all tokens, built and then serialised (it grows with the square of the tokens)."""
    from starflow_mlx.memory import image_bytes, memory_limit

    total = memory_limit()
    side = max(lat_h, lat_w)
    tokens = (lat_h // config.patch_size) * (lat_w // config.patch_size) + config.txt_size
    need = None
    if side <= 4096:
        need = image_bytes(FlowConfig(**{**config.to_dict(), "latent_size": side})) + 2 * 2 * tokens**2
    if total is not None and (need is None or need > total):
        about = f"about {need / 2**30:.0f} GB" if need else "more memory than any machine has"
        raise ExportError(f"{lat_h * factor}x{lat_w * factor} pixels need {about} to export but "
                          f"{total / 2**30:.0f} GB is available: give a smaller --height/--width")


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


def load_for_export(folder: Path, options: ExportOptions):
    """The MLX flow to export: as stored, or quantized now with ``--bits`` (same values MLX would use)."""
    from starflow_mlx.loading import load_flow

    config = FlowConfig.load(folder / "config.json")
    check_supported(config)
    if options.bits is None:
        return load_flow(folder)
    if config.quantization:
        raise ExportError(f"{folder} is already quantized: drop --bits (its quantized weights are exported as they are)")
    from starflow_mlx.quantize.quantize_folder import quantize_flow

    flow, _ = quantize_flow(folder, options.bits, options.group_size)
    return flow


def component_packages(source: Path, folder: Path, model_manifest, text_rows: int, text_len: int,
                       report: Callable[[str], None], vae_latents: tuple[int, int, int] | None,
                       built: Callable[[], None] = lambda: None) -> list[PackageInfo]:
    """The text encoder (with its tokenizer copied next to it) and, given ``vae_latents`` (batch, h, w), the
    image VAE decoder of a full model folder. ``built()`` is called after each package."""
    packages = []
    if model_manifest.text_encoder:
        from starflow_mlx.coreml.text_encoder import COMPUTE_UNITS as TEXT_UNITS
        from starflow_mlx.coreml.text_encoder import TextEncoderBuilder, TextShapes
        from starflow_mlx.text_encoder import load_text_encoder

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
        from starflow_mlx.vae import load_vae

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


def build_packages(flow, folder: Path, source: str, source_folder: Path, options: ExportOptions, model_manifest,
                   report: Callable[[str], None], progress: Callable[..., None] | None = None) -> ExportManifest:
    """Write every package into ``folder`` and return the manifest (not yet saved); ``progress`` counts packages
    (a video export reports the whole build as one step)."""
    config: FlowConfig = flow.config
    if options.batch < 1:
        raise option_error(ExportError, "batch", f" must be at least 1, got {options.batch}")
    if config.is_video:
        from starflow_mlx.coreml.video_export import build_video_packages

        if progress:
            progress("packages", 0, 1)
        manifest = build_video_packages(flow, folder, source, source_folder, options, model_manifest, report)
        if progress:
            progress("packages", 1, 1)
        return manifest
    if options.aspect_ratio is not None:
        raise ExportError("--aspect-ratio is for video models; size an image export with --height/--width")
    factor = _pixel_factor(config, source_folder, model_manifest)
    lat_h, lat_w = _latent_size(config, factor, options.height, options.width)
    p = config.patch_size
    grid = (lat_h // p, lat_w // p)
    tokens = grid[0] * grid[1]
    if tokens < 2:
        raise ExportError(f"{lat_h}x{lat_w} latents make {tokens} token: export at least 2 tokens")
    shallow_count = sum(not block.is_identity for block in flow.blocks[:-1])
    components = bool(model_manifest.text_encoder) + bool(model_manifest.vae) if model_manifest else 0
    total, done = 1 + shallow_count + components, [0]

    def built() -> None:
        done[0] += 1
        if progress:
            progress("packages", done[0], total)

    if progress:
        progress("packages", 0, total)
    deep = flow.blocks[-1]
    chunk = resolve_chunk(options.chunk, tokens, config.sos)
    guided = is_guided(flow, options)
    text_len = config.txt_size if deep.sees_text else 0
    layout = Layout(options.batch, 0, grid[0], grid[1], config.token_channels, False)
    shapes = DeepShapes(options.batch, guided, text_len, config.txt_dim, tokens, chunk, config.token_channels,
                        len(deep.attn_blocks), deep.kv_heads, deep.head_dim, deep.channels)
    packages = [deep_package(flow, folder, shapes, layout, report, built)]
    packages += shallow_packages(flow, folder, options.batch, guided, layout, tokens, report, built)
    order = [p.name for p in packages]
    if model_manifest is not None:
        packages += component_packages(source_folder, folder, model_manifest, options.batch * (2 if guided else 1),
                                       config.txt_size, report, vae_latents=(options.batch, lat_h, lat_w),
                                       built=built)
    start = to_numpy(deep.sos_embed).reshape(-1).tolist() if config.sos else None
    manifest = ExportManifest(
        source=source, kind=model_manifest.kind if model_manifest else None, batch=options.batch,
        latent_shape=[lat_h, lat_w, config.in_channels], patch_size=p, token_grid=list(grid),
        token_channels=config.token_channels, text_length=text_len, text_dim=config.txt_dim if text_len else 0,
        guided=guided, default_cfg=float(config.cfg) if guided else 0.0, chunk=chunk, sos=config.sos,
        start_token=start, order=order, packages=packages,
        **from_model_manifest(model_manifest),
    )
    manifest.drive = drive_steps(manifest)
    return manifest


def export_coreml(model: str | Path, output: str | Path, options: ExportOptions | None = None, *,
                  verify: bool = False, report: Callable[[str], None] = lambda _: None,
                  force: bool = False, progress: Callable[..., None] | None = None) -> ExportResult:
    """Export ``model`` (a folder or 'demo') into the new folder ``output``; ``verify`` checks it numerically first.

    ``report`` gets one line per step; ``progress(label, done, total)`` counts packages, then verification.
    ``force`` replaces an ``output`` this project wrote (the rule of :mod:`starflow_mlx.staging`).
    """
    from starflow_mlx.resolve import resolve_model

    options = options or ExportOptions()
    if options.bits is not None and options.bits not in (4, 8):
        raise option_error(ExportError, "bits", f" must be 4 or 8, got {options.bits}")
    folder = resolve_model(model)
    output = Path(output)
    check_output(output, force, ExportError)
    flow = load_for_export(folder, options)
    model_manifest = _model_manifest(folder)
    with staged_folder(output, force, ExportError) as staging:
        manifest = build_packages(flow, staging, str(model), folder, options, model_manifest, report, progress)
        manifest.save(staging)
        checks = []
        if verify:
            from starflow_mlx.coreml.verify import verify_export

            if progress:
                progress("verify", 0, 1)
            checks = verify_export(staging, flow, source=folder, report=report)
            if progress:
                progress("verify", 1, 1)
    return ExportResult(output, manifest, checks)


def describe(manifest: ExportManifest) -> str:
    """One line per package: what it is and where it is meant to run."""
    lines = []
    for p in manifest.packages:
        quant = f", {p.quantized_layers} quantized linears" if p.quantized_layers else ""
        fns = ", ".join(p.functions)
        lines.append(f"  {p.file}: {p.role} [{fns}] for {p.compute_units}{quant}")
    return "\n".join(lines)
