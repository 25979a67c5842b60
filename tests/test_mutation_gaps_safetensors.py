"""The safetensors writer's and reader's edges, value by value (gaps found by mutation testing).

The writer's bfloat16 NaN check, its refusal to write float8 from floats, its layout order and its messages
passed every other test when broken; so did the reader's smallest valid header and its exact messages.
"""

import json
import struct

import numpy as np
import pytest

from starflow_mlx.convert.safetensors_stream import (SafetensorsError, all_finite, f32_to_bf16, read_header, to_dtype,
                                                     write_safetensors)
from starflow_mlx.safe_text import printable


@pytest.mark.parametrize("bits,finite", [
    (0x3F80, True), (0x7F7F, True), (0xFF7F, True), (0x0001, True),  # 1.0, the largest finite (both signs), tiny
    (0x7F80, False), (0xFF80, False), (0x7FC0, False), (0xFFC1, False),  # +-inf, NaNs
])
def test_bfloat16_finiteness_reads_the_exponent_bits(bits, finite):
    assert all_finite(np.array([0x3F80, bits], np.uint16), "bfloat16") is finite


def test_finiteness_of_other_dtypes():
    assert all_finite(np.array([1.0, 65504.0], np.float16), "float16")
    assert not all_finite(np.array([1.0, np.inf], np.float16), "float16")
    assert not all_finite(np.array([np.nan], np.float32), "float32")
    assert all_finite(np.array([0x7F80], np.uint16), "uint16")  # integers are always finite, whatever their bits
    assert all_finite(np.array([-1, 0], np.int64), "int64")


def test_f32_to_bf16_rounds_and_keeps_nans():
    values = np.array([1.0, -2.5, 1.0 + 2**-8, 1.0 + 3 * 2**-8], np.float64)  # float64 in: converted first
    assert f32_to_bf16(values).tolist() == [0x3F80, 0xC020, 0x3F80, 0x3F82]  # ties to even: down, then up
    # NaNs whose rounding would carry into infinity or the sign bit stay quiet NaNs with their sign.
    nans = np.array([0x7FFFFFFF, 0x7F800001, 0xFF800001], np.uint32).view(np.float32)
    assert f32_to_bf16(nans).tolist() == [0x7FFF, 0x7FC0, 0xFFC0]


def test_to_dtype_refusals():
    with pytest.raises(ValueError, match="^cannot convert float32 to float8_e4m3fn: float8 is only copied as is$"):
        to_dtype(np.ones(2, np.float32), "float8_e4m3fn")
    with pytest.raises(ValueError, match="^cannot convert float32 to float8_e5m2: float8 is only copied as is$"):
        to_dtype(np.array([0x3F80], np.uint16), "float8_e5m2", "bfloat16")  # bfloat16 goes through float32
    with pytest.raises(ValueError, match="^unknown dtype 'complex64'$"):
        to_dtype(np.ones(2, np.float32), "complex64")


def write(path, entries, metadata=None):
    write_safetensors(path, [(n, d, s, (lambda v=v: v)) for n, d, s, v in entries], metadata)


def test_the_writer_refuses_nan_bfloat16_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="^w holds NaN or infinite values: the checkpoint is damaged "
                                         r"\(download it again\)$"):
        write(tmp_path / "m.safetensors", [("w", "bfloat16", (2,), np.array([0x3F80, 0x7FC0], np.uint16))])
    assert list(tmp_path.iterdir()) == []


def test_the_writer_lays_out_by_dtype_rank_then_name(tmp_path):
    f32 = np.ones(2, np.float32)
    write(tmp_path / "m.safetensors", [("b", "float32", (2,), f32), ("c", "int8", (1,), np.ones(1, np.int8)),
                                       ("a", "float32", (2,), f32), ("d", "float64", (1,), np.ones(1))])
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {k: v["data_offsets"] for k, v in header.items()} == {"d": [0, 8], "a": [8, 16], "b": [16, 24],
                                                                  "c": [24, 25]}


