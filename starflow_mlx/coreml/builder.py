"""MIL building blocks shared by the Core ML packages, fed directly from MLX weights.

Two layouts are emitted: channels-last (B, S, C) with ``linear`` ops for the
GPU, and channels-first (B, C, 1, S) with 1x1 convolutions for the Neural
Engine. :class:`Emitter` hides the difference for linears, norms, the MLP, the
affine head and guidance; attention lives with each block kind.

Quantized MLX layers keep their values: the packed integers, unpacked, become
the ``data`` of a ``constexpr_blockwise_shift_scale`` constant with MLX's own
scales; MLX's per-group float bias (``w = scale * q + bias``) becomes the
op's float offset (see :func:`quantized_constant`). Nothing is re-quantized.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from starflow_mlx.models.layers import RMSNorm
from starflow_mlx.models.tarflow import INV_SOFTPLUS_1


class ExportError(ValueError):
    """A model or an option that the Core ML export cannot handle."""


def coremltools():
    """Import coremltools with its Linux import-time chatter (no native runtime, untested versions) silenced."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError:
        raise ExportError("Core ML export needs coremltools: pip install 'starflow-mlx[coreml]'") from None
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct


def mil():
    """``(Builder, types)`` of coremltools' MIL."""
    coremltools()
    from coremltools.converters.mil import Builder
    from coremltools.converters.mil.mil import types

    return Builder, types


# -- weights out of MLX --------------------------------------------------------------------
def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if mx.issubdtype(a.dtype, mx.floating) else np.array(a)


@dataclass
class Dense:
    weight: np.ndarray  # (out, in) float32
    bias: np.ndarray | None


@dataclass
class Quantized:
    """MLX affine group quantization: ``w[o, i] = scales[o, g] * q[o, i] + biases[o, g]``, g = i // group_size."""

    q: np.ndarray  # (out, in) uint8 holding 0 .. 2**bits - 1
    scales: np.ndarray  # (out, in / group_size) float32
    biases: np.ndarray
    bits: int
    group_size: int
    bias: np.ndarray | None


def unpack_mlx(packed: np.ndarray, bits: int) -> np.ndarray:
    """MLX packs ``32 / bits`` values per uint32 word, lowest bits first."""
    per_word = 32 // bits
    words = packed.astype(np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    values = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).astype(np.uint8)


def linear_params(layer: nn.Module) -> Dense | Quantized:
    """Weights of a linear or embedding layer, quantized or not."""
    bias = to_numpy(layer.bias) if "bias" in layer else None
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        mode = getattr(layer, "mode", "affine")
        if mode != "affine":
            raise ExportError(f"export-coreml supports affine quantization; {mode} quantization is not supported")
        if layer.bits not in (4, 8):
            raise ExportError(f"export-coreml supports 4- and 8-bit layers; {layer.bits}-bit is not supported")
        return Quantized(unpack_mlx(np.array(layer.weight), layer.bits), to_numpy(layer.scales),
                         to_numpy(layer.biases), layer.bits, layer.group_size, bias)
    return Dense(to_numpy(layer.weight), bias)


