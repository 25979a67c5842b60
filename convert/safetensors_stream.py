"""Write a safetensors file one tensor at a time, and check a file's header before anything loads it.

The header (names, dtypes, shapes, byte ranges) is known before any data is
read, so it is written first and each tensor's bytes follow as its producer
returns them: peak memory is one tensor, not the whole model.
"""

from __future__ import annotations

import json
import math
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
CODES = {code: name for name, (code, _) in DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors library's own limit


class SafetensorsError(ValueError):
    """A safetensors file whose header does not describe its data exactly."""

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


def all_finite(array: np.ndarray, dtype_name: str) -> bool:
    """Whether ``array`` (of ``dtype_name``; bfloat16 as bits) holds no NaN or infinity; float8 is not checked."""
    if dtype_name == "bfloat16":
        return not np.any((array & 0x7F80) == 0x7F80)  # all exponent bits set
    return not np.issubdtype(array.dtype, np.floating) or bool(np.isfinite(array).all())


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


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors file whose header is exact: known dtypes, byte ranges
    of numel * itemsize that tile the data without gap or overlap and end where the file ends.
    (Loaders otherwise accept overlapping tensors, or float bits labelled as integers.)"""
    from starflow_mlx.jsonconfig import ConfigError, parse_json
    from starflow_mlx.safe_text import printable

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path} is not a readable safetensors file (bad header length)")
        raw = f.read(length)
    try:
        header = parse_json(raw.decode("utf-8"), "it", "safetensors header")  # the path is named once, below
    except (UnicodeDecodeError, ConfigError) as exc:
        raise SafetensorsError(f"{path} has a damaged safetensors header ({str(exc).split(': ')[-1][:120]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} has a damaged safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    out, spans = {}, []
    for name, entry in header.items():
        shown = printable(name, 120)
        if not (isinstance(entry, dict) and entry.get("dtype") in CODES and isinstance(entry.get("shape"), list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in entry["data_offsets"])):
            raise SafetensorsError(f"{path}: the header entry of {shown} is damaged (dtype, shape or data_offsets)")
        dtype, shape = CODES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * np.dtype(DTYPES[dtype][1]).itemsize:
            raise SafetensorsError(f"{path}: {shown} is {dtype}{list(shape)} but its data is {end - begin} bytes: "
                                   "the file is damaged")
        out[name] = (dtype, shape)
        spans.append((begin, end, shown))
    position = 0
    for begin, end, shown in sorted(spans):
        if begin != position:
            raise SafetensorsError(f"{path}: the data of {shown} {'overlaps another tensor' if begin < position else 'leaves a gap'}:"
                                   " the file is damaged")
        position = end
    if position != size - 8 - length:
        raise SafetensorsError(f"{path}: the header describes {position} bytes of data, the file holds "
                               f"{size - 8 - length}: the file is truncated or damaged")
    return out


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
        if name in header or name == "__metadata__":  # without metadata too: readers take that key as metadata
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
                if not all_finite(array, dtype):  # a converted folder never holds weights that decode to black
                    raise ValueError(f"{name} holds NaN or infinite values: the checkpoint is damaged "
                                     "(download it again)")
                array = array.astype(expected.newbyteorder("<"), copy=False)
                f.write(array.reshape(-1).view(np.uint8).data)
                del array  # let this tensor go before the next producer runs
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
