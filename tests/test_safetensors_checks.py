"""The safetensors header check, against files built byte by byte.

``read_header`` (and so every model load) accepts a file only if its header describes its data exactly:
byte ranges of numel * itemsize that tile the data from 0 with no gap or overlap and end where the file
ends. Each damage below is one the safetensors library or MLX would load without a word (extra bytes, a gap,
two tensors on the same bytes) or with a long internal error; the check must name it in one line.
"""

import json
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from starflow_mlx.convert.safetensors_stream import SafetensorsError, read_header, write_safetensors
from starflow_mlx.io.loading import ModelLoadError, load_weights_strict


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def build(path, header: dict, data: bytes, length: int | None = None):
    """A safetensors file: 8-byte little-endian header length, the JSON header (space padded), the data."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


# A (2, 3) float32 weight and a (2,) bias: 24 + 8 bytes, laid out weight first.
WEIGHT = np.arange(6, dtype=np.float32).reshape(2, 3)
BIAS = np.array([10.0, 20.0], np.float32)
GOOD = {"weight": entry("F32", (2, 3), 0, 24), "bias": entry("F32", (2,), 24, 32)}
DATA = WEIGHT.tobytes() + BIAS.tobytes()


def linear():
    layer = nn.Linear(3, 2)
    mx.eval(layer.parameters())
    return layer


def test_the_exact_file_loads(tmp_path):
    path = build(tmp_path / "ok.safetensors", GOOD, DATA)
    assert read_header(path) == {"weight": ("float32", (2, 3)), "bias": ("float32", (2,))}
    layer = linear()
    load_weights_strict(layer, path)
    assert np.array(layer.weight).tolist() == WEIGHT.tolist() and np.array(layer.bias).tolist() == [10, 20]
    # The project's own writer gives files that pass, metadata and padding included.
    write_safetensors(tmp_path / "w.safetensors", [("a", "float16", (3,), lambda: np.ones(3, np.float16)),
                                                   ("b", "int8", (5,), lambda: np.zeros(5, np.int8))], {"k": "v"})
    assert read_header(tmp_path / "w.safetensors") == {"a": ("float16", (3,)), "b": ("int8", (5,))}


DAMAGED = {
    # Extra bytes at the end: MLX and the safetensors library load the tensors and ignore them.
    "one trailing byte": (GOOD, DATA + b"\0", None, "describes 32 bytes of data, the file holds 33"),
    "trailing tensor": (GOOD, DATA + BIAS.tobytes(), None, "describes 32 bytes of data, the file holds 40"),
    "truncated by one byte": (GOOD, DATA[:-1], None, "describes 32 bytes of data, the file holds 31"),
    "truncated to the header": (GOOD, b"", None, "describes 32 bytes of data, the file holds 0"),
    "header length past the end": (GOOD, DATA, 1 << 20, "bad header length"),
    "header length one past the end": (GOOD, DATA, "past", "bad header length"),
    "header length zero": (GOOD, DATA, 0, "bad header length"),
    "header length short": (GOOD, DATA, 8, "damaged safetensors header"),
    "overlapping offsets": ({"weight": entry("F32", (2, 3), 0, 24), "bias": entry("F32", (2,), 16, 24)},
                            DATA[:24], None, "the data of bias overlaps another tensor"),
    "the same bytes twice": ({"weight": entry("F32", (2,), 0, 8), "bias": entry("F32", (2,), 0, 8)},
                             DATA[:8], None, "overlaps another tensor"),
    "a gap between tensors": ({"weight": entry("F32", (2, 3), 0, 24), "bias": entry("F32", (2,), 28, 36)},
                              DATA + b"\0" * 4, None, "the data of bias leaves a gap"),
    "a gap at the start": ({"weight": entry("F32", (2, 3), 4, 28), "bias": entry("F32", (2,), 28, 36)},
                           b"\0" * 4 + DATA, None, "the data of weight leaves a gap"),
    "shape larger than its bytes": ({"weight": entry("F32", (2, 4), 0, 24), "bias": entry("F32", (2,), 24, 32)},
                                    DATA, None, "weight is float32\\[2, 4\\] but its data is 24 bytes"),
    "dtype wider than its bytes": ({"weight": entry("F64", (2, 3), 0, 24), "bias": entry("F32", (2,), 24, 32)},
                                   DATA, None, "weight is float64\\[2, 3\\] but its data is 24 bytes"),
    "dtype narrower than its bytes": ({"weight": entry("F16", (2, 3), 0, 24), "bias": entry("F32", (2,), 24, 32)},
                                      DATA, None, "weight is float16\\[2, 3\\] but its data is 24 bytes"),
    "offsets backwards": ({"weight": entry("F32", (0,), 24, 24), "bias": entry("F32", (2,), 32, 24)},
                          DATA, None, "bias is float32\\[2\\] but its data is -8 bytes"),
    "unknown dtype": ({"weight": entry("F31", (2, 3), 0, 24), "bias": entry("F32", (2,), 24, 32)},
                      DATA, None, "header entry of weight is damaged"),
    "negative dimension": ({"weight": entry("F32", (-2, -3), 0, 24), "bias": entry("F32", (2,), 24, 32)},
                           DATA, None, "header entry of weight is damaged"),
    "boolean offsets": ({"weight": entry("F32", (2, 3), 0, 24), "bias": entry("F32", (2,), 24, True)},
                        DATA, None, "header entry of bias is damaged"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_files_are_refused_in_one_line(tmp_path, name):
    header, data, length, message = DAMAGED[name]
    if length == "past":  # a header that claims every byte of the file and one more
        blob = json.dumps(header).encode()
        length = len(blob) + (-len(blob) % 8) + len(data) + 1
    path = build(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(SafetensorsError, match=message) as caught:
        read_header(path)
    assert "\n" not in str(caught.value)
    # The model loader refuses it the same way, before MLX reads a byte, and the model keeps its weights.
    layer = linear()
    before = np.array(layer.weight)
    with pytest.raises(ModelLoadError, match=message):
        load_weights_strict(layer, path)
    assert np.array_equal(np.array(layer.weight), before)


def test_files_shorter_than_a_header_length_are_refused(tmp_path):
    for size in (0, 1, 7, 8):
        path = tmp_path / f"short{size}.safetensors"
        path.write_bytes(b"\x02" + b"\0" * (size - 1) if size else b"")
        with pytest.raises(SafetensorsError, match="bad header length"):
            read_header(path)
