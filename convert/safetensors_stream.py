"""Write a safetensors file one tensor at a time.

The header (names, dtypes, shapes, byte ranges) is known before any data is
read, so it is written first and each tensor's bytes follow as its producer
returns them: peak memory is one tensor, not the whole model.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

# Our dtype names -> (safetensors code, numpy dtype holding the values or, for formats numpy lacks, their bits).
# Listed in the order the safetensors library lays tensors out (largest items first, then by name), which keeps
# every tensor's data aligned to its item size.
DTYPES = {
    "uint64": ("U64", np.uint64), "int64": ("I64", np.int64), "float64": ("F64", np.float64),
    "float32": ("F32", np.float32), "uint32": ("U32", np.uint32), "int32": ("I32", np.int32),
    "bfloat16": ("BF16", np.uint16), "float16": ("F16", np.float16), "uint16": ("U16", np.uint16),
    "int16": ("I16", np.int16), "float8_e4m3fn": ("F8_E4M3", np.uint8), "float8_e5m2": ("F8_E5M2", np.uint8),
    "int8": ("I8", np.int8), "uint8": ("U8", np.uint8), "bool": ("BOOL", np.bool_),
}
LAYOUT_RANK = {name: rank for rank, name in enumerate(DTYPES)}

Entry = tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of ``values``, rounded to nearest even; NaNs stay NaN with their sign."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # In place, so the temporaries are one uint32 array and the uint16 result.
    rounded = (u >> 16) & 1
    rounded += 0x7FFF
    rounded += u
    rounded >>= 16
    bits = rounded.astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():  # the rounding carry could turn a NaN with low payload bits into infinity
        bits[nan] = (u[nan] >> 16).astype(np.uint16) | 0x0040
    return bits


def to_dtype(array: np.ndarray, dtype_name: str, source: str | None = None) -> np.ndarray:
    """``array`` converted to ``dtype_name``; ``source`` names its dtype when the array holds bits (bfloat16)."""
    source = source or array.dtype.name
    if source == dtype_name:
        return array
    if source == "bfloat16":
        array, source = bf16_to_f32(array), "float32"
    if source.startswith("float8") or dtype_name.startswith("float8"):
        raise ValueError(f"cannot convert {source} to {dtype_name}: float8 is only copied as is")
    if dtype_name == "bfloat16":
        return f32_to_bf16(array.astype(np.float32, copy=False))  # float64 rounds twice; within bf16's precision
    if dtype_name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype_name!r}")
    return array.astype(DTYPES[dtype_name][1], copy=False)


def write_safetensors(path: str | Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` (name, dtype, shape, producer) to ``path`` atomically, calling one producer at a time."""
    entries = sorted(entries, key=lambda e: (LAYOUT_RANK.get(e[1], -1), e[0]))
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, _ in entries:
        if dtype not in DTYPES:
            raise ValueError(f"cannot store {name} as {dtype}")
        if name in header:
            raise ValueError(f"tensor name {name} is {'reserved' if name == '__metadata__' else 'used twice'}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][1]).itemsize
        header[name] = {"dtype": DTYPES[dtype][0], "shape": [int(n) for n in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data then starts 8-byte aligned, as the safetensors library pads it
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # same folder, so os.replace is atomic
    try:
        with open(tmp, "xb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, dtype, shape, produce in entries:
                array = np.ascontiguousarray(produce())
                expected = np.dtype(DTYPES[dtype][1])
                if array.shape != tuple(shape) or array.dtype.newbyteorder("=") != expected:
                    raise ValueError(f"{name}: produced {array.dtype}{array.shape}, header says {dtype}{tuple(shape)}")
                array = array.astype(expected.newbyteorder("<"), copy=False)
                f.write(array.reshape(-1).view(np.uint8).data)
                del array  # let this tensor go before the next producer runs
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
