"""Write a safetensors file one tensor at a time.

The header (names, dtypes, shapes, byte ranges) is known before any data is
read, so it is written first and each tensor's bytes follow as its producer
returns them: peak memory is one tensor, not the whole model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

DTYPES = {  # our names -> (safetensors code, numpy storage dtype)
    "float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", np.uint16),
    "float64": ("F64", np.float64), "int64": ("I64", np.int64), "int32": ("I32", np.int32),
    "int16": ("I16", np.int16), "int8": ("I8", np.int8), "uint32": ("U32", np.uint32),
    "uint8": ("U8", np.uint8), "bool": ("BOOL", np.bool_),
}
FLOATS = ("float32", "float16", "bfloat16", "float64")

Entry = tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, keeping NaNs NaN."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def to_dtype(array: np.ndarray, target: str, source: str | None = None) -> np.ndarray:
    """Convert ``array`` (of dtype name ``source``; bfloat16 given as uint16 bits) to ``target``."""
    source = source or str(array.dtype)
    if source == target:
        return array
    if source not in FLOATS or target not in FLOATS:
        return array.astype(DTYPES[target][1])
    values = bf16_to_f32(array) if source == "bfloat16" else array.astype(np.float32, copy=False)
    if target == "bfloat16":
        return f32_to_bf16(values)
    return values.astype(DTYPES[target][1])


def write_safetensors(path: str | Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` (name, dtype, shape, producer) to ``path`` atomically."""
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in entries:
        if dtype not in DTYPES:
            raise ValueError(f"cannot store {name} as {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][1]).itemsize
        header[name] = {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, dtype, shape, produce in entries:
                array = np.ascontiguousarray(produce())
                if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(DTYPES[dtype][1]):
                    raise ValueError(f"{name}: produced {array.dtype}{tuple(array.shape)}, header says {dtype}{tuple(shape)}")
                f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
