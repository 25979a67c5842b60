"""What the Wan2.2 VAE encoder and decoder packages share: explicit causal caches and the common layers.

Activations are lists of per-frame NCHW float16 tensors (a chunk never holds
more than 4 frames), so a temporal convolution is a sum of 2-D convolutions
over its taps, as in the MLX model. Every cached layer reads its past from
input ``cache_j`` and writes its new past to output ``new_cache_j``, in the
MLX ``FeatureCache``'s call order, so ``j`` means the same entry on both sides.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starflow_mlx.coreml.builder import (Emitter, coremltools, convert, make_program, mil, quiet, set_metadata,
                                        to_numpy)
from starflow_mlx.coreml.manifest import COMPUTE_UNITS_KEY, ROLE_KEY, FunctionInfo, TensorInfo

COMPUTE_UNITS = "CPU_AND_GPU"

CacheShape = tuple[int, int, int, int]  # (frames, channels, height, width) of one entry


@dataclass(frozen=True)
class WanShapes:
    """One VAE package's calls: ``first`` on frame 0, ``step`` on each later one with the caches threaded through.

    The decoder (``encodes=False``) turns a latent frame into ``frames``; the encoder turns
    ``pixels`` (1, then ``frames_per_step`` of them) into a latent frame.
    """

    batch: int
    height: int  # latent rows of a frame
    width: int
    latent_channels: int
    factor: int  # pixels per latent cell
    frames_per_step: int  # pixel frames of every latent frame after the first
    caches: tuple[CacheShape, ...]
    encodes: bool

    def cache_infos(self) -> list[TensorInfo]:
        # An entry's frames stacked on the channel axis, oldest first.
        return [TensorInfo(f"cache_{j}", [self.batch, f * c, h, w], "float16")
                for j, (f, c, h, w) in enumerate(self.caches)]

    def functions(self) -> dict[str, FunctionInfo]:
        latents = TensorInfo("latents", [self.batch, self.height, self.width, self.latent_channels], "float32")

        def pixels(n):
            return TensorInfo("pixels" if self.encodes else "frames",
                              [self.batch, n, self.height * self.factor, self.width * self.factor, 3], "float32")

        caches = self.cache_infos()
        updated = [TensorInfo(f"new_{t.name}", t.shape, t.dtype) for t in caches]
        if self.encodes:
            return {"first": FunctionInfo([pixels(1)], [latents, *updated]),
                    "step": FunctionInfo([pixels(self.frames_per_step), *caches], [latents, *updated])}
        return {"first": FunctionInfo([latents], [pixels(1), *updated]),
                "step": FunctionInfo([latents, *caches], [pixels(self.frames_per_step), *updated])}


def mlx_cache_shapes(entries) -> tuple[CacheShape, ...]:
    """(frames, C, H, W) of MLX ``FeatureCache`` entries (B, frames, H, W, C)."""
    return tuple((int(e.shape[1]), int(e.shape[4]), int(e.shape[2]), int(e.shape[3])) for e in entries)


class Caches:
    """Cache entries in call order: ``read`` gives an entry's past frames (all None in ``first``), ``write`` the
    new ones (None: zeros)."""

    def __init__(self, mb, batch: int, inputs: list | None, shapes: tuple[CacheShape, ...]):
        self.mb, self.batch, self.inputs, self.shapes = mb, batch, inputs, shapes
        self.outputs: list = []

    def read(self) -> list:
        frames = self.shapes[len(self.outputs)][0]
        if self.inputs is None:
            return [None] * frames
        entry = self.inputs[len(self.outputs)]
        return [entry] if frames == 1 else list(self.mb.split(x=entry, num_splits=frames, axis=1))

    def write(self, frames: list) -> None:
        j = len(self.outputs)
        _, c, h, w = self.shapes[j]
        zero = np.zeros((self.batch, c, h, w), np.float16)
        parts = [zero if f is None else f for f in frames]
        name = f"new_cache_{j}"
        self.outputs.append(self.mb.concat(values=parts, axis=1, name=name) if len(parts) > 1 else
                            self.mb.identity(x=parts[0], name=name))


class WanBuilder:
    """Layers of ``starflow_mlx.models.wan_vae`` as MIL; subclasses set ``role`` and build ``_network``."""

    role = ""

    def __init__(self, vae, shapes: WanShapes):
        """``vae``: a ``starflow_mlx.io.video_vae.VideoVAE``."""
        self.vae, self.shapes = vae, shapes

    def _network(self, inputs: dict, caches: Caches, first: bool):
        """The package's output tensor (named) from its inputs; the caches are threaded by ``_program``."""
        raise NotImplementedError

    def _program(self, opset, first: bool):
        sh = self.shapes
        info = sh.functions()["first" if first else "step"]
        mb, types = mil()
        self.mb = mb
        dtypes = {"float32": types.fp32, "float16": types.fp16}
        specs = {t.name: mb.TensorSpec(tuple(t.shape), dtype=dtypes[t.dtype]) for t in info.inputs}

        def body(v):
            self.em = Emitter(channels_first=True, head_dtype="fp16")
            caches = Caches(mb, sh.batch, None if first else [v[t.name] for t in sh.cache_infos()], sh.caches)
            return [self._network(v, caches, first), *caches.outputs]

        return make_program(specs, body, opset)

    def _conv2d(self, x, weight: np.ndarray, bias, padding, stride: int = 1):
        """``weight`` MLX (O, kh, kw, I); ``padding`` (ph, pw) on both sides or (top, bottom, left, right)."""
        kwargs = {} if bias is None else {"bias": to_numpy(bias).astype(np.float16)}
        pad = [padding[0], padding[0], padding[1], padding[1]] if len(padding) == 2 else list(padding)
        return self.mb.conv(x=x, weight=weight.transpose(0, 3, 1, 2).astype(np.float16), pad_type="custom",
                            pad=pad, strides=[stride, stride], **kwargs)

    def _taps(self, frames: list, weight: np.ndarray, bias, padding, stride: int = 1) -> list:
        """``frames[t .. t + kt - 1]`` through the kt taps of ``weight`` (O, kt, kh, kw, I) for t = 0, stride, ...;
        a None frame (a zero past) contributes nothing but the bias."""
        out = []
        for t in range(0, len(frames) - weight.shape[1] + 1, stride):
            total = None
            for d in range(weight.shape[1]):
                if frames[t + d] is None:
                    continue
                y = self._conv2d(frames[t + d], weight[:, d], bias if total is None else None, padding)
                total = y if total is None else self.mb.add(x=total, y=y)
            out.append(total)
        return out

    def _causal(self, frames: list, conv, caches: Caches | None) -> list:
        """CausalConv3d over per-frame tensors: the past two frames (cache or zeros) in front."""
        weight = to_numpy(conv.weight)  # (O, kt, kh, kw, I)
        if not conv.front:
            return [self._conv2d(f, weight[:, 0], conv.bias, conv.padding) for f in frames]
        full = caches.read() + frames
        caches.write(full[-2:])
        return self._taps(full, weight, conv.bias, conv.padding)

    def _resample(self, frames: list, layer, caches: Caches, first: bool) -> list:
        """A stage's ``Resample`` layer: the encoder's down-, the decoder's up-sampling."""
        raise NotImplementedError

    def _stage(self, frames: list, layers, caches: Caches, first: bool) -> list:
        """A stage's residual blocks and resampling, in their order."""
        for layer in layers:
            if type(layer).__name__ == "Resample":
                frames = self._resample(frames, layer, caches, first)
            else:
                frames = self._residual(frames, layer, caches)
        return frames

    def _norm(self, x, norm):
        return self.em.scaled_rms(x, to_numpy(norm.gamma), 1e-12)

    def _residual(self, frames, block, caches):
        mb = self.mb
        h = frames
        if "weight" in block.shortcut:
            h = self._causal(frames, block.shortcut, None)
        x = frames
        for layer in block.residual:
            name = type(layer).__name__
            if name == "RMSNorm":
                x = [self._norm(f, layer) for f in x]
            elif name == "SiLU":
                x = [mb.silu(x=f) for f in x]
            elif name == "CausalConv3d":
                x = self._causal(x, layer, caches)
        return [mb.add(x=a, y=b) for a, b in zip(x, h)]

    def _attention(self, frames, block):
        mb = self.mb
        out = []
        for f in frames:
            b, c, h, w = f.shape
            y = self._conv2d(self._norm(f, block.norm), to_numpy(block.to_qkv.weight), block.to_qkv.bias, (0, 0))
            q, k, v = (mb.transpose(x=mb.reshape(x=t, shape=[b, c, h * w]), perm=[0, 2, 1])
                       for t in mb.split(x=y, num_splits=3, axis=1))
            a = mb.transpose(x=mb.scaled_dot_product_attention(query=q, key=k, value=v), perm=[0, 2, 1])
            a = self._conv2d(mb.reshape(x=a, shape=[b, c, h, w]), to_numpy(block.proj.weight), block.proj.bias, (0, 0))
            out.append(mb.add(x=f, y=a))
        return out

    def save(self, path: Path) -> None:
        """``first`` and ``step`` in one package sharing the weights (``step`` the default)."""
        ct = coremltools()
        opset = ct.target.macOS15
        with tempfile.TemporaryDirectory(prefix=".wan-", dir=path.parent) as tmp:
            desc = ct.utils.MultiFunctionDescriptor()
            for name in ("first", "step"):
                part = Path(tmp, f"{name}.mlpackage")
                convert(self._program(opset, name == "first"), opset, COMPUTE_UNITS).save(str(part))
                desc.add_function(str(part), src_function_name="main", target_function_name=name)
            desc.default_function_name = "step"
            with quiet():
                ct.utils.save_multifunction(desc, str(path))
        set_metadata(path, {COMPUTE_UNITS_KEY: COMPUTE_UNITS, ROLE_KEY: self.role})
