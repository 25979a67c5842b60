"""Checks an export without a Mac: structure with coremltools, numbers with the numpy interpreter vs MLX.

Numbers: every package runs from its saved files on random inputs and is
compared with the MLX model it came from, in float32; a shallow block is also
inverted by the driver's whole-sequence Jacobi loop, and the deep block runs a
few chunks with its state threaded through, including a rerun of one chunk as
Jacobi does. Errors are ``max|ours - mlx| / max|mlx|``.

Each comparison is a :class:`~starflow_mlx.coreml.checks.Check`, whose tolerance comes from the float16
error model stated there.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from starflow_mlx.coreml.builder import coremltools
from starflow_mlx.coreml.checks import CHECK_CFG, Check, VerificationError, rel_error
from starflow_mlx.coreml.driver import InterpreterBackend, Sampler, SampleStats, channels_first, channels_last
from starflow_mlx.coreml.interpreter import Program
from starflow_mlx.coreml.manifest import COMPUTE_UNITS_KEY, ROLE_KEY, ExportManifest, PackageInfo
from starflow_mlx.coreml.manifest_check import signature_problems
from starflow_mlx.io.weights import cast_floats
from starflow_mlx.models.starflow import Layout
from starflow_mlx.sampling.guidance import guide

def in_dtype(module, dtype):
    """``module``'s float parameters cast to ``dtype`` in place (quantized integers untouched)."""
    module.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                           module.parameters()))
    return module


def float16_copy(flow):
    """An independent float16 copy of the flow (quantized layers rebuilt from its config)."""
    from starflow_mlx.models.starflow import STARFlow
    from starflow_mlx.quantize.policy import apply_quantization

    copy = STARFlow(flow.config)
    if flow.config.quantization:
        apply_quantization(copy, flow.config.quantization)
    copy.update(flow.parameters())
    in_dtype(copy, mx.float16)
    mx.eval(copy.parameters())
    return copy


# -- structure -----------------------------------------------------------------------------


def structural_problems(folder: Path, manifest: ExportManifest, flow=None) -> list[str]:
    """Everything in the packages that disagrees with the manifest (empty when all is well)."""
    ct = coremltools()
    problems: list[str] = []
    for pkg in manifest.packages:
        path = folder / pkg.file
        try:
            model = ct.models.MLModel(str(path), skip_model_load=sys.platform != "darwin")
        except Exception as exc:  # coremltools raises bare Exceptions for unreadable packages
            problems.append(f"{pkg.name}: coremltools cannot load {path.name} ({str(exc).splitlines()[0]})")
            continue
        meta = dict(model.get_spec().description.metadata.userDefined)
        if meta.get(COMPUTE_UNITS_KEY) != pkg.compute_units:
            problems.append(f"{pkg.name}: package hints {meta.get(COMPUTE_UNITS_KEY)}, manifest {pkg.compute_units}")
        if meta.get(ROLE_KEY) != pkg.role:
            problems.append(f"{pkg.name}: package role {meta.get(ROLE_KEY)}, manifest {pkg.role}")
        program = Program(path)
        problems += signature_problems(pkg, program)
        for fn in pkg.functions:
            if fn in program.functions:
                problems += _quantization_problems(pkg, fn, program, flow)
        if pkg.role == "deep_block":
            declared = {s.name for f in model.get_spec().description.functions for s in f.state}
            declared |= {s.name for s in model.get_spec().description.state}
            wanted = {s.name for info in pkg.functions.values() for s in info.states}
            if declared != wanted:
                problems.append(f"{pkg.name}: declares states {sorted(declared)}, manifest {sorted(wanted)}")
    return problems