@pytest.mark.parametrize("entries,metadata,message", [
    ([("a", "float32", (1,)), ("x", "complex64", (1,))], None, "^cannot store x as complex64$"),
    ([("a", "float32", (1,))], {"k": 1}, "^safetensors metadata must map strings to strings$"),
    ([("a", "float32", (1,))], {1: "v"}, "^safetensors metadata must map strings to strings$"),
    ([("__metadata__", "float32", (1,))], {"k": "v"}, "^tensor name __metadata__ is reserved$"),
    ([("__metadata__", "float32", (1,))], None, "^tensor name __metadata__ is reserved$"),  # readers take it as metadata
    ([("a", "float32", (1,)), ("a", "int8", (1,))], None, "^tensor name a is used twice$"),
])
def test_the_writer_refuses_bad_entries_by_name(tmp_path, entries, metadata, message):
    with pytest.raises(ValueError, match=message):
        write(tmp_path / "m.safetensors", [(*e, np.ones(1, np.float32)) for e in entries], metadata)
    assert list(tmp_path.iterdir()) == []


def build(path, header_bytes, data=b""):
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def test_the_smallest_header_is_an_empty_object(tmp_path):
    assert read_header(build(tmp_path / "e.safetensors", b"{}")) == {}


def test_reader_messages(tmp_path):
    path = build(tmp_path / "a.safetensors", b"[]")
    with pytest.raises(SafetensorsError, match=f"^{path} has a damaged safetensors header \\(not a JSON object\\)$"):
        read_header(path)
    long = "n" * 200
    path = build(tmp_path / "c.safetensors", json.dumps({long: {"dtype": "F32", "shape": [2],
                                                                "data_offsets": [0, 4]}}).encode(), b"\0" * 4)
    with pytest.raises(SafetensorsError) as caught:
        read_header(path)
    assert str(caught.value) == (f"{path}: {printable(long, 120)} is float32[2] but its data is 4 bytes: "
                                 "the file is damaged")
    assert printable(long, 120) != printable(long, 121)  # the name is cut at 120 characters
    gap = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    path = build(tmp_path / "d.safetensors", json.dumps(gap).encode(), b"\0" * 8)
    with pytest.raises(SafetensorsError) as caught:
        read_header(path)
    assert str(caught.value) == f"{path}: the data of w leaves a gap: the file is damaged"


def test_a_damaged_json_header_is_named_once_with_its_reason(tmp_path):
    path = build(tmp_path / "b.safetensors", b"{bad")
    with pytest.raises(SafetensorsError) as caught:
        read_header(path)
    # The reason whole (it was cut at 80 characters after a second copy of the path), the path once.
    assert str(caught.value) == (f"{path} has a damaged safetensors header (it is not valid JSON (Expecting property "
                                 "name enclosed in double quotes at line 1))")
    path = build(tmp_path / "u.safetensors", b"{\xff}")
    with pytest.raises(SafetensorsError) as caught:
        read_header(path)
    assert str(caught.value) == f"{path} has a damaged safetensors header (invalid start byte)"


def test_a_deeply_nested_header_is_named_as_such(tmp_path):
    from starflow_mlx.jsonconfig import MAX_DEPTH

    path = build(tmp_path / "n.safetensors", b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    with pytest.raises(SafetensorsError) as caught:
        read_header(path)
    assert str(caught.value) == f"{path} has a damaged safetensors header (it is not a real safetensors header)"


def test_a_file_that_cannot_be_created_raises_its_own_error(tmp_path, monkeypatch):
    """The cleanup after a failed start must not replace the error (no temporary file exists to remove)."""
    import starflow_mlx.convert.safetensors_stream as stream

    def refuse(path, mode):
        raise PermissionError(f"no write permission for {path}")

    monkeypatch.setattr(stream, "open", refuse, raising=False)
    with pytest.raises(PermissionError, match="no write permission"):
        write(tmp_path / "m.safetensors", [("a", "float32", (1,), np.ones(1, np.float32))])