def quantized_constant(params: Quantized, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, scale, offset)`` with ``scale * (data - offset) = scale * q + bias``: MLX's integers and scales
    unchanged, the bias as the float offset ``-bias / scale``.

    The offset is rounded to the weight dtype; since ``|offset|`` is at most about
    ``|w| / scale``, that moves each weight by about one float16 rounding of the
    weight itself, the precision the package computes at anyway.
    """
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    scale = params.scales.astype(np.float32)
    if np.any(scale == 0):
        raise ExportError("a quantized layer has a zero scale, which Core ML's offset form cannot express: "
                          "export the float model with --bits instead")
    offset = -params.biases.astype(np.float32) / scale
    if not np.all(np.isfinite(offset.astype(np_dtype))):
        raise ExportError("a quantized layer's bias/scale ratio overflows float16: export the float model with --bits")
    return params.q, scale.astype(np_dtype), offset.astype(np_dtype)


def rotation_matrix(head_dim: int) -> np.ndarray:
    """``M`` with ``M @ x`` = the interleaved-pair rotation (x0, x1) -> (-x1, x0) used by RoPE."""
    m = np.zeros((head_dim, head_dim), np.float32)
    idx = np.arange(0, head_dim, 2)
    m[idx, idx + 1] = -1.0
    m[idx + 1, idx] = 1.0
    return m


# -- emission ------------------------------------------------------------------------------
class Emitter:
    """Emits MIL ops for one layout; use it inside a program body (see :func:`make_program`).

    Transformer activations are float16; the affine head runs in ``head_dtype``
    (float32 on the GPU, float16 on the Neural Engine). ``quantized_layers``
    counts the quantized constants emitted.
    """

    def __init__(self, channels_first: bool, head_dtype: str = "fp32"):
        self.mb, self.types = mil()
        self.channels_first = channels_first
        self.axis = 1 if channels_first else -1
        self.head_dtype = head_dtype
        self.quantized_layers = 0

    @staticmethod
    def np_dtype(dtype: str):
        return np.float16 if dtype == "fp16" else np.float32

    def const(self, value, dtype: str = "fp16"):
        return np.asarray(value, dtype=self.np_dtype(dtype))

    def cast(self, x, dtype: str):
        return x if x.dtype == getattr(self.types, dtype) else self.mb.cast(x=x, dtype=dtype)

    # -- linear ---------------------------------------------------------------------------
    def _weight(self, w: np.ndarray, dtype: str):
        return w[:, :, None, None].astype(self.np_dtype(dtype)) if self.channels_first else w.astype(self.np_dtype(dtype))

    def _matmul_weight(self, x, weight, bias):
        if self.channels_first:
            return self.mb.conv(x=x, weight=weight, bias=bias) if bias is not None else self.mb.conv(x=x, weight=weight)
        return self.mb.linear(x=x, weight=weight, bias=bias) if bias is not None else self.mb.linear(x=x, weight=weight)

    def linear(self, x, params: Dense | Quantized, dtype: str = "fp16"):
        """``x @ W.T + bias`` along the channel axis, in ``dtype``."""
        bias = None if params.bias is None else params.bias.astype(self.np_dtype(dtype))
        if isinstance(params, Dense):
            return self._matmul_weight(x, self._weight(params.weight, dtype), bias)
        return self._matmul_weight(x, self.quantized_weight(params, dtype), bias)

    def quantized_weight(self, params: Quantized, dtype: str = "fp16"):
        """The (out, in) weight as a ``constexpr_blockwise_shift_scale`` constant ((out, in, 1, 1) channels-first)."""
        self.quantized_layers += 1
        data, scale, offset = quantized_constant(params, dtype)
        if self.channels_first:
            data, scale, offset = (t[:, :, None, None] for t in (data, scale, offset))
        data_type = self.types.np_uint4_dtype if params.bits == 4 else np.uint8
        return self.mb.constexpr_blockwise_shift_scale(data=data.astype(data_type), scale=scale, offset=offset)

    # -- norms ----------------------------------------------------------------------------
    def _gain(self, gain: np.ndarray, dtype: str) -> np.ndarray:
        gain = gain.astype(self.np_dtype(dtype))
        return gain.reshape(1, -1, 1, 1) if self.channels_first else gain

    def rms_norm(self, x, module: RMSNorm):
        """Gemma RMSNorm ``x / rms(x) * (1 + w)`` over the channel axis."""
        return self.scaled_rms(x, 1.0 + to_numpy(module.weight), module.eps)

    def scaled_rms(self, x, gain: np.ndarray, eps: float):
        """``x / rms(x) * gain`` over the channel axis.

        Channels-last (GPU) computes in float32 like MLX. Channels-first (Neural
        Engine) stays in float16 and takes the layer norm of ``[x, -x]``, whose
        mean is 0 and variance mean(x^2): the engine's layer norm is its
        numerically careful reduction, where a float16 sum of squares would overflow.
        """
        mb = self.mb
        if self.channels_first:
            both = mb.concat(values=[x, mb.mul(x=x, y=self.const(-1.0))], axis=1)
            normed = mb.layer_norm(x=both, axes=[1], epsilon=self.const(eps))
            half, _ = mb.split(x=normed, num_splits=2, axis=1)
            return mb.mul(x=half, y=self._gain(gain, "fp16"))
        dtype = "fp16" if x.dtype == self.types.fp16 else "fp32"
        xf = self.cast(x, "fp32")
        mean_sq = mb.reduce_mean(x=mb.mul(x=xf, y=xf), axes=[-1], keep_dims=True)
        inv = mb.rsqrt(x=mean_sq, epsilon=np.float32(eps))
        return self.cast(mb.mul(x=mb.mul(x=xf, y=inv), y=self._gain(gain, "fp32")), dtype)

    def layer_norm(self, x, module: nn.LayerNorm):
        dtype = "fp16" if x.dtype == self.types.fp16 else "fp32"
        gamma = self.const(to_numpy(module.weight), dtype) if "weight" in module else None
        beta = self.const(to_numpy(module.bias), dtype) if "bias" in module else None
        kwargs = {k: v for k, v in (("gamma", gamma), ("beta", beta)) if v is not None}
        return self.mb.layer_norm(x=x, axes=[self.axis], epsilon=self.const(module.eps, dtype), **kwargs)

    def norm(self, x, module: nn.Module):
        if isinstance(module, nn.LayerNorm):
            return self.layer_norm(x, module)
        if isinstance(module, RMSNorm):
            return self.rms_norm(x, module)
        return x

    # -- MLP and head ---------------------------------------------------------------------
    def mlp(self, x, mlp: nn.Module):
        h = self.norm(x, mlp.norm)
        if mlp.use_swiglu:
            gate = self.mb.gelu(x=self.linear(h, linear_params(mlp.gate_proj)), mode="TANH_APPROXIMATION")
            h = self.linear(self.mb.mul(x=gate, y=self.linear(h, linear_params(mlp.up_proj))),
                            linear_params(mlp.down_proj))
        else:
            h = self.mb.gelu(x=self.linear(h, linear_params(mlp.main[0])), mode="EXACT")
            h = self.linear(h, linear_params(mlp.main[2]))
        if "post_norm" in mlp:
            h = self.rms_norm(h, mlp.post_norm)
        return h

    def head(self, h, block) -> tuple:
        """Final norm, output projection and the map to ``(a, b)``, all in ``head_dtype``."""
        dt = self.head_dtype
        h = self.cast(h, dt)
        if "final_norm" in block:
            h = self.rms_norm(h, block.final_norm)
        out = self.linear(h, linear_params(block.proj_out), dt)
        if block.soft_clip > 0:
            clip = self.const(block.soft_clip, dt)
            out = self.mb.mul(x=self.mb.tanh(x=self.mb.real_div(x=out, y=clip)), y=clip)
        xa, xb = self.mb.split(x=out, num_splits=2, axis=self.axis)
        if block.use_softplus:
            a = self.mb.softplus(x=self.mb.add(x=xa, y=self.const(INV_SOFTPLUS_1, dt)))
        else:
            a = self.mb.exp(x=xa)
        return a, xb

    def guide(self, a, b, weight, batch: int, names: tuple[str, str]):
        """Classifier-free guidance over [cond; uncond] stacked on axis 0; returns the ``batch`` guided rows."""
        mb = self.mb
        dt = "fp16" if a.dtype == self.types.fp16 else "fp32"
        a_c, a_u = mb.split(x=a, split_sizes=[batch, batch], axis=0)
        b_c, b_u = mb.split(x=b, split_sizes=[batch, batch], axis=0)
        ratio = mb.minimum(x=mb.real_div(x=a_c, y=a_u), y=self.const(1.0, dt))
        s = mb.mul(x=ratio, y=ratio)
        one_plus = mb.add(x=weight, y=self.const(1.0, dt))
        denom = mb.sub(x=one_plus, y=mb.mul(x=weight, y=s))
        a_eff = mb.real_div(x=a_c, y=mb.sqrt(x=denom), name=names[0])
        num = mb.sub(x=mb.mul(x=one_plus, y=b_c), y=mb.mul(x=mb.mul(x=weight, y=s), y=b_u))
        b_eff = mb.real_div(x=num, y=denom, name=names[1])
        return a_eff, b_eff

    def rope(self, x, cos, sin, rotation):
        """``x * cos + rot(x) * sin`` with rot given as a matrix (or 1x1 conv weight)."""
        if self.channels_first:
            rotated = self.mb.conv(x=x, weight=rotation)
        else:
            rotated = self.mb.matmul(x=x, y=rotation)
        return self.mb.add(x=self.mb.mul(x=x, y=cos), y=self.mb.mul(x=rotated, y=sin))


def quiet():
    """Hide coremltools' per-pass progress bars (written to stderr); errors still raise."""
    return contextlib.redirect_stderr(io.StringIO())