def _quantization_problems(pkg: PackageInfo, fn: str, program: Program, flow) -> list[str]:
    function = program.functions[fn]
    ops = function.block_specializations[function.opset].operations
    constexprs = [op for op in ops if op.type == "constexpr_blockwise_shift_scale"]
    problems = []
    if fn in ("step", "main") and len(constexprs) != pkg.quantized_layers:
        problems.append(f"{pkg.name}.{fn}: {len(constexprs)} quantized constants, manifest {pkg.quantized_layers}")
    if flow is not None and (pkg.block is not None or pkg.role == "denoiser") and fn in ("step", "main"):
        import mlx.nn as nn

        block = flow.learnable_self_denoiser if pkg.role == "denoiser" else flow.blocks[pkg.block]
        # Only the deep block's step runs without the text projection (encode_text has it).
        skip = () if pkg.role in ("shallow_block", "denoiser") and pkg.sees_text else ("proj_txt",)
        expected = sum(1 for path, m in block.named_modules()
                       if isinstance(m, nn.QuantizedLinear) and not path.startswith(skip))
        if expected != len(constexprs):
            problems.append(f"{pkg.name}.{fn}: {len(constexprs)} quantized constants, the MLX block has {expected}")
    from coremltools.proto import MIL_pb2

    for op in constexprs:
        data_type = MIL_pb2.DataType.Name(op.inputs["data"].arguments[0].value.type.tensorType.dataType)
        if data_type not in ("UINT4", "UINT8"):
            problems.append(f"{pkg.name}.{fn}: quantized constant stored as {data_type}")
    return problems


# -- numbers -------------------------------------------------------------------------------
def sequence(manifest: ExportManifest, pkg: PackageInfo) -> tuple[Layout, int]:
    """The token layout a flow package was exported for, and its token count (a video's deep block: a window)."""
    h, w = manifest.token_grid
    c, video = manifest.token_channels, manifest.video
    if video is None:
        return Layout(manifest.batch, 0, h, w, c, False), manifest.tokens
    if pkg.role == "shallow_block":
        return Layout(manifest.batch, 1, h, w, c, True), manifest.tokens
    return Layout(manifest.batch, video.window_frames, h, w, c, False), video.window_frames * manifest.tokens


