"""A Core ML export's manifest checked against its packages before anything is predicted.

The manifest is a file anyone can edit, and Core ML aborts the process on an input whose shape its
package does not declare. So every function the manifest describes must be the one the package
declares (read from the package's specification; nothing runs), and the values the host loop
takes from the manifest (noise shape, chunk, text shape, the deep block's cache length) must be
the ones those functions take. A mismatch is one :class:`ManifestError` line.
"""

from __future__ import annotations

import math
from pathlib import Path

from starflow_mlx.coreml.manifest import ExportManifest, ManifestError, PackageInfo

DTYPES = {"float16": "FLOAT16", "float32": "FLOAT32", "int32": "INT32"}


def signature_problems(pkg: PackageInfo, program) -> list[str]:
    """Where the manifest's functions of ``pkg`` differ from what the package ``program`` declares."""
    problems = []
    for fn, info in pkg.functions.items():
        if fn not in program.functions:
            problems.append(f"{pkg.name}: function {fn} is missing")
            continue
        sig = program.signature(fn)
        for kind, declared in (("inputs", info.inputs), ("outputs", info.outputs), ("states", info.states)):
            want = {t.name: (DTYPES[t.dtype], tuple(t.shape)) for t in declared}
            if sig[kind] != want:
                problems.append(f"{pkg.name}.{fn} {kind}: package {sig[kind]}, manifest {want}")
    return problems


def _shape(pkg: PackageInfo, fn: str, name: str) -> tuple[int, ...] | None:
    info = pkg.functions.get(fn)
    tensor = info.input(name) if info is not None else None
    return tuple(tensor.shape) if tensor is not None else None


def value_problems(m: ExportManifest) -> list[str]:
    """Where the values the driver reads disagree with the functions the manifest declares."""
    deep = m.package(m.order[0])
    problems = [] if deep.role == "deep_block" else [f"{deep.name}, first in 'order', is a {deep.role}, not the deep "
                                                     "block"]
    rows = m.batch * (2 if deep.guided else 1)
    wanted = [(deep, "step", "tokens", (m.batch, m.chunk, m.token_channels))]
    if deep.sees_text:
        wanted.append((deep, "encode_text", "text", (rows, m.text_length, m.text_dim)))
    for name in m.order[1:]:
        pkg = m.package(name)
        if pkg.role != "shallow_block":
            problems.append(f"{name} in 'order' is a {pkg.role}, not a shallow block")
            continue
        fn = next(iter(pkg.functions), "main")
        wanted.append((pkg, fn, "x", (m.batch, m.token_channels, 1, m.tokens)))
    for pkg in m.packages:
        main = next(iter(pkg.functions), "main")
        if pkg.role == "vae_decoder":
            wanted.append((pkg, main, "latents", (m.batch, *m.latent_shape)))
        elif pkg.role == "video_vae_decoder":
            for fn in pkg.functions:
                wanted.append((pkg, fn, "latents", (m.batch, *m.latent_shape)))
        elif pkg.role == "video_vae_encoder" and m.video is not None:
            f, (h, w, _) = m.video.pixel_factor, m.latent_shape
            for fn, count in (("first", 1), ("step", m.video.frames_per_latent)):
                wanted.append((pkg, fn, "pixels", (m.batch, count, h * f, w * f, 3)))
        elif pkg.role == "text_encoder":
            wanted.append((pkg, main, "input_ids", (rows, m.text_length)))
        elif pkg.role == "denoiser" and m.video is not None:
            wanted.append((pkg, main, "x", (m.batch, m.token_channels, 1, m.video.denoiser_frames * m.tokens)))
    for pkg, fn, name, shape in wanted:
        declared = _shape(pkg, fn, name)
        if declared != shape:
            problems.append(f"{pkg.name}.{fn} takes {name} {declared}, the manifest's values give {shape}")
    # The deep block's cache: the text, the image (or window of frames) in whole chunks, a video's overhang.
    span = m.tokens * (m.video.window_frames if m.video else 1)
    needed = (m.text_length if deep.sees_text else 0) + math.ceil(span / m.chunk) * m.chunk
    needed += m.chunk if m.video else 0
    states = deep.functions["step"].states if "step" in deep.functions else []
    held = min((s.shape[2] if len(s.shape) == 4 else 0 for s in states), default=0)  # (rows, heads, positions, dim)
    if held < needed:
        problems.append(f"{deep.name}'s cache holds {held} positions, the manifest's values need {needed}")
    return problems


def check_export(folder: str | Path, m: ExportManifest, programs: dict) -> None:
    """Refuse an export whose manifest does not describe its packages (``programs``: name -> parsed package)."""
    problems = [problem for pkg in m.packages for problem in signature_problems(pkg, programs[pkg.name])]
    problems += value_problems(m)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(f"{folder}: the manifest does not match its packages: {problems[0]}{more}: re-export "
                            "the model")
