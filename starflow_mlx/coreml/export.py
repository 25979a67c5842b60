"""Export a model folder to Core ML packages plus ``manifest.json`` (written whole, or not at all)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from starflow_mlx.advice import option_error
from starflow_mlx.config import FlowConfig
from starflow_mlx.coreml.builder import ExportError, to_numpy
from starflow_mlx.coreml.deep_block import DeepShapes
from starflow_mlx.coreml.manifest import ExportManifest, drive_steps
# ExportOptions is imported from here by callers, as before the shared parts moved to packages.py.
from starflow_mlx.coreml.packages import (ExportOptions, component_packages, deep_package, from_model_manifest,
                                          is_guided, resolve_chunk, shallow_packages)
from starflow_mlx.coreml.video_export import build_video_packages
from starflow_mlx.models.starflow import Layout
from starflow_mlx.io.staging import check_output, staged_folder


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
    from starflow_mlx.io.model_folder import MANIFEST, Manifest

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
    from starflow_mlx.io.memory import image_bytes, memory_limit

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


def load_for_export(folder: Path, options: ExportOptions):
    """The MLX flow to export: as stored, or quantized now with ``--bits`` (same values MLX would use)."""
    from starflow_mlx.io.loading import load_flow

    config = FlowConfig.load(folder / "config.json")
    check_supported(config)
    if options.bits is None:
        return load_flow(folder)
    if config.quantization:
        raise ExportError(f"{folder} is already quantized: drop --bits (its quantized weights are exported as they are)")
    from starflow_mlx.quantize.quantize_folder import quantize_flow

    flow, _ = quantize_flow(folder, options.bits, options.group_size)
    return flow


def build_packages(flow, folder: Path, source: str, source_folder: Path, options: ExportOptions, model_manifest,
                   report: Callable[[str], None], progress: Callable[..., None] | None = None) -> ExportManifest:
    """Write every package into ``folder`` and return the manifest (not yet saved); ``progress`` counts packages
    (a video export reports the whole build as one step)."""
    config: FlowConfig = flow.config
    if options.batch < 1:
        raise option_error(ExportError, "batch", f" must be at least 1, got {options.batch}")
    if config.is_video:
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
    ``force`` replaces an ``output`` this project wrote (the rule of :mod:`starflow_mlx.io.staging`).
    """
    from starflow_mlx.io.resolve import resolve_model

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