def convert(program, ct_target, compute_units_name: str):
    """MIL program -> Core ML model, keeping our explicit dtypes (no automatic float16 pass) and not loading it."""
    ct = coremltools()
    with quiet():
        return ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct_target,
                          compute_precision=ct.precision.FLOAT32,
                          compute_units=getattr(ct.ComputeUnit, compute_units_name), skip_model_load=True)


def package_spec_path(package: Path) -> Path:
    """The model specification file inside a saved ``.mlpackage``."""
    coremltools()
    from coremltools.libmodelpackage import ModelPackage

    return Path(ModelPackage(str(package)).getRootModel().path())


def set_metadata(package: Path, metadata: dict[str, str]) -> None:
    """Write user-defined metadata into a saved package (``save_multifunction`` drops the sources' metadata)."""
    coremltools()
    from coremltools.proto import Model_pb2

    path = package_spec_path(package)
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    for key, value in metadata.items():
        spec.description.metadata.userDefined[key] = value
    path.write_bytes(spec.SerializeToString())


def make_program(inputs: dict, body, opset):
    """A one-function MIL program: ``inputs`` maps names to ``mb.TensorSpec``/``mb.StateTensorSpec``;
    ``body(vars_by_name)`` returns the output vars."""
    coremltools()
    from coremltools.converters.mil.mil import Function, Program

    with Function(dict(inputs), opset) as func:
        outputs = body({name: func.inputs[name] for name in inputs})
        func.set_outputs(list(outputs))
    program = Program()
    program.add_function("main", func)
    return program
