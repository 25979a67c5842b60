"""Hostile values (issue 28): options, weights, manifests, model kinds and adapters that would crash,
hang or write a blank result are refused with one ``error:`` line, checked once where they enter."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_cli import one_line
from flow_factory import VIDEO, flow_inputs, random_flow
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.pipelines.image_files import METADATA_KEY

register(app)
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- B. Jacobi settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--jacobi-block-size", 10**12, "--jacobi-block-size must be an integer from 1 to 65536"),
    ("--jacobi-block-size", 10**8, "--jacobi-block-size must be an integer from 1 to 65536"),
    ("--jacobi-block-size", 0, "--jacobi-block-size must be an integer from 1 to 65536"),
    ("--jacobi-max-iter", 10**9, "--jacobi-max-iter must be an integer from 1 to 10000"),
    ("--jacobi-threshold", "inf", "--jacobi-threshold must be a number from"),
    ("--jacobi-threshold", "-1", "--jacobi-threshold must be a number from"),
])
def test_jacobi_options_out_of_bounds_are_one_line(tmp_path, flag, value, message):
    line = one_line(cli("generate", "3", "--model", "demo", "--jacobi", flag, value, "-o", tmp_path / "x.png"))
    assert message in line and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name, value", [("jacobi_block_size", 2.5), ("jacobi_block_size", True),
                                         ("jacobi_max_iter", 0), ("jacobi_threshold", float("nan")),
                                         ("jacobi_threshold", 1e9)])
def test_jacobi_options_out_of_bounds_in_the_python_api(name, value):
    pipe = Pipeline.from_pretrained("demo")
    with pytest.raises(ValueError, match=f"{name} must be"):
        pipe.sample("3", jacobi=True, **{name: value})


def test_block_size_beyond_the_sequence_is_the_whole_sequence():
    pipe = Pipeline.from_pretrained("demo")  # 8x8 tokens
    whole = pipe.sample("3", jacobi=True, jacobi_block_size=64)
    assert mx.array_equal(pipe.sample("3", jacobi=True, jacobi_block_size=1 << 16), whole)


def test_video_block_size_beyond_the_sequence_is_the_whole_sequence():
    flow = random_flow(**VIDEO)
    z, y, y_u = flow_inputs(flow, batch=1, frames=2)
    n = 2 * flow.config.latent_size ** 2  # tokens of the deep block
    run = dict(y_uncond=y_u, cfg=1.5, jacobi=True, jacobi_max_iter=4)
    whole = flow.reverse(z, y, jacobi_block_size=n, **run)
    assert mx.array_equal(flow.reverse(z, y, jacobi_block_size=1 << 16, **run), whole)


def png_with_metadata(path, **changes):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = {"prompt": "7", "model": "demo", "seed": 1, "cfg": 2.0, "aspect_ratio": "1:1", "num_images": 1,
            "jacobi": True, "jacobi_block_size": 64, "jacobi_threshold": 0.005, "jacobi_max_iter": 32,
            "dtype": None, "version": "0.1.0", **changes}
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(meta))
    Image.new("L", (8, 8)).save(path, pnginfo=info)
    return path


def test_largest_block_size_from_metadata_runs(tmp_path):
    src = png_with_metadata(tmp_path / "a.png", jacobi_block_size=1 << 16)
    res = subprocess.run([sys.executable, "-c", "from starflow_mlx.apps.cli import main; main()", "generate",
                          "--from-metadata", str(src), "-o", str(tmp_path / "b.png")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "b.png").exists(), res.stderr


@pytest.mark.parametrize("key, value", [("jacobi_block_size", 10**12), ("jacobi_max_iter", 10**6),
                                        ("jacobi_threshold", 1e300)])
def test_jacobi_metadata_out_of_bounds_is_one_line(tmp_path, key, value):
    src = png_with_metadata(tmp_path / "a.png", **{key: value})
    line = one_line(cli("generate", "--from-metadata", src, "-o", tmp_path / "b.png"))
    assert key in line and not (tmp_path / "b.png").exists()
