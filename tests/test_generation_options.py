"""Parameters from PNG metadata and images from users: typed, bounded, and read without trusting them."""

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest
from typer.testing import CliRunner

from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.io.generation_options import GenerationOptions
from starflow_mlx.jsonconfig import ConfigError
from starflow_mlx.pipelines.settings import check_options
from starflow_mlx.pipelines.image_files import METADATA_KEY

register(app)
runner = CliRunner()
GOOD = {"prompt": "7", "model": "demo", "seed": 1, "cfg": 2.0, "aspect_ratio": "1:1", "num_images": 2,
        "jacobi": True, "jacobi_block_size": 64, "jacobi_threshold": 0.005, "jacobi_max_iter": 32, "dtype": None,
        "index": 1, "version": "0.1.0"}


def test_good_metadata_round_trips():
    # Files from before batching, quantized caches and LoRA: one batch, a float cache, no adapter.
    expected = {**{k: v for k, v in GOOD.items() if k != "version"}, "batch_size": None, "kv_bits": None,
                "lora": None, "lora_scale": 1.0}
    assert GenerationOptions.from_metadata(GOOD, "x.png") == expected


@pytest.mark.parametrize("key, value, message", [
    ("seed", 2**70, "seed must be at most"),
    ("seed", -1, "seed must be at least 0"),
    ("jacobi_block_size", 1e12, "jacobi_block_size must be int"),
    ("jacobi_block_size", 10**12, "jacobi_block_size must be at most"),
    ("jacobi_threshold", float("nan"), "jacobi_threshold must be float or null, got NaN"),
    ("jacobi_threshold", 0, "jacobi_threshold must be at least"),
    ("jacobi_max_iter", 10**9, "jacobi_max_iter must be at most"),
    ("lora_scale", float("inf"), r"lora_scale must be float or list\[float\], got Infinity"),
    ("num_images", 10**13, "num_images must be at most"),
    ("index", 5, "index 5 is not one of the 2 images"),
    ("dtype", "float8", "dtype must be one of"),
    ("cfg", "2", "cfg must be float"),
])
def test_bad_metadata_is_one_line(key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        GenerationOptions.from_metadata({**GOOD, key: value}, "x.png has damaged starflow-mlx metadata")
    assert str(err.value).startswith("x.png has damaged starflow-mlx metadata") and "\n" not in str(err.value)


def test_nan_threshold_is_refused_before_sampling():
    for threshold in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="jacobi_threshold must be a number from"):
            check_options(0, 1.0, 1, 64, threshold, 32)
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        check_options(2**70, 1.0, 1, 64, 0.005, 32)


def test_nan_threshold_from_the_command_line_does_not_hang(tmp_path):
    res = subprocess.run([sys.executable, "-c", "from starflow_mlx.apps.cli import main; main()", "generate", "7",
                          "--model", "demo", "--jacobi-threshold", "nan", "-o", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "--jacobi-threshold must be a number from" in res.stderr
    assert not (tmp_path / "x.png").exists()


def bomb_png(path, side=12000, metadata=None):
    """A 1.4 KB PNG declaring side x side RGB pixels (432 MB decoded at 12000): between PIL's warning
    and error limits, so PIL alone would decode it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + bytes(3 * side)
    body = zlib.compressobj(9)
    idat = b"".join(body.compress(row) for _ in range(side)) + body.flush()
    text = chunk(b"tEXt", METADATA_KEY.encode() + b"\x00" + json.dumps(metadata).encode()) if metadata else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + text + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_in_bounded_memory(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1 << 20
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (200 << 20, 200 << 20))\n"
            "from starflow_mlx.io.image_input import open_image\n"
            "try:\n    open_image(sys.argv[1])\nexcept ValueError as exc:\n    print(exc)\n")
    res = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert res.returncode == 0 and "decompression bomb" in res.stdout


@pytest.mark.parametrize("command", ["score", "generate"])
def test_bomb_in_score_and_from_metadata_is_one_line(tmp_path, command):
    bomb = bomb_png(tmp_path / "bomb.png", metadata=GOOD)
    args = ["score", str(bomb), "-p", "7", "--model", "demo"] if command == "score" else \
        ["generate", "--from-metadata", str(bomb), "-o", str(tmp_path / "again.png")]
    res = runner.invoke(app, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "decompression bomb" in lines[0], res.output
    assert not (tmp_path / "again.png").exists()
