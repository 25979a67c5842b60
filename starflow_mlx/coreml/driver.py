"""Host-side sampling over an exported Core ML folder: sequential or Jacobi, overlapped across images.

The driver owns the loop the manifest describes; the packages only compute.
It talks to a small backend interface, so the same logic runs on Core ML
(macOS 15+) and, for tests on any system, on the numpy interpreter:

* ``backend.make_state(package)``: a fresh KV cache for a stateful package;
* ``backend.predict(function, inputs, state)``: run ``"package.function"``
  (``"package"`` alone means its default function) and return its outputs.

Images are sampled in two stages, the deep block (GPU) then the shallow
blocks (Neural Engine); :meth:`Sampler.sample_many` runs the stages on two
threads so the shallow blocks of one image overlap the deep block of the
next, the same pipelining a video would use frame by frame.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from starflow_mlx.coreml.manifest import ExportManifest, PackageInfo
from starflow_mlx.coreml.manifest_check import check_export


MAX_ITERATIONS = 1 << 16  # per chunk (at most its tokens are needed) or per shallow block (at most all tokens)


class DriverError(ValueError):
    """Inputs that do not fit the exported shapes, or a backend that cannot run here."""


class Backend(Protocol):
    def make_state(self, package: str) -> Any: ...

    def predict(self, function: str, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]: ...


def split_function(manifest: ExportManifest, function: str) -> tuple[PackageInfo, str]:
    name, _, fn = function.partition(".")
    package = manifest.package(name)
    if not fn:
        fn = "step" if "step" in package.functions else next(iter(package.functions))
    if fn not in package.functions:
        raise DriverError(f"package {name} has no function {fn!r}")
    return package, fn


class InterpreterBackend:
    """Runs the saved packages with the numpy interpreter (any system; slow, for checks)."""

    def __init__(self, folder: str | Path, manifest: ExportManifest | None = None):
        from starflow_mlx.coreml.interpreter import Program

        self.folder = Path(folder)
        self.manifest = manifest or ExportManifest.load(folder)
        self._programs = {p.name: Program(self.folder / p.file) for p in self.manifest.packages}
        check_export(self.folder, self.manifest, self._programs)

    def make_state(self, package: str) -> dict[str, np.ndarray]:
        pkg, fn = split_function(self.manifest, package)
        return self._programs[pkg.name].make_state(fn)

    def predict(self, function, inputs, state=None):
        pkg, fn = split_function(self.manifest, function)
        return self._programs[pkg.name].run(fn, inputs, state)


@dataclass
class _OwnedState:
    function: str
    state: Any


class CoreMLBackend:
    """Runs the packages with Core ML through coremltools (macOS 15+), on each package's compute units."""

    def __init__(self, folder: str | Path, manifest: ExportManifest | None = None):
        if sys.platform != "darwin":
            raise DriverError("Core ML predictions need macOS 15+; elsewhere use InterpreterBackend(folder)")
        from starflow_mlx.coreml.builder import coremltools

        from starflow_mlx.coreml.interpreter import Program

        self._ct = coremltools()
        self.folder = Path(folder)
        self.manifest = manifest or ExportManifest.load(folder)
        # Core ML aborts on an input its package does not declare: the manifest is checked first (specs only).
        programs = {p.name: Program(self.folder / p.file) for p in self.manifest.packages}
        check_export(self.folder, self.manifest, programs)
        self._models: dict[tuple[str, str], Any] = {}

    def _model(self, pkg: PackageInfo, fn: str):
        key = (pkg.name, fn)
        if key not in self._models:
            ct = self._ct
            self._models[key] = ct.models.MLModel(str(self.folder / pkg.file), function_name=fn,
                                                  compute_units=getattr(ct.ComputeUnit, pkg.compute_units))
        return self._models[key]

    def make_state(self, package: str) -> _OwnedState:
        pkg, fn = split_function(self.manifest, package)
        return _OwnedState(f"{pkg.name}.{fn}", self._model(pkg, fn).make_state())

    def predict(self, function, inputs, state=None):
        pkg, fn = split_function(self.manifest, function)
        model = self._model(pkg, fn)
        if state is None:
            return model.predict(inputs)
        if state.function == f"{pkg.name}.{fn}":
            return model.predict(inputs, state.state)
        # A state belongs to the function model that made it: run this function on its own
        # fresh state and copy the buffers over (once per image, for the text prefix).
        own = model.make_state()
        out = model.predict(inputs, own)
        for info in pkg.functions[fn].states:
            state.state.write_state(info.name, own.read_state(info.name))
        return out


