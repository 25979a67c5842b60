"""Whole clips through a STARFlow-V export (interpreter), each sampling step checked against MLX.

The packages sample a clip from noise ``z``, every Jacobi chunk solved to its exact fixed point (threshold 0,
as many iterations as the chunk has tokens), so the clip is the exact inverse of the packages' own steps. MLX's
forward flow in float32, teacher-forced on that clip (:mod:`starflow_mlx.coreml.clip_residual`), then gives back
the noise each step consumed: what differs from ``z`` is single-step float16 error, judged by the usual
tolerance however long the chain. One clip fills the training window; one runs past it, so the window slides and
the deep block re-encodes its context frames; one starts from a known frame, which must come back as given.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from starflow_mlx.coreml.clip_residual import clip_noise
from starflow_mlx.coreml.driver import InterpreterBackend, SampleStats
from starflow_mlx.coreml.manifest import ExportManifest
from starflow_mlx.coreml.checks import CHECK_CFG, Check, rel_error
from starflow_mlx.coreml.video_driver import VideoSampler

EXTRA_FRAMES = 2  # past the window: enough for two slides with one context frame


def clip_plan(manifest: ExportManifest) -> list[tuple[int, int]]:
    """(frames, known first frames) of each checked clip: the window, past it, and past it from a known frame."""
    window = manifest.video.window_frames
    return [(window, 0), (window + EXTRA_FRAMES, 0), (window + EXTRA_FRAMES, 1)]


def check_clips(folder: Path, manifest: ExportManifest, flows, rng) -> list[Check]:
    v, m = manifest.video, manifest
    deep = m.package(m.order[0])
    cfg = CHECK_CFG if deep.guided else 0.0
    # Exact fixed points: a chunk of k tokens is exact after k iterations, a shallow block after a frame's tokens.
    sampler = VideoSampler(folder, InterpreterBackend(folder, manifest), threshold=0.0, max_iter=m.chunk,
                           shallow_max_iter=v.frame_tokens)
    context = 1 if v.window_frames > 1 else 0
    checks = []
    for frames, known in clip_plan(manifest):
        if frames > v.window_frames and not context:
            continue
        z = rng.standard_normal((m.batch, frames, *m.latent_shape)).astype(np.float32)
        text = uncond = None
        if m.text_length:
            text = rng.standard_normal((m.batch, m.text_length, m.text_dim)).astype(np.float32)
            uncond = rng.standard_normal(text.shape).astype(np.float32) if deep.guided else None
        # Known frames: latents of the training noise level, as encoded frames are once noised.
        prefix = rng.standard_normal((m.batch, known, *m.latent_shape)).astype(np.float32) if known else None
        stats = SampleStats()
        ours = sampler.sample_video(z, text, uncond, cfg, context=prefix, context_frames=context or None,
                                    stats=stats)
        expected, half = (clip_noise(f, ours, text, uncond, cfg, known=known, context_frames=context or None)
                          for f in flows)
        error = rel_error(expected, z[:, known:])
        if known:  # the clip starts with the known frames, exactly
            error = max(error, rel_error(ours[:, :known], prefix))
        start = f" from {known} known frame{'s' * (known > 1)}" if known else ""
        what = (f"{frames}-frame clip{start}, MLX maps each step back to z ({stats.deep_calls} deep calls, "
                f"{stats.reencodes} slides)")
        checks.append(Check("video", what, error, rel_error(half, expected)))
    return checks


def check_denoiser(folder: Path, manifest: ExportManifest, flows, rng) -> list[Check]:
    """The package on a full window and on a shorter chunk (padded), then the host's chunked walk over a
    clip past the window, each against the MLX denoiser."""
    from starflow_mlx.sampling.denoise import learnable_denoise

    m, v = manifest, manifest.video
    pkg = m.package("denoiser")
    sampler = VideoSampler(folder, InterpreterBackend(folder, manifest))
    text = rng.standard_normal((m.batch, m.text_length, m.text_dim)).astype(np.float32) if pkg.sees_text else None
    y = None if text is None else mx.array(text)
    checks = []
    for frames in sorted({v.denoiser_frames, max(v.denoiser_frames - 1, 1)}, reverse=True):
        x = rng.standard_normal((m.batch, frames, *m.latent_shape)).astype(np.float32)
        expected, half = (np.array(f.denoiser(mx.array(x), y)) for f in flows)
        # A clip no longer than the package is one chunk: x - step * delta, the padding used when shorter.
        ours = (x - sampler.denoise(x, text)) / v.denoiser_step
        checks.append(Check(pkg.name, f"delta of {frames} random frames (of {v.denoiser_frames})",
                            rel_error(ours, expected), rel_error(half, expected)))
    frames = v.denoiser_frames + EXTRA_FRAMES
    x = rng.standard_normal((m.batch, frames, *m.latent_shape)).astype(np.float32)
    steps = min(v.denoiser_frames, frames)
    overlap = steps - 1 if v.denoiser_window is None else min(v.denoiser_window, steps - 1)
    expected, half = (np.array(learnable_denoise(f, mx.array(x), y, steps, overlap)) for f in flows)
    ours = sampler.denoise(x, text)
    # Compare the change the denoiser makes, not the latents it leaves mostly as they are.
    checks.append(Check(pkg.name, f"{frames}-frame clip in chunks vs learnable_denoise (x - out)",
                        rel_error(x - ours, x - expected), rel_error(x - half, x - expected)))
    return checks



def check_video_decoder(folder: Path, manifest: ExportManifest, source: Path, rng) -> list[Check]:
    """Latent frames decoded one per call, caches threaded, against ``VideoVAE.decode_frames`` frame by frame."""
    from starflow_mlx.io.model_folder import Manifest
    from starflow_mlx.io.video_vae import load_video_vae

    m = manifest
    path = source / Manifest.load(source).vae
    frames = 1 + EXTRA_FRAMES
    latents = rng.standard_normal((m.batch, frames, *m.latent_shape)).astype(np.float32)

    def run(dtype) -> list[np.ndarray]:
        vae = load_video_vae(path, dtype=dtype)
        return [np.array(chunk.astype(mx.float32)) for chunk in vae.decode_frames(mx.array(latents))]

    half = run("float16")
    expected = run("float32")
    scaled = latents.copy()
    scaled[:, 1:] *= m.video.temporal_scale  # decode_frames takes flow-space latents and undoes the scale
    sampler = VideoSampler(folder, InterpreterBackend(folder, manifest))
    ours = list(sampler.decode_frames(scaled))
    error = max(rel_error(o, e) for o, e in zip(ours, expected))
    fp16 = max(rel_error(h, e) for h, e in zip(half, expected))
    return [Check("vae_decoder", f"{frames} latent frames one per call vs decode_frames", error, fp16)]


def check_video_encoder(folder: Path, manifest: ExportManifest, source: Path, rng) -> list[Check]:
    """Pixel frames encoded 1, then 4 per call, caches threaded, against ``VideoVAE.encode`` (temporally scaled)."""
    from starflow_mlx.io.model_folder import Manifest
    from starflow_mlx.io.video_vae import load_video_vae

    m = manifest
    path = source / Manifest.load(source).vae
    shape = m.package("vae_encoder").functions["first"].inputs[0].shape
    pixels = rng.uniform(-1, 1, (shape[0], 1 + 4 * EXTRA_FRAMES, *shape[2:])).astype(np.float32)

    def run(dtype) -> np.ndarray:
        latents = np.array(load_video_vae(path, dtype=dtype).encode(mx.array(pixels)))
        latents[:, 1:] *= m.video.temporal_scale
        return latents

    half = run("float16")
    expected = run("float32")
    ours = VideoSampler(folder, InterpreterBackend(folder, manifest)).encode_frames(pixels)
    return [Check("vae_encoder", f"{pixels.shape[1]} pixel frames (1, then 4 per call) vs VideoVAE.encode",
                  rel_error(ours, expected), rel_error(half, expected))]
