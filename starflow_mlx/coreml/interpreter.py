"""A numpy interpreter for the MIL ops our Core ML packages contain, reading the saved ``.mlpackage``.

It parses the package's model specification (``spec.mlProgram``: functions,
blocks, operations), reads constants from the protobuf or from
``weights/weight.bin`` with coremltools' blob reader, and runs the ops in
order. Every op computes in float32 and rounds its result to the dtype the
program declares, so float16 programs behave like float16 hardware up to
accumulation order. States are numpy arrays in a dict that ``read_state`` /
``write_state`` use in place, which is what Core ML does with ``MLState``.

Only the ops our exporter emits (after coremltools' passes) are implemented;
anything else fails loudly, naming the op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from starflow_mlx.coreml.builder import coremltools

_FLOAT = {"FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64}
_INT = {"INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
        "UINT16": np.uint16, "UINT32": np.uint32, "UINT4": np.uint8, "INT4": np.int8}
_SUB_BYTE = {"UINT4": (4, False), "INT4": (4, True)}
_BLOB_READ = {"FLOAT16": "read_fp16_data", "FLOAT32": "read_float_data", "UINT8": "read_uint8_data",
              "INT8": "read_int8_data", "UINT4": "read_uint4_data", "INT4": "read_int4_data",
              "INT32": "read_int32_data", "UINT16": "read_uint16_data", "INT16": "read_int16_data",
              "UINT32": "read_uint32_data"}
_CAST = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_, "int8": np.int8,
         "uint8": np.uint8}


class InterpreterError(RuntimeError):
    """The package uses something this interpreter does not implement, or the inputs do not fit."""


def _np_dtype(name: str):
    if name in _FLOAT:
        return _FLOAT[name]
    if name in _INT:
        return _INT[name]
    if name == "BOOL":
        return np.bool_
    if name == "STRING":
        return object
    raise InterpreterError(f"data type {name} is not supported")


def _tensor_type(value_type, mil_pb2):
    """(dtype name, shape) of a ValueType holding a tensor."""
    tt = value_type.tensorType
    name = mil_pb2.DataType.Name(tt.dataType)
    shape = tuple(d.constant.size for d in tt.dimensions)
    return name, shape


def unpack_sub_byte(raw: bytes, bits: int, signed: bool, count: int) -> np.ndarray:
    """Sub-byte values packed little-end first, as coremltools writes immediate int4/uint4 tensors."""
    data = np.frombuffer(raw, np.uint8)
    per_byte = 8 // bits
    values = ((data[:, None] >> (np.arange(per_byte, dtype=np.uint8) * bits)) & ((1 << bits) - 1)).reshape(-1)[:count]
    if signed:
        values = values.astype(np.int8)
        values[values >= 1 << (bits - 1)] -= 1 << bits
    return values


class Program:
    """One saved ``.mlpackage``: its functions, declared states, and their execution."""

    def __init__(self, package: str | Path):
        ct = coremltools()
        from coremltools.proto import MIL_pb2

        self._pb = MIL_pb2
        self.path = Path(package)
        if not self.path.is_dir():
            raise InterpreterError(f"{self.path} is not a .mlpackage folder")
        self.spec = ct.models.MLModel(str(self.path), skip_model_load=True).get_spec()
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise InterpreterError(f"{self.path} is not an ML program")
        self.metadata = dict(self.spec.description.metadata.userDefined)
        self.functions = dict(self.spec.mlProgram.functions)
        self._weights_dir = self.path / "Data" / "com.apple.CoreML" / "weights"
        self._readers: dict[str, object] = {}
        self._consts: dict[tuple[str, str], np.ndarray] = {}
        self._signatures: dict[str, dict] = {}

    # -- description ----------------------------------------------------------------------
    @property
    def default_function(self) -> str:
        return self.spec.description.defaultFunctionName or "main"

    def _function(self, name: str | None):
        name = name or self.default_function
        if name not in self.functions:
            raise InterpreterError(f"{self.path.name} has no function {name!r} (has {', '.join(self.functions)})")
        return name, self.functions[name]

    def signature(self, function: str | None = None) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
        """``{"inputs": {name: (dtype, shape)}, "states": {...}, "outputs": {...}}`` as the program declares."""
        name, fn = self._function(function)
        if name in self._signatures:
            return self._signatures[name]
        inputs, states = {}, {}
        for item in fn.inputs:
            kind = item.type.WhichOneof("type")
            if kind == "stateType":
                arr = item.type.stateType.wrappedType
                states[item.name] = _tensor_type(arr, self._pb)
            else:
                inputs[item.name] = _tensor_type(item.type, self._pb)
        block = fn.block_specializations[fn.opset]
        declared = {o.name: _tensor_type(o.type, self._pb) for op in block.operations for o in op.outputs}
        outputs = {o: declared[o] for o in block.outputs}
        self._signatures[name] = {"inputs": inputs, "states": states, "outputs": outputs}
        return self._signatures[name]

    def make_state(self, function: str | None = None) -> dict[str, np.ndarray]:
        """Zero-filled state buffers, like ``MLModel.make_state``."""
        states = self.signature(function)["states"]
        return {n: np.zeros(shape, _np_dtype(dt)) for n, (dt, shape) in states.items()}

    # -- values ---------------------------------------------------------------------------
    def _reader(self, file_name: str):
        from coremltools import libmilstoragepython

        path = self._weights_dir / file_name.split("/")[-1]
        key = str(path)
        if key not in self._readers:
            self._readers[key] = libmilstoragepython._BlobStorageReader(key)
        return self._readers[key]

    def _value(self, value) -> np.ndarray:
        dtype_name, shape = _tensor_type(value.type, self._pb)
        kind = value.WhichOneof("value")
        if kind == "blobFileValue":
            blob = value.blobFileValue
            if dtype_name not in _BLOB_READ:
                raise InterpreterError(f"weights of type {dtype_name} are not supported")
            raw = getattr(self._reader(blob.fileName), _BLOB_READ[dtype_name])(blob.offset)
            if dtype_name == "FLOAT16":
                raw = np.asarray(raw).view(np.float16)
            return np.asarray(raw, dtype=_np_dtype(dtype_name)).reshape(shape)
        tensor = value.immediateValue.tensor
        which = tensor.WhichOneof("value")
        count = int(np.prod(shape)) if shape else 1
        if which == "bytes":
            raw = tensor.bytes.values
            if dtype_name in _SUB_BYTE:
                bits, signed = _SUB_BYTE[dtype_name]
                return unpack_sub_byte(raw, bits, signed, count).reshape(shape)
            return np.frombuffer(raw, _np_dtype(dtype_name)).copy().reshape(shape)
        if which == "strings":
            return np.array(tensor.strings.values[0]) if not shape else np.array(list(tensor.strings.values))
        values = getattr(tensor, which).values
        return np.asarray(list(values), dtype=_np_dtype(dtype_name)).reshape(shape)

    # -- execution ------------------------------------------------------------------------
    def run(self, function: str | None, inputs: dict[str, np.ndarray],
            state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run one function; ``state`` buffers are updated in place."""
        name, fn = self._function(function)
        sig = self.signature(name)
        env: dict[str, np.ndarray] = {}
        for key, (dt, shape) in sig["inputs"].items():
            if key not in inputs:
                raise InterpreterError(f"{self.path.name}:{name} needs input {key!r}")
            arr = np.asarray(inputs[key])
            if tuple(arr.shape) != tuple(shape):
                raise InterpreterError(f"{self.path.name}:{name} input {key} must be {shape}, got {arr.shape}")
            env[key] = arr.astype(_np_dtype(dt))
        if sig["states"]:
            if state is None:
                raise InterpreterError(f"{self.path.name}:{name} is stateful: pass a state from make_state()")
            missing = sorted(set(sig["states"]) - set(state))
            if missing:
                raise InterpreterError(f"state lacks {missing[0]}")
        block = fn.block_specializations[fn.opset]
        for op in block.operations:
            self._run_op(name, op, env, state)
        return {o: env[o] for o in block.outputs}

    def _args(self, op, env) -> dict[str, object]:
        args: dict[str, object] = {}
        for key, binding in op.inputs.items():
            vals = []
            for arg in binding.arguments:
                if arg.WhichOneof("binding") == "name":
                    vals.append(env[arg.name] if arg.name in env else _StateRef(arg.name))
                else:
                    vals.append(self._value(arg.value))
            args[key] = vals if len(vals) != 1 or key == "values" else vals[0]
        return args

    def _run_op(self, function: str, op, env, state) -> None:
        if op.type == "const":
            key = (function, op.outputs[0].name)
            if key not in self._consts:
                self._consts[key] = self._value(op.attributes["val"])
            env[op.outputs[0].name] = self._consts[key]
            return
        args = self._args(op, env)
        if op.type == "read_state":
            env[op.outputs[0].name] = state[args["input"].name].copy()
            return
        if op.type == "write_state":
            target = state[args["input"].name]
            target[...] = np.asarray(args["data"]).astype(target.dtype)
            return
        impl = OPS.get(op.type)
        if impl is None:
            raise InterpreterError(f"op {op.type} ({op.outputs[0].name if op.outputs else ''}) is not implemented")
        result = impl(**args)
        results = result if isinstance(result, (list, tuple)) else [result]
        for out, value in zip(op.outputs, results):
            dt, shape = _tensor_type(out.type, self._pb)
            value = np.asarray(value).astype(_np_dtype(dt))
            if shape and tuple(value.shape) != tuple(shape):
                raise InterpreterError(f"op {op.type} gave {value.shape} for {out.name}, program declares {shape}")
            env[out.name] = value