# -- the sampling loop ---------------------------------------------------------------------
def patchify(x: np.ndarray, p: int) -> np.ndarray:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), patch pixels ordered (row, column, channel)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(seq: np.ndarray, p: int, h: int, w: int) -> np.ndarray:
    b, _, pc = seq.shape
    c = pc // (p * p)
    x = seq.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def channels_first(seq: np.ndarray) -> np.ndarray:
    """(B, S, C) -> (B, C, 1, S)."""
    return np.ascontiguousarray(seq.transpose(0, 2, 1)[:, :, None, :])


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, 0, :].transpose(0, 2, 1))


def _residual(new: np.ndarray, old: np.ndarray) -> float:
    """Upstream's Jacobi residual: sum((new - old)^2) / sum(new^2)."""
    denom = float(np.sum(np.square(new)))
    return float(np.sum(np.square(new - old))) / denom if denom > 0 else 0.0


@dataclass
class SampleStats:
    deep_calls: int = 0
    chunk_iterations: list[int] = field(default_factory=list)
    shallow_iterations: dict[str, int] = field(default_factory=dict)
    reencodes: int = 0  # video: times the deep block's window slid


@dataclass
class _Request:
    z: np.ndarray
    text: np.ndarray | None
    cfg: float
    stats: SampleStats


