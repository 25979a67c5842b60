"""Quantized KV caches: what they store, how close their samples stay, the memory they save, bad values."""

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from flow_factory import IMAGE, VIDEO, flow_inputs, random_flow, rel
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.config import FlowConfig
from starflow_mlx.io.generation_options import GenerationOptions
from starflow_mlx.jsonconfig import ConfigError
from starflow_mlx.models.kv_cache import kv_bytes_per_value
from starflow_mlx.pipelines.video import kv_cache_bytes

register(app)
runner = CliRunner()


def test_a_quantized_cache_stores_packed_integers_and_its_scales():
    block = random_flow(**IMAGE).blocks[-1]
    floats, packed = block.new_cache(2, 40), block.new_cache(2, 40, bits=4)
    assert [a.dtype for a in packed.state()[:3]] == [mx.uint32, block.dtype, block.dtype]
    ratio = sum(a.nbytes for a in packed.state()) / sum(a.nbytes for a in floats.state())
    assert ratio == pytest.approx(kv_bytes_per_value(4, block.dtype.size, block.head_dim) / block.dtype.size)


@pytest.mark.parametrize("fields,frames", [(IMAGE, 0), (VIDEO, 3)])
@pytest.mark.parametrize("jacobi", [False, True])
def test_samples_stay_close_to_the_float_cache(fields, frames, jacobi):
    flow = random_flow(**fields)
    z, y, y_u = flow_inputs(flow, frames=frames)
    ref = flow.reverse(z, y, y_uncond=y_u, cfg=1.5)
    options = dict(y_uncond=y_u, cfg=1.5, jacobi=jacobi, jacobi_threshold=1e-10)
    eight, four = (flow.reverse(z, y, kv_bits=bits, **options) for bits in (8, 4))
    assert 0 < rel(eight, ref) < 5e-3 and rel(eight, ref) < rel(four, ref) < 6e-2


def test_the_deep_block_cache_of_a_long_video_shrinks():
    cfg = FlowConfig(in_channels=48, channels=3072, top_block_channels=4096, layers_per_block=[2, 2, 2, 2, 2, 24],
                     latent_size=40, head_dim=64, txt_size=256, txt_dim=2048, num_frames=21, sos=True)
    full = kv_cache_bytes(cfg, 21, 30 * 53, 1, 2)
    assert full / 2**30 == pytest.approx(24.6, abs=0.1)  # 81 frames at 480x848, guided, float16
    assert kv_cache_bytes(cfg, 21, 30 * 53, 1, 2, 8) / full == pytest.approx(1.0625 / 2)
    assert kv_cache_bytes(cfg, 21, 30 * 53, 1, 2, 4) / full == pytest.approx(0.5625 / 2)


def test_bad_bit_counts_are_refused():
    flow = random_flow(**IMAGE)
    z, y, y_u = flow_inputs(flow)
    with pytest.raises(ValueError, match="kv_bits must be 8, 4 or None"):
        flow.reverse(z, y, kv_bits=3)
    with pytest.raises(ConfigError, match="kv_bits must be one of"):
        GenerationOptions.from_dict(dict(prompt="7", model="demo", seed=0, cfg=2.0, aspect_ratio="1:1", jacobi=False,
                                         jacobi_block_size=64, jacobi_threshold=0.005, jacobi_max_iter=32,
                                         num_images=1, kv_bits=5), "metadata")


def test_the_command_line_records_kv_bits_and_regenerates_the_same_bytes(tmp_path):
    from starflow_mlx.pipelines.image_files import read_metadata

    out = tmp_path / "seven.png"
    res = runner.invoke(app, ["generate", "7", "--model", "demo", "-n", "2", "--kv-bits", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert read_metadata(out)["kv_bits"] == 4
    res = runner.invoke(app, ["generate", "--model", "demo", "--from-metadata", str(out)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "seven-again.png").read_bytes() == out.read_bytes()
    res = runner.invoke(app, ["generate", "7", "--model", "demo", "--kv-bits", "2", "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and res.output.strip() == "error: --kv-bits must be 8 or 4, got 2"
    assert not (tmp_path / "x.png").exists()