class _StateRef:
    """A function input that names a state (read_state / write_state take it by name)."""

    def __init__(self, name: str):
        self.name = name


# -- op implementations --------------------------------------------------------------------
def _f(x) -> np.ndarray:
    """Compute dtype: float32 for floating inputs, unchanged otherwise."""
    x = np.asarray(x)
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def _erf(x: np.ndarray) -> np.ndarray:
    """erf within 1.5e-7 (Abramowitz & Stegun 7.1.26), ample next to float16 rounding."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _softmax(x, axis=-1):
    x = _f(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


def _gelu(x, mode="EXACT"):
    x = _f(x).astype(np.float64)
    mode = str(mode)
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise InterpreterError(f"gelu mode {mode} is not implemented")


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    x = _f(x)
    axes = tuple(int(a) for a in np.atleast_1d(axes)) if axes is not None else tuple(range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(epsilon))
    shape = [x.shape[a] if a in {ax % x.ndim for ax in axes} else 1 for a in range(x.ndim)]
    if gamma is not None:
        out = out * _f(gamma).reshape(shape)
    if beta is not None:
        out = out + _f(beta).reshape(shape)
    return out


def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    """Per-channel (axis 1) affine normalisation; coremltools fuses a per-channel mul/add into this op."""
    x = _f(x)
    shape = [1, -1] + [1] * (x.ndim - 2)
    out = (x - _f(mean).reshape(shape)) / np.sqrt(_f(variance).reshape(shape) + np.float32(epsilon))
    if gamma is not None:
        out = out * _f(gamma).reshape(shape)
    if beta is not None:
        out = out + _f(beta).reshape(shape)
    return out


def _reduce(fn):
    def op(x, axes=None, keep_dims=False):
        ax = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return fn(_f(x), axis=ax, keepdims=bool(keep_dims))

    return op


def _linear(x, weight, bias=None):
    out = _f(x) @ _f(weight).T
    return out if bias is None else out + _f(bias)


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f(x), _f(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return x @ y


def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """2-D convolution, NCHW / OIHW."""
    x, w = _f(x), _f(weight)
    if x.ndim != 4:
        raise InterpreterError(f"conv of rank {x.ndim} is not implemented")
    sh, sw = (int(s) for s in (strides if strides is not None else (1, 1)))
    dh, dw = (int(d) for d in (dilations if dilations is not None else (1, 1)))
    kh, kw = w.shape[2], w.shape[3]
    pad_type = str(pad_type)
    if pad_type == "custom":
        top, bottom, left, right = (int(p) for p in pad)
    elif pad_type == "same":
        eff_h, eff_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        out_h, out_w = -(-x.shape[2] // sh), -(-x.shape[3] // sw)
        ph = max((out_h - 1) * sh + eff_h - x.shape[2], 0)
        pw = max((out_w - 1) * sw + eff_w - x.shape[3], 0)
        top, bottom, left, right = ph // 2, ph - ph // 2, pw // 2, pw - pw // 2
    else:
        top = bottom = left = right = 0
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    groups = int(groups)
    n, c, hh, ww = x.shape
    out_h = (hh - (kh - 1) * dh - 1) // sh + 1
    out_w = (ww - (kw - 1) * dw - 1) // sw + 1
    cg, og = c // groups, w.shape[0] // groups
    out = np.zeros((n, w.shape[0], out_h, out_w), np.float32)
    for g in range(groups):
        xg, wg = x[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j], optimize=True)
    if bias is not None:
        out += _f(bias).reshape(1, -1, 1, 1)
    return out


def _slices(shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = len(shape)
    stride = np.ones(rank, int) if stride is None else np.asarray(stride)
    begin_mask = np.zeros(rank, bool) if begin_mask is None else np.asarray(begin_mask)
    end_mask = np.zeros(rank, bool) if end_mask is None else np.asarray(end_mask)
    index = []
    for d in range(rank):
        b = None if begin_mask[d] else int(begin[d])
        e = None if end_mask[d] else int(end[d])
        index.append(slice(b, e, int(stride[d])))
    squeeze = tuple(d for d in range(rank) if squeeze_mask is not None and squeeze_mask[d])
    return tuple(index), squeeze


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    index, squeeze = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x[index]
    return np.squeeze(out, axis=squeeze) if squeeze else out


def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    index, squeeze = _slices(out.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target_shape = out[index].shape
    out[index] = np.asarray(update).reshape(target_shape).astype(out.dtype)
    return out


def _slice_by_size(x, begin, size):
    x = np.asarray(x)
    index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    return x[index]


def _split(x, axis, num_splits=None, split_sizes=None):
    x = np.asarray(x)
    axis = int(axis)
    if split_sizes is not None:
        cuts = np.cumsum(np.atleast_1d(split_sizes))[:-1]
        return np.split(x, cuts, axis=axis)
    return np.split(x, int(num_splits), axis=axis)


def _concat(values, axis, interleave=False):
    if bool(interleave):
        raise InterpreterError("interleaved concat is not implemented")
    values = [np.asarray(v) for v in values]
    dtype = np.result_type(*values)
    return np.concatenate([v.astype(dtype) for v in values], axis=int(axis))


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims):
        raise InterpreterError("gather with batch_dims is not implemented")
    return np.take(np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis))


def _sdpa(query, key, value, attn_mask=None):
    q, k, v = _f(query), _f(key), _f(value)
    scores = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(np.float32(q.shape[-1]))
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f(mask)
    return _softmax(scores, -1) @ v


def _expand_dims(x, axes):
    out = np.asarray(x)
    for a in sorted(int(a) % (out.ndim + len(np.atleast_1d(axes))) for a in np.atleast_1d(axes)):
        out = np.expand_dims(out, a)
    return out


def _squeeze(x, axes=None):
    x = np.asarray(x)
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(int(a) for a in np.atleast_1d(axes)))


def _blockwise_shift_scale(data, scale, offset=None):
    data, scale = np.asarray(data).astype(np.float32), np.asarray(scale).astype(np.float32)
    reps = [d // s for d, s in zip(data.shape, scale.shape)]
    full_scale = scale
    for axis, r in enumerate(reps):
        full_scale = np.repeat(full_scale, r, axis=axis)
    if offset is not None:
        off = np.asarray(offset).astype(np.float32)
        for axis, r in enumerate(reps):
            off = np.repeat(off, r, axis=axis)
        data = data - off
    return full_scale * data


def _upsample_nearest(x, scale_factor_height=1, scale_factor_width=1):
    x = np.asarray(x)
    return np.repeat(np.repeat(x, int(scale_factor_height), axis=-2), int(scale_factor_width), axis=-1)


OPS: dict[str, Callable] = {
    "add": lambda x, y: _f(x) + _f(y),
    "sub": lambda x, y: _f(x) - _f(y),
    "mul": lambda x, y: _f(x) * _f(y),
    "real_div": lambda x, y: _f(x) / _f(y),
    "minimum": lambda x, y: np.minimum(_f(x), _f(y)),
    "maximum": lambda x, y: np.maximum(_f(x), _f(y)),
    "pow": lambda x, y: np.power(_f(x), _f(y)),
    "less_equal": lambda x, y: np.asarray(x) <= np.asarray(y),
    "less": lambda x, y: np.asarray(x) < np.asarray(y),
    "greater_equal": lambda x, y: np.asarray(x) >= np.asarray(y),
    "greater": lambda x, y: np.asarray(x) > np.asarray(y),
    "equal": lambda x, y: np.asarray(x) == np.asarray(y),
    "select": lambda cond, a, b: np.where(np.asarray(cond), a, b),
    "cast": lambda x, dtype: np.asarray(x).astype(_CAST[str(dtype)]),
    "identity": lambda x: np.asarray(x),
    "exp": lambda x: np.exp(_f(x)),
    "tanh": lambda x: np.tanh(_f(x)),
    "sqrt": lambda x: np.sqrt(_f(x)),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f(x) + np.float32(epsilon)),
    "square": lambda x: np.square(_f(x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-_f(x))),
    "silu": lambda x: _f(x) / (1.0 + np.exp(-_f(x))),
    "relu": lambda x: np.maximum(_f(x), 0.0),
    "softplus": lambda x: np.logaddexp(0.0, _f(x)),
    "gelu": _gelu,
    "softmax": _softmax,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "linear": _linear,
    "matmul": _matmul,
    "conv": _conv,
    "reshape": lambda x, shape: np.asarray(x).reshape([int(s) for s in shape]),
    "transpose": lambda x, perm: np.transpose(np.asarray(x), [int(p) for p in perm]),
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "concat": _concat,
    "split": _split,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "slice_update": _slice_update,
    "gather": _gather,
    "tile": lambda x, reps: np.tile(np.asarray(x), [int(r) for r in reps]),
    "scaled_dot_product_attention": _sdpa,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "upsample_nearest_neighbor": _upsample_nearest,
}
