"""Noise files: an image's or clip's exact noise under the flow (``starflow encode``), and reading them back.

A safetensors file holding ``noise`` (float32, (1, h, w, c) or (1, T, h, w, c)) and, for latent
models, ``latents`` (the VAE latents the noise came from). Its metadata records the model (its
name and a fingerprint of its config and weights), the prompt, the guidance weight, the aspect ratio and
frame rate, and the input's path and sha256. Files come from anyone: everything is checked
before use, and a damaged or foreign file is one clear error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlx.core as mx

FORMAT = "starflow-mlx-noise"
VERSION = "1"
MAX_BYTES = 1 << 30  # far above any real noise file (a 720p STARFlow-V clip's noise is about 100 MB)
MAX_TEXT = 10_000


class NoiseFileError(ValueError):
    """The noise file is missing, damaged, or does not belong to this model."""


def model_fingerprint(folder: Path, windows: int = 64, window: int = 1 << 16) -> str:
    """sha256 over the model's config.json and, for each weight file, its name, size and ``windows`` evenly spaced
    slices: two models with the same config but other weights differ, without reading gigabytes."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.rglob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}:{size}".encode())
        with open(path, "rb") as handle:
            for k in range(windows):
                handle.seek(size * k // windows)
                digest.update(handle.read(window))
    return digest.hexdigest()


def save_noise(path: str | Path, inversion, model: str, folder: Path, source: str, source_sha256: str,
               latent: bool, overwrite: bool = False) -> None:
    """Write ``inversion`` (``pipelines.inversion.Inversion``) to ``path`` atomically (over an existing file only
    with ``overwrite``)."""
    from starflow_mlx import __version__
    from starflow_mlx.io.staging import staged_file

    arrays = {"noise": inversion.noise.astype(mx.float32)}
    if latent:
        arrays["latents"] = inversion.data.astype(mx.float32)
    meta = {"format": FORMAT, "format_version": VERSION, "version": __version__, "model": model,
            "model_fingerprint": model_fingerprint(folder), "prompt": inversion.prompt, "cfg": repr(inversion.cfg),
            "aspect_ratio": inversion.aspect_ratio, "fps": str(inversion.fps), "source": source,
            "source_sha256": source_sha256}
    with staged_file(path, overwrite) as staging:
        # mx.save_safetensors appends .safetensors to names without it: give the staging file that name.
        named = staging.with_name(staging.name + ".safetensors")
        try:
            mx.save_safetensors(str(named), arrays, metadata=meta)
            named.replace(staging)
        finally:
            named.unlink(missing_ok=True)


def load_noise(path: str | Path) -> tuple[dict[str, mx.array], dict]:
    """(arrays, metadata) of a noise file, checked: one NoiseFileError line for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise NoiseFileError(f"noise file {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size > MAX_BYTES:
        raise NoiseFileError(f"{path} is larger than any noise file ({MAX_BYTES >> 20} MB): not a noise file")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError/ValueError with long texts on damaged files
        reason = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise NoiseFileError(f"cannot read noise file {path} ({reason}): make it again with starflow encode") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NoiseFileError(f"{path} is not a starflow-mlx noise file (make one with starflow encode)")
    if meta.get("format_version") != VERSION:
        raise NoiseFileError(f"{path} is a noise file of format {str(meta.get('format_version'))[:20]!r}: this "
                             f"version reads format {VERSION}")
    for key in ("model", "model_fingerprint", "prompt", "cfg", "aspect_ratio", "fps", "source", "source_sha256"):
        if not isinstance(meta.get(key), str) or len(meta[key]) > MAX_TEXT:
            raise NoiseFileError(f"{path} has damaged metadata ({key}): make it again with starflow encode")
    try:
        cfg, fps = float(meta["cfg"]), int(meta["fps"])
    except ValueError:
        raise NoiseFileError(f"{path} has damaged metadata (cfg or fps): make it again with starflow encode") from None
    if not 0 <= cfg <= 1000 or not 0 <= fps <= 120:
        raise NoiseFileError(f"{path} has damaged metadata (cfg or fps out of range)")
    noise = arrays.get("noise")
    if noise is None or set(arrays) - {"noise", "latents"}:
        raise NoiseFileError(f"{path} does not hold exactly a noise tensor (and latents): not a noise file")
    if noise.dtype != mx.float32 or noise.ndim not in (4, 5) or noise.shape[0] != 1:
        raise NoiseFileError(f"{path} holds noise of shape {tuple(noise.shape)} ({noise.dtype}): expected float32 "
                             "(1, h, w, c) or (1, T, h, w, c)")
    if not mx.all(mx.isfinite(noise)).item():
        raise NoiseFileError(f"{path} holds NaN or infinite noise: the file is damaged")
    latents = arrays.get("latents")
    if latents is not None and (latents.dtype != mx.float32 or latents.shape != noise.shape
                                or not mx.all(mx.isfinite(latents)).item()):
        raise NoiseFileError(f"{path} holds latents that do not match its noise: the file is damaged")
    return arrays, dict(meta, cfg=cfg, fps=fps)


def check_model(path: str | Path, meta: dict, noise: mx.array, pipe, model: str) -> None:
    """Refuse a noise file made with another model (its config differs) or of a shape it does not sample."""
    from starflow_mlx.pipelines.prompts import check_aspect_ratio, latent_size

    if meta["model_fingerprint"] != model_fingerprint(pipe.folder):
        raise NoiseFileError(f"{path} was encoded with the model {meta['model']}, not {model} (their config or "
                             "weights differ): decode it with that model, or encode the input again with this one")
    check_aspect_ratio(meta["aspect_ratio"])
    h, w = latent_size(pipe.config, meta["aspect_ratio"])
    if noise.ndim != (5 if pipe.VIDEO else 4) or noise.shape[-3:] != (h, w, pipe.config.in_channels):
        raise NoiseFileError(f"{path} holds noise of shape {tuple(noise.shape)}, which {model} does not sample: "
                             "the file is damaged")
