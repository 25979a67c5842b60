"""STARFlow-V packages: the deep block over one window of frames, the shallow blocks and the Wan2.2 VAE encoder
and decoder over one frame.

The shallow blocks of STARFlow-V are frame-local, so their packages take one
latent frame per call (the image shallow-block builder at the frame's token
count). The deep block is temporal-causal: its cache holds the text and one
training window of frames; a longer video restarts the cache with the text and
the last context frames, which is the same ``step`` function run on those
tokens from position ``text_length`` (no separate program is needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from starflow_mlx.config import FlowConfig
from starflow_mlx.coreml.builder import ExportError, to_numpy
from starflow_mlx.coreml.deep_block import DeepShapes
from starflow_mlx.coreml.manifest import (VAE_FRAMES_PER_LATENT, ExportManifest, PackageInfo, VideoContract,
                                          label_steps)
from starflow_mlx.coreml.packages import (ExportOptions, component_packages, deep_package, from_model_manifest,
                                          is_guided, resolve_chunk, shallow_packages)
from starflow_mlx.models.starflow import Layout
from starflow_mlx.sampling.denoise import DENOISER_STEP

FRAME_RULE = f"1 + {VAE_FRAMES_PER_LATENT}k pixel frames; latent frames = (frames - 1) / {VAE_FRAMES_PER_LATENT} + 1"
PIXEL_FRAME_RULE = "any number of frames; latent frames = frames (pixel space, no VAE)"
MAX_CONTEXT_FRAMES = 16  # upstream's default cap on re-encoded frames


def window_frames(config: FlowConfig) -> int:
    """Latent frames the deep block attends to at once (the training length)."""
    return config.local_attn_window or config.num_frames


def frame_size(config: FlowConfig, aspect_ratio: str | None) -> tuple[str, int, int]:
    """(aspect ratio, latent height, latent width) of one frame."""
    from starflow_mlx.pipelines.prompts import latent_size

    ratio = aspect_ratio or ("16:9" if config.mix_aspect else "1:1")
    try:
        h, w = latent_size(config, ratio)
    except ValueError as exc:
        raise ExportError(f"--aspect-ratio: {exc}") from None
    return ratio, h, w


def build_video_packages(flow, folder: Path, source: str, source_folder: Path, options: ExportOptions,
                         model_manifest, report: Callable[[str], None]) -> ExportManifest:
    config: FlowConfig = flow.config
    if options.height is not None or options.width is not None:
        raise ExportError("--height/--width are for image models; size a video export with --aspect-ratio")
    ratio, lat_h, lat_w = frame_size(config, options.aspect_ratio)
    p = config.patch_size
    grid = (lat_h // p, lat_w // p)
    frame = grid[0] * grid[1]
    window = window_frames(config)
    span = window * frame
    chunk = resolve_chunk(options.chunk, frame, config.sos, unit="frame")
    guided = is_guided(flow, options)
    deep = flow.blocks[-1]
    text_len = config.txt_size if deep.sees_text else 0
    shapes = DeepShapes(options.batch, guided, text_len, config.txt_dim, span, chunk, config.token_channels,
                        len(deep.attn_blocks), deep.kv_heads, deep.head_dim, deep.channels, pad=chunk)
    c = config.token_channels
    packages = [deep_package(flow, folder, shapes, Layout(options.batch, window, grid[0], grid[1], c, False), report)]
    frame_layout = Layout(options.batch, 1, grid[0], grid[1], c, True)
    packages += shallow_packages(flow, folder, options.batch, guided, frame_layout, frame, report)
    order = [p.name for p in packages]
    denoiser = {}
    if "learnable_self_denoiser" in flow:
        packages.append(denoiser_package(flow, folder, options.batch, grid, window, report))
        denoiser = dict(denoiser_frames=window, denoiser_window=config.denoiser_window, denoiser_step=DENOISER_STEP)
    if model_manifest is not None:
        packages += component_packages(source_folder, folder, model_manifest, options.batch * (2 if guided else 1),
                                       config.txt_size, report, vae_latents=None)
        if model_manifest.vae:
            packages += video_vae_packages(source_folder / model_manifest.vae, folder, options.batch, (lat_h, lat_w),
                                           report)
    pixel_space = model_manifest is not None and not model_manifest.vae
    factor = 1 if pixel_space else max(config.vae_factor, 1)
    video = VideoContract(ratio, PIXEL_FRAME_RULE if pixel_space else FRAME_RULE, factor,
                          float(config.vae_temporal_scale or 1.0), frame, window,
                          min(MAX_CONTEXT_FRAMES, window - 1), **denoiser, noise_std=float(config.noise_std),
                          context_order=order[:0:-1], **prompt_templates(config, ratio), pixel_space=pixel_space)
    manifest = ExportManifest(
        source=source, kind=model_manifest.kind if model_manifest else None, batch=options.batch,
        latent_shape=[lat_h, lat_w, config.in_channels], patch_size=p, token_grid=list(grid), token_channels=c,
        text_length=text_len, text_dim=config.txt_dim if text_len else 0, guided=guided,
        default_cfg=float(config.cfg) if guided else 0.0, chunk=chunk, sos=config.sos,
        start_token=to_numpy(deep.sos_embed).reshape(-1).tolist(), order=order, packages=packages,
        video=video, **from_model_manifest(model_manifest),
    )
    manifest.drive = video_drive_steps(manifest)
    return manifest


def prompt_templates(config: FlowConfig, aspect_ratio: str) -> dict[str, str]:
    """The training templates (fps, noise level, aspect ratio) with {prompt} and {fps} left for the app."""
    from starflow_mlx.pipelines.prompts import prepare_prompt

    sentinel = 987654321  # an fps no template contains, replaced by the placeholder
    video = prepare_prompt("{prompt}", config, aspect_ratio, sentinel).replace(str(sentinel), "{fps}")
    return {"prompt_template": video, "image_prompt_template": prepare_prompt("{prompt}", config, aspect_ratio, 0)}


def denoiser_package(flow, folder: Path, batch: int, grid: tuple[int, int], frames: int,
                     report: Callable[[str], None]) -> PackageInfo:
    from starflow_mlx.coreml.denoiser import COMPUTE_UNITS, DenoiserBuilder, DenoiserShapes

    config: FlowConfig = flow.config
    net = flow.learnable_self_denoiser
    text_len = config.txt_size if net.sees_text else 0
    shapes = DenoiserShapes(batch, text_len, config.txt_dim, frames, grid[0] * grid[1], config.token_channels,
                            config.temporal_causal, config.denoiser_window)
    cos, sin = flow.rope(Layout(batch, frames, grid[0], grid[1], config.token_channels, False), text_len)
    report(f"denoiser: {len(net.attn_blocks)} layers, {frames} frames x {shapes.frame_tokens} tokens")
    builder = DenoiserBuilder(net, shapes, np.array(cos), np.array(sin))
    builder.save(folder / "denoiser.mlpackage", {})
    return PackageInfo("denoiser", "denoiser.mlpackage", "denoiser", COMPUTE_UNITS, "channels_first",
                       shapes.functions(), sees_text=net.sees_text, quantized_layers=builder.quantized_layers)


def video_vae_packages(vae_folder: Path, folder: Path, batch: int, latent_hw: tuple[int, int],
                       report: Callable[[str], None]) -> list[PackageInfo]:
    """The Wan2.2 VAE decoder and, when the folder kept it, the encoder (image-to-video), one latent frame per call.

    Their weights stay float16: MLX never quantizes the VAE (``starflow quantize`` copies it as is), so
    ``--bits`` has no integers of its own to keep for them.
    """
    from starflow_mlx.coreml.wan_blocks import COMPUTE_UNITS, WanShapes
    from starflow_mlx.coreml.wan_decoder import WanDecoderBuilder, cache_shapes
    from starflow_mlx.io.video_vae import load_video_vae

    vae = load_video_vae(vae_folder)
    h, w = latent_hw
    f, ft = vae.factor, vae.temporal_factor
    shapes = WanShapes(batch, h, w, vae.latent_channels, f, ft, cache_shapes(vae, batch, h, w), encodes=False)
    report(f"video VAE decoder: one {h}x{w} latent frame -> {ft} frames of {h * f}x{w * f} pixels, "
           f"{len(shapes.caches)} cache entries")
    WanDecoderBuilder(vae, shapes).save(folder / "vae_decoder.mlpackage")
    packages = [PackageInfo("vae_decoder", "vae_decoder.mlpackage", "video_vae_decoder", COMPUTE_UNITS, "image",
                            shapes.functions())]
    if not vae.has_encoder:
        report("video VAE encoder: not in this model folder (converted without it), so no image-to-video package")
        return packages
    from starflow_mlx.coreml.wan_encoder import WanEncoderBuilder, encoder_cache_shapes

    shapes = WanShapes(batch, h, w, vae.latent_channels, f, ft, encoder_cache_shapes(vae, batch, h, w),
                       encodes=True)
    report(f"video VAE encoder: 1, then {ft} frames of {h * f}x{w * f} pixels -> one {h}x{w} latent frame, "
           f"{len(shapes.caches)} cache entries")
    WanEncoderBuilder(vae, shapes).save(folder / "vae_encoder.mlpackage")
    packages.append(PackageInfo("vae_encoder", "vae_encoder.mlpackage", "video_vae_encoder", COMPUTE_UNITS, "image",
                                shapes.functions()))
    return packages


def known_frame_steps(m: ExportManifest) -> list[str]:
    """Image-to-video in words: encode the known pixels, noise them, map them to deep tokens, prefill the cache."""
    v, n, L = m.video, m.video.frame_tokens, m.text_length
    if v.pixel_space:
        first = (f"Image-to-video in pixel space: the known frames (batch, P, {m.latent_shape[0]}, "
                 f"{m.latent_shape[1]}, {m.latent_shape[2]}) in [-1, 1], times {m.pixel_scale}, plus {v.noise_std} * "
                 "Gaussian noise, are the P known latent frames (P < T).")
    elif any(p.role == "video_vae_encoder" for p in m.packages):
        first = ("Image-to-video, vae_encoder (float16 weights: MLX never quantizes the VAE): pixels channels-last "
                 "float32 in [-1, 1], 1 + 4k frames (an image is 1); first(pixels: frame 0 (batch, 1, H', W', 3)) -> "
                 "latents (batch, H, W, C) and new_cache_j; then for each next 4 frames step(pixels, cache_j = the "
                 "previous call's new_cache_j) -> the next latent frame. Multiply latent frames 1.. by the temporal "
                 f"scale {v.temporal_scale} and add {v.noise_std} * Gaussian noise: the P known frames (P < T).")
    else:
        return []
    return [
        first,
        "Known tokens: patch each known frame as z; for each package in video.context_order (the shallow blocks "
        "forward, flipped within the frame where 'flip'): a, b = package(x; text where declared, guidance: [0]); "
        f"x = (x - b) / a. They are x[:, 1:1+P*{n}] of the deep block (its frame order); after encode_text, "
        f"keep = P*{n} if (P+1)*{n} <= {v.window_frames * n} else context_frames*{n}: step on [start_token; "
        f"x[:, 1+P*{n}-keep:P*{n}]] in chunks from position [{L}] (outputs unused), base = P*{n} - keep, and sample "
        f"from s = P*{n}. The video's first P latent frames are the known ones (no shallow inverse for them).",
    ]


def video_drive_steps(m: ExportManifest) -> list[str]:
    """The text-to-video loop in words, for other hosts (Swift, C++)."""
    v, deep = m.video, m.package(m.order[0])
    n, k, L = v.frame_tokens, m.chunk, m.text_length
    guidance = ", guidance: [cfg]" if deep.guided else ""
    steps = label_steps(m)
    if any(p.role == "text_encoder" for p in m.packages):
        rows = "[prompts; empty prompts]" if m.guided else "prompts"
        steps.append(f"text_encoder: fill video.prompt_template ({{prompt}}, {{fps}}; image_prompt_template for one "
                     f"frame) for {rows}, tokenize with tokenizer/ (pad and truncate to {L}) -> input_ids, "
                     "attention_mask (int32) -> features, the 'text' of the deep block.")
    steps += [
        f"Frames: {v.frame_rule}. z: Gaussian latents (batch {m.batch}, T, {m.latent_shape[0]}, "
        f"{m.latent_shape[1]}, {m.latent_shape[2]}) channels-last; each frame cut into {m.patch_size}x"
        f"{m.patch_size} patches -> {n} tokens in row-major order; frames concatenated -> (batch, T*{n}, "
        f"{m.token_channels}). A package whose 'flip' is true sees each frame's tokens reversed (within the frame).",
        f"{deep.name} (window of {v.window_frames} frames = {v.window_frames * n} tokens): state = make_state(); "
        f"encode_text(text{guidance and ' [cond; uncond]'}) fills positions 0..{L - 1}. x = [start_token; z]. "
        f"The window starts at token base = 0 and covers up to {v.window_frames * n} tokens. For chunk starts s "
        f"= base, base+{k}, ... inside the window: repeat {{a, b = step(tokens: x[:, s:s+{k}] zero-padded, "
        f"position: [{L} + s - base]{guidance}, state); x[:, s+1:s+1+{k}] = b + a * z[:, s:s+{k}]}} until "
        "mean((new-old)^2)/mean(new^2) < jacobi_threshold or jacobi_max_iter calls.",
        f"Past {v.window_frames} frames (window full at token s): keep = context_frames ({v.context_frames} by "
        f"default) * {n}; the text rows stay valid, so step on [start_token; x[:, s+1-keep:s]] (keep tokens) in "
        f"chunks of {k} from position [{L}] (outputs unused: this re-encodes the context), set base = s - keep "
        "and go on from s; the window again covers up to base + window tokens.",
        *known_frame_steps(m),
        f"Shallow packages, one latent frame per call (stateless, x: (batch, channels, 1, {n}) float16): for each "
        "finished frame, for each package in 'order' after the deep block: x = z; repeat {a, b = package(x); "
        f"x = b + a * z}} until the residual is below jacobi_threshold (at most {n} iterations are exact). "
        "They can run on frame t while the deep block works on frame t+1.",
        "Undo the patching per frame -> latents (batch, T, H, W, C).",
    ]
    if v.denoiser_frames:
        window = "steps - 1" if v.denoiser_window is None else f"min({v.denoiser_window}, steps - 1)"
        steps.append(
            f"denoiser (stateless, up to {v.denoiser_frames} frames per call): steps = min({v.denoiser_frames}, T), "
            f"overlap = {window}; chunks [s, min(s + steps, T)) for s = 0, steps - overlap, ... Each chunk: x: its "
            f"frames' tokens channels-first (batch, channels, 1, {v.denoiser_frames} * {n}) float16, zero-padded "
            f"past its frame count, frames: [count], text: the conditional features only (batch, text_dim, 1, "
            f"{L}) float16 -> delta; write x - {v.denoiser_step} * delta back for the chunk's frames after the first "
            "'overlap' (all of them in the first chunk), then go on with the updated latents; skip chunks that "
            "would write nothing.")
    if any(p.role == "video_vae_decoder" for p in m.packages):
        steps.append(f"vae_decoder (float16 weights: MLX never quantizes the VAE): divide latent frames 1.. by "
                     f"the temporal scale {v.temporal_scale}; then "
                     "first(latents: frame 0 (batch, H, W, C) float32) -> frames (1 pixel frame) and new_cache_j; "
                     "for each later latent frame step(latents, cache_j = the previous call's new_cache_j) -> "
                     f"frames ({v.pixel_factor}x larger, 4 pixel frames) and new_cache_j. Pixels are float32 in "
                     "about [-1, 1], not clipped.")
    elif v.pixel_space:
        steps.append(f"Pixel space: frames = latents / {m.pixel_scale}, in about [-1, 1].")
    else:
        steps.append(f"Divide latent frames 1.. by the temporal scale {v.temporal_scale} before a VAE decode (no "
                     "VAE decoder in this export: a flow-only folder).")
    return steps