class Sampler:
    """Samples latents from the exported flow: ``sample(z, text, text_uncond, cfg)``."""

    def __init__(self, folder: str | Path, backend: Backend | None = None, *, threshold: float | None = None,
                 max_iter: int | None = None, shallow_max_iter: int | None = None):
        self.folder = Path(folder)
        self.manifest = ExportManifest.load(folder)
        self.backend = backend if backend is not None else CoreMLBackend(folder, self.manifest)
        m = self.manifest
        self.threshold = m.jacobi_threshold if threshold is None else float(threshold)
        self.max_iter = m.jacobi_max_iter if max_iter is None else int(max_iter)
        self.shallow_max_iter = m.tokens if shallow_max_iter is None else int(shallow_max_iter)
        # Every iteration is a prediction: NaN (which never stops a chunk) and absurd counts are refused.
        if not 0 <= self.threshold < math.inf:
            raise DriverError(f"threshold must be a number 0 or more, got {self.threshold}")
        for name in ("max_iter", "shallow_max_iter"):
            if not 1 <= getattr(self, name) <= MAX_ITERATIONS:
                raise DriverError(f"{name} must be from 1 to {MAX_ITERATIONS}, got {getattr(self, name)}")

    # -- inputs ---------------------------------------------------------------------------
    _noise_axes = "batch, H, W, C"

    def _noise_shape(self, z: np.ndarray) -> tuple[int, ...]:
        return (self.manifest.batch, *self.manifest.latent_shape)

    def _request(self, z, text, text_uncond, cfg, stats) -> _Request:
        m = self.manifest
        z = np.asarray(z, np.float32)
        expected = self._noise_shape(z)
        if z.shape != expected:
            raise DriverError(f"z must be {expected} ({self._noise_axes}) as exported, got {z.shape}")
        deep = m.package(m.order[0])
        needs_text = any(m.package(n).sees_text for n in m.order)
        rows = None
        if needs_text:
            if text is None:
                raise DriverError(f"this model needs text features (batch, {m.text_length}, {m.text_dim})")
            text = np.asarray(text, np.float32)
            want = (m.batch, m.text_length, m.text_dim)
            if text.shape != want:
                raise DriverError(f"text must be {want}, got {text.shape}")
            rows = text
            if m.guided:
                if text_uncond is None:
                    raise DriverError("this export is guided: pass text_uncond (features of the empty prompt)")
                uncond = np.broadcast_to(np.asarray(text_uncond, np.float32), want)
                rows = np.concatenate([text, uncond], axis=0)
        weight = m.default_cfg if cfg is None else float(cfg)
        if weight and not deep.guided:
            raise DriverError("this export has no guidance: re-export a text model with --guidance to use cfg")
        return _Request(z, rows, weight, stats if stats is not None else SampleStats())

    # -- stages ---------------------------------------------------------------------------
    def _deep(self, req: _Request) -> np.ndarray:
        """Patchify and invert the deep block; returns token sequences (B, N, c) in natural order."""
        m = self.manifest
        pkg = m.package(m.order[0])
        seq = patchify(req.z, m.patch_size)
        z = seq[:, ::-1] if pkg.flip else seq
        x = self._invert_deep(pkg, np.ascontiguousarray(z), req)
        return x[:, ::-1] if pkg.flip else x

    def _shallow(self, seq: np.ndarray, req: _Request) -> np.ndarray:
        m = self.manifest
        for name in m.order[1:]:
            pkg = m.package(name)
            z = np.ascontiguousarray(seq[:, ::-1] if pkg.flip else seq)
            x = self._invert_shallow(pkg, z, req)
            seq = x[:, ::-1] if pkg.flip else x
        h, w = m.latent_shape[0], m.latent_shape[1]
        return unpatchify(np.ascontiguousarray(seq), m.patch_size, h, w)

    def _open_deep(self, pkg: PackageInfo, req: _Request):
        """A fresh KV cache with the text prefix written, and ``step(tokens, position) -> (a, b)`` on it."""
        state = self.backend.make_state(f"{pkg.name}.step")
        if pkg.sees_text:
            self.backend.predict(f"{pkg.name}.encode_text", {"text": req.text}, state)
        extra = {"guidance": np.array([req.cfg], np.float32)} if pkg.guided else {}

        def step(tokens: np.ndarray, position: int):
            req.stats.deep_calls += 1
            out = self.backend.predict(f"{pkg.name}.step", {"tokens": tokens.astype(np.float32),
                                                            "position": np.array([position], np.int32), **extra}, state)
            return out["a"].astype(np.float32), out["b"].astype(np.float32)

        return step

    def _solve_chunk(self, step, x_full: np.ndarray, z: np.ndarray, start: int, valid: int, position: int,
                     req: _Request) -> None:
        """Tokens start .. start+valid-1 into ``x_full`` (= [start token; x]) by Jacobi at cache ``position``."""
        batch, _, c = z.shape
        tokens = np.zeros((batch, self.manifest.chunk, c), np.float32)
        iterations = 1 if self.manifest.chunk == 1 else self.max_iter
        for it in range(iterations):
            tokens[:, :valid] = x_full[:, start:start + valid]
            a, b = step(tokens, position)
            new = b[:, :valid] + a[:, :valid] * z[:, start:start + valid]
            residual = _residual(new, x_full[:, start + 1:start + 1 + valid])
            x_full[:, start + 1:start + 1 + valid] = new
            if residual < self.threshold:
                break
        req.stats.chunk_iterations.append(it + 1)

    def _with_start_token(self, z: np.ndarray) -> np.ndarray:
        c = z.shape[2]
        start_token = np.asarray(self.manifest.start_token, np.float32).reshape(1, 1, c)
        return np.concatenate([np.broadcast_to(start_token, (z.shape[0], 1, c)), z], axis=1)

    def _invert_deep(self, pkg: PackageInfo, z: np.ndarray, req: _Request) -> np.ndarray:
        m = self.manifest
        n = z.shape[1]
        k, text_len = m.chunk, m.text_length if pkg.sees_text else 0
        step = self._open_deep(pkg, req)
        if not m.sos:
            # Token 0 passes through; step t-1 predicts token t from token t-1.
            x = np.empty_like(z)
            x[:, 0] = z[:, 0]
            for t in range(1, n):
                a, b = step(x[:, t - 1:t], text_len + t - 1)
                x[:, t] = b[:, 0] + a[:, 0] * z[:, t]
            return x
        x_full = self._with_start_token(z)
        for start in range(0, n, k):
            self._solve_chunk(step, x_full, z, start, min(k, n - start), text_len + start, req)
        return x_full[:, 1:]

    @staticmethod
    def _shallow_inputs(pkg: PackageInfo, req: _Request, cfg: float) -> dict[str, np.ndarray]:
        """A shallow package's text and guidance inputs, where it declares them."""
        extra: dict[str, np.ndarray] = {}
        if pkg.sees_text:
            extra["text"] = channels_first(req.text).astype(np.float16)
        if pkg.guided:
            extra["guidance"] = np.array([cfg], np.float16)
        return extra

    def _invert_shallow(self, pkg: PackageInfo, z: np.ndarray, req: _Request) -> np.ndarray:
        """Jacobi over the whole sequence: x <- b(x) + a(x) * z until the residual is small."""
        extra = self._shallow_inputs(pkg, req, req.cfg)
        x = z.copy()
        for it in range(self.shallow_max_iter):
            out = self.backend.predict(pkg.name, {"x": channels_first(x).astype(np.float16), **extra})
            new = channels_last(out["b"]).astype(np.float32) + channels_last(out["a"]).astype(np.float32) * z
            residual = _residual(new, x)
            x = new
            if residual < self.threshold:
                break
        req.stats.shallow_iterations[pkg.name] = it + 1
        return x

    # -- public ---------------------------------------------------------------------------
    def invert_shallow(self, package: str, z: np.ndarray, text: np.ndarray | None = None, cfg: float = 0.0,
                       stats: SampleStats | None = None) -> np.ndarray:
        """Invert one shallow package on ``z`` (batch, tokens, channels) in its token order.

        ``text`` stacks the package's text rows ([cond; uncond] when it is guided).
        """
        pkg = self.manifest.package(package)
        if pkg.role != "shallow_block":
            raise DriverError(f"{package} is not a shallow block")
        req = _Request(np.asarray(z, np.float32), text, float(cfg), stats if stats is not None else SampleStats())
        return self._invert_shallow(pkg, req.z, req)

    def sample(self, z, text=None, text_uncond=None, cfg: float | None = None,
               stats: SampleStats | None = None) -> np.ndarray:
        """Latents (batch, H, W, C) from Gaussian ``z`` of the same shape (already scaled by the caller)."""
        req = self._request(z, text, text_uncond, cfg, stats)
        return self._shallow(self._deep(req), req)

    def label_features(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """A class model's prompt (one of the manifest's classes) -> its label and the empty label, each
        (batch, text_length, text_dim), as the manifest's drive steps build them."""
        from starflow_mlx.pipelines.prompts import class_features

        m = self.manifest
        if not m.classes:
            raise DriverError(f"{self.folder} is not a class model: its prompts go through the text encoder")
        if prompt not in m.classes:
            raise DriverError(f"{prompt!r} is not one of this export's {len(m.classes)} classes, e.g. "
                              f"{', '.join(repr(c) for c in m.classes[:3])}")
        table = class_features(m.classes, m.words or None)
        rows = table[[m.classes.index(prompt), -1]]
        return tuple(np.ascontiguousarray(np.broadcast_to(r, (m.batch, *r.shape))) for r in rows)

    def text_features(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Tokenized prompts -> features with the text-encoder package (rows as the manifest exports them)."""
        return self.backend.predict("text_encoder", {"input_ids": np.asarray(input_ids, np.int32),
                                                     "attention_mask": np.asarray(attention_mask, np.int32)})["features"]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (batch, H, W, C) -> images (batch, H', W', 3) in about [-1, 1], VAE package or pixel scale."""
        names = {p.name for p in self.manifest.packages}
        if "vae_decoder" not in names:
            return np.asarray(latents, np.float32) / self.manifest.pixel_scale
        return self.backend.predict("vae_decoder", {"latents": np.asarray(latents, np.float32)})["image"]

    def sample_many(self, zs, texts=None, text_uncond=None, cfg: float | None = None,
                    stats: list[SampleStats] | None = None) -> list[np.ndarray]:
        """Several samples with the deep block of sample i+1 overlapping the shallow blocks of sample i."""
        texts = [None] * len(zs) if texts is None else list(texts)
        if len(texts) != len(zs):
            raise DriverError(f"got {len(zs)} noise tensors but {len(texts)} text features")
        stats = [SampleStats() for _ in zs] if stats is None else stats
        reqs = [self._request(z, t, text_uncond, cfg, s) for z, t, s in zip(zs, texts, stats)]
        with ThreadPoolExecutor(1, thread_name_prefix="deep") as deep, \
                ThreadPoolExecutor(1, thread_name_prefix="shallow") as shallow:
            deep_done = [deep.submit(self._deep, r) for r in reqs]
            finished = [shallow.submit(lambda f=f, r=r: self._shallow(f.result(), r)) for f, r in zip(deep_done, reqs)]
            return [f.result() for f in finished]