class _Reference:
    """MLX ``(a, b)`` of a block (float32 out), through the same cache path the samplers use."""

    def __init__(self, flow, manifest: ExportManifest, pkg: PackageInfo):
        self.block = flow.blocks[pkg.block]
        self.text_len = manifest.text_length if pkg.sees_text else 0
        layout, self.tokens = sequence(manifest, pkg)
        pad = 0
        if pkg.role == "deep_block":
            pad = pkg.functions["step"].states[0].shape[2] - self.text_len - self.tokens
        self.cos, self.sin = flow.rope(layout, self.text_len, pad=pad)
        self.rows = manifest.batch * (2 if pkg.guided else 1)
        self.cache = self.block.new_cache(self.rows, self.text_len + self.tokens + pad)

    def encode(self, text: np.ndarray | None) -> None:
        if self.text_len:
            self.block.encode_text(mx.array(text), self.cache, self.cos, self.sin)

    def step(self, tokens: np.ndarray, position: int, cfg: float | None) -> tuple[np.ndarray, np.ndarray]:
        reps = self.rows // tokens.shape[0]
        a, b = self.block.step(mx.array(np.concatenate([tokens] * reps)), self.cache,
                               mx.array([position], dtype=mx.int32), self.cos, self.sin)
        if cfg is not None:
            a, b = guide(a, b, cfg)
        n = tokens.shape[0]
        return np.array(a[:n].astype(mx.float32)), np.array(b[:n].astype(mx.float32))

    def affine(self, x: np.ndarray, cfg: float | None) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` of every token of ``x`` (B, N, c), aligned so that ``z = (x - b) / a``."""
        block, batch, c = self.block, x.shape[0], x.shape[2]
        if block.use_sos:
            start = np.array(block.start_token(1).astype(mx.float32))
            tokens = np.concatenate([np.broadcast_to(start, (batch, 1, c)), x[:, :-1]], 1)
        else:
            tokens = x
        a, b = self.step(tokens.astype(np.float32), self.text_len, cfg)
        if not block.use_sos:
            # Token 0 passes through; the step at t predicts token t + 1.
            a = np.concatenate([np.ones_like(a[:, :1]), a[:, :-1]], axis=1)
            b = np.concatenate([np.zeros_like(b[:, :1]), b[:, :-1]], axis=1)
        return a, b


def _pair_error(ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> float:
    return max(rel_error(ours[0], ref[0]), rel_error(ours[1], ref[1]))


def _text(rng, manifest: ExportManifest, rows: int) -> np.ndarray:
    return rng.standard_normal((rows, manifest.text_length, manifest.text_dim)).astype(np.float32)


def check_shallow(folder, manifest, pkg, flows, rng) -> list[Check]:
    backend = InterpreterBackend(folder, manifest)
    ref, half = (_Reference(f, manifest, pkg) for f in flows)
    batch, n, c = manifest.batch, manifest.tokens, manifest.token_channels
    x_true = rng.standard_normal((batch, n, c)).astype(np.float32)
    text = _text(rng, manifest, ref.rows) if pkg.sees_text else None
    cfg = CHECK_CFG if pkg.guided else None
    ref.encode(text)
    half.encode(text)
    expected = ref.affine(x_true, cfg)
    fp16 = _pair_error(half.affine(x_true, cfg), expected)
    inputs = {"x": channels_first(x_true)}
    if text is not None:
        inputs["text"] = channels_first(text)
    if pkg.guided:
        inputs["guidance"] = np.array([cfg], np.float32)
    out = backend.predict(pkg.name, inputs)
    forward = _pair_error((channels_last(out["a"]), channels_last(out["b"])), expected)
    # Invert with the driver's loop, run to the exact fixed point (one iteration per token), then
    # map the solution back with MLX: that backward error is what float16 costs, whereas the error
    # in x itself is that amplified by how the block's scales compound along the sequence.
    z = (x_true - expected[1]) / expected[0]
    stats = SampleStats()
    sampler = Sampler(folder, backend, threshold=0.0, shallow_max_iter=n)
    x = sampler.invert_shallow(pkg.name, z, text, cfg or 0.0, stats)
    a_back, b_back = ref.affine(x, cfg)
    backward = rel_error((x - b_back) / a_back, z)
    iterations = stats.shallow_iterations[pkg.name]
    return [Check(pkg.name, "forward (a, b) on random tokens", forward, fp16),
            Check(pkg.name, f"Jacobi inverse ({iterations} it.), MLX maps it back to z", backward, fp16)]


def check_deep(folder, manifest, pkg, flows, rng) -> list[Check]:
    backend = InterpreterBackend(folder, manifest)
    ref, half = (_Reference(f, manifest, pkg) for f in flows)
    batch, n, c, k = manifest.batch, ref.tokens, manifest.token_channels, manifest.chunk
    state = backend.make_state(f"{pkg.name}.step")
    if pkg.sees_text:
        text = _text(rng, manifest, ref.rows)
        backend.predict(f"{pkg.name}.encode_text", {"text": text}, state)
        ref.encode(text)
        half.encode(text)
    cfg = CHECK_CFG if pkg.guided else None
    starts = [0, 0] + [s for s in range(k, n, k)][:2]  # the first chunk twice: a Jacobi rerun overwrites its rows
    worst = fp16 = 0.0
    for start in starts:
        tokens = rng.standard_normal((batch, k, c)).astype(np.float32)
        position = ref.text_len + start
        inputs = {"tokens": tokens, "position": np.array([position], np.int32)}
        if pkg.guided:
            inputs["guidance"] = np.array([cfg], np.float32)
        out = backend.predict(f"{pkg.name}.step", inputs, state)
        expected = ref.step(tokens, position, cfg)
        worst = max(worst, _pair_error((out["a"], out["b"]), expected))
        fp16 = max(fp16, _pair_error(half.step(tokens, position, cfg), expected))
    what = f"{len(starts)} chunks of {k}, state threaded" + (", text prefix" if pkg.sees_text else "")
    return [Check(pkg.name, what, worst, fp16)]


def check_text_encoder(folder, manifest, pkg, source: Path, rng) -> list[Check]:
    from starflow_mlx.io.model_folder import Manifest
    from starflow_mlx.io.text_encoder import load_text_encoder

    encoder = load_text_encoder(source / Manifest.load(source).text_encoder)
    rows, length = pkg.functions["main"].inputs[0].shape
    mask = (np.arange(length)[None, :] < rng.integers(1, length + 1, size=(rows, 1))).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(0, encoder.config.vocab_size, size=(rows, length)), 0).astype(np.int32)

    def run(dtype) -> np.ndarray:
        return np.array(in_dtype(encoder.model, dtype)(mx.array(ids), mx.array(mask))) * mask[..., None]

    half = run(mx.float16)
    expected = run(mx.float32)
    out = InterpreterBackend(folder, manifest).predict(pkg.name, {"input_ids": ids, "attention_mask": mask})
    return [Check(pkg.name, "features of random tokens, padded rows", rel_error(out["features"], expected),
                  rel_error(half, expected))]


def check_vae_decoder(folder, manifest, pkg, source: Path, rng) -> list[Check]:
    from starflow_mlx.io.model_folder import Manifest
    from starflow_mlx.io.vae import load_vae

    vae = load_vae(source / Manifest.load(source).vae)
    latents = rng.standard_normal(pkg.functions["main"].inputs[0].shape).astype(np.float32)

    def run(dtype) -> np.ndarray:
        in_dtype(vae.model, dtype)
        return np.array(vae.decode(mx.array(latents)))

    half = run(mx.float16)
    expected = run(mx.float32)
    out = InterpreterBackend(folder, manifest).predict(pkg.name, {"latents": latents})
    return [Check(pkg.name, "pixels of random latents", rel_error(out["image"], expected), rel_error(half, expected))]


def verify_export(folder: str | Path, flow, *, source: Path | None = None, seed: int = 0,
                  report: Callable[[str], None] = lambda _: None) -> list[Check]:
    """Structural and numeric checks; raises :class:`VerificationError` on the first kind of failure.

    ``flow`` is the MLX model that was exported (cast to float32 here); ``source``
    (the model folder) is needed to check text-encoder and VAE packages.
    """
    folder = Path(folder)
    manifest = ExportManifest.load(folder)
    problems = structural_problems(folder, manifest, flow)
    if problems:
        raise VerificationError(f"export does not match its manifest: {problems[0]} ({len(problems)} problem(s))")
    report(f"structure: {len(manifest.packages)} packages load; shapes, states and compute-unit hints "
           "match the manifest")
    half = float16_copy(flow)
    cast_floats(flow, mx.float32)
    flows = (flow, half)
    rng = np.random.default_rng(seed)
    checks: list[Check] = []
    for pkg in manifest.packages:
        if pkg.role in ("denoiser", "video_vae_decoder", "video_vae_encoder"):
            continue  # checked with the video clips below
        if pkg.role in ("deep_block", "shallow_block"):
            check = check_deep if pkg.role == "deep_block" else check_shallow
            found = check(folder, manifest, pkg, flows, rng)
        else:
            if source is None:
                raise VerificationError(f"checking {pkg.name} needs the source model folder")
            check = check_text_encoder if pkg.role == "text_encoder" else check_vae_decoder
            found = check(folder, manifest, pkg, Path(source), rng)
        for item in found:
            report(item.line())
        checks += found
    if manifest.video is not None:
        from starflow_mlx.coreml.video_verify import (check_clips, check_denoiser, check_video_decoder,
                                                      check_video_encoder)

        found = check_clips(folder, manifest, flows, rng)
        if manifest.video.denoiser_frames:
            found += check_denoiser(folder, manifest, flows, rng)
        if any(p.role == "video_vae_decoder" for p in manifest.packages):
            if source is None:
                raise VerificationError("checking the video VAE decoder needs the source model folder")
            found += check_video_decoder(folder, manifest, Path(source), rng)
        if any(p.role == "video_vae_encoder" for p in manifest.packages):
            found += check_video_encoder(folder, manifest, Path(source), rng)
        for item in found:
            report(item.line())
        checks += found
    failed = [c for c in checks if not c.ok]
    if failed:
        worst = max(failed, key=lambda c: c.error / c.tolerance if np.isfinite(c.error) else np.inf)
        raise VerificationError(f"verification failed: {worst.package} {worst.what}: error {worst.error:.2e} "
                                f"> tolerance {worst.tolerance:.1e}")
    return checks
