"""Quantized model folders: the policy, round trips, error bounds, both samplers, broken folders."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from typer.testing import CliRunner

from flow_factory import IMAGE, random_flow, save_flow
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.io.loading import ModelLoadError, auto_dtype, load_flow
from starflow_mlx.quantize.policy import QuantizationError
from starflow_mlx.quantize.quantize_folder import block_bits, parse_overrides, quantize_model_folder

register(app)


@pytest.fixture
def float_folder(tmp_path):
    flow = random_flow(**IMAGE)
    save_flow(flow, tmp_path / "f32")
    return tmp_path / "f32"


def inputs(seed=3):
    mx.random.seed(seed)
    return mx.random.normal((2, 4, 4, 4)), mx.random.normal((2, 6, 24)), mx.random.normal((2, 6, 24))


def rel(a, b):
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


# Affine quantization of a group has step (max - min) / (2^bits - 1): 4 bits' step is 255 / 15 = 17x 8 bits'.
# Measured on this flow (z, logdet relative to their peak): 8-bit 9.6e-4, 2.7e-3; 4-bit 8.6e-3, 7.2e-3. The bounds
# leave about 4x and 6x (4-bit's stays below 17x 8-bit's error): a wrong scale or bias per group is far above them.
@pytest.mark.parametrize("bits,bound", [(8, 1e-2), (4, 5e-2)])
def test_round_trip_and_error_bounds(float_folder, tmp_path, bits, bound):
    out = tmp_path / f"q{bits}"
    quantize_model_folder(float_folder, out, bits=bits, group_size=32)
    q, f = load_flow(out), load_flow(float_folder)
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert cfg["bits"] == bits and cfg["layers"]
    x, y, y_u = inputs()
    zq, ldq = q.forward(x, y)
    zf, ldf = f.forward(x, y)
    assert rel(zq, zf) < bound and rel(ldq, ldf) < bound
    # Both samplers run on quantized weights and agree with each other.
    seq = q.reverse(x, y, y_uncond=y_u, cfg=1.0)
    jac = q.reverse(x, y, y_uncond=y_u, cfg=1.0, jacobi=True, jacobi_block_size=4, jacobi_threshold=1e-12,
                    jacobi_max_iter=64)
    assert rel(jac, seq) < 1e-5  # threshold 1e-12: the same fixed point in float32 (measured 3e-7)
    assert (out / "model.safetensors").stat().st_size < (float_folder / "model.safetensors").stat().st_size


def test_default_policy_keeps_projections_in_float(float_folder, tmp_path):
    quantize_model_folder(float_folder, tmp_path / "q", bits=4, group_size=32)
    q = load_flow(tmp_path / "q")
    for block in (b for b in q.blocks if not b.is_identity):
        assert type(block.proj_in) is nn.Linear and type(block.proj_out) is nn.Linear
        assert block.proj_in.weight.dtype == (auto_dtype(True) or mx.float16)  # stored float16; float32 on a CPU
        assert isinstance(block.attn_blocks[0].attention.qkv, nn.QuantizedLinear)
        assert isinstance(block.attn_blocks[0].mlp.main[0], nn.QuantizedLinear)
    assert type(q.blocks[-1].proj_txt) is nn.Linear


def test_mixed_deep_and_shallow_bits(float_folder, tmp_path):
    blocks = block_bits(4, deep_bits=4, shallow_bits=8)
    quantize_model_folder(float_folder, tmp_path / "q", bits=4, group_size=32, blocks=blocks)
    q = load_flow(tmp_path / "q")
    assert q.blocks[-1].attn_blocks[0].attention.qkv.bits == 4
    assert q.blocks[0].attn_blocks[0].attention.qkv.bits == 8
    # Per-block widths keep the default policy: projections stay float, as with --bits alone.
    for block in (b for b in q.blocks if not b.is_identity):
        assert type(block.proj_in) is nn.Linear and type(block.proj_out) is nn.Linear
    assert type(q.blocks[-1].proj_txt) is nn.Linear
    # An explicit override still reaches a kept layer.
    forced = parse_overrides(["blocks.3.proj_out=8"])
    quantize_model_folder(float_folder, tmp_path / "o", bits=4, group_size=32, overrides=forced, blocks=blocks)
    assert load_flow(tmp_path / "o").blocks[3].proj_out.bits == 8
    keep = parse_overrides(["blocks.3.attn_blocks.1.*=0"])
    quantize_model_folder(float_folder, tmp_path / "k", bits=4, group_size=32, overrides=keep)
    k = load_flow(tmp_path / "k")
    assert type(k.blocks[3].attn_blocks[1].attention.qkv) is nn.Linear
    assert isinstance(k.blocks[3].attn_blocks[0].attention.qkv, nn.QuantizedLinear)


def test_loading_never_requantizes(float_folder, tmp_path):
    quantize_model_folder(float_folder, tmp_path / "q", bits=4, group_size=32)
    a = load_flow(tmp_path / "q").blocks[-1].attn_blocks[0].attention.qkv
    b = load_flow(tmp_path / "q").blocks[-1].attn_blocks[0].attention.qkv
    stored = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert mx.array_equal(a.weight, stored["blocks.3.attn_blocks.0.attention.qkv.weight"])
    assert mx.array_equal(a.scales, b.scales)


def test_bad_settings_and_broken_folders(float_folder, tmp_path):
    with pytest.raises(QuantizationError, match="^bits must be 4 or 8"):
        quantize_model_folder(float_folder, tmp_path / "x", bits=3)
    with pytest.raises(QuantizationError, match="^group_size must be"):
        quantize_model_folder(float_folder, tmp_path / "x", bits=4, group_size=48)
    assert not (tmp_path / "x").exists()
    quantize_model_folder(float_folder, tmp_path / "q", bits=4, group_size=32)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model_folder(tmp_path / "q", tmp_path / "qq", bits=8)
    # A config that claims quantization over float weights (or the reverse) is refused by name.
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    (float_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"lacks .*\.(scales|biases)"):
        load_flow(float_folder)
    cfg["quantization"]["layers"]["blocks.9.proj"] = {"bits": 4, "group_size": 32}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match="blocks.9.proj"):
        load_flow(tmp_path / "q")


def test_cli_quantize_and_report(float_folder, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["quantize", str(float_folder), "--bits", "8", "--group-size", "32",
                              "-o", str(tmp_path / "q8")])
    assert res.exit_code == 0, res.output
    assert "layers at 8-bit" in res.output
    assert load_flow(tmp_path / "q8").config.quantization["bits"] == 8
    res = runner.invoke(app, ["quantize", str(float_folder), "--report", "--json", "--group-size", "32",
                              "--samples", "4"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)  # progress lines go to stderr
    assert [r["variant"] for r in rows][:3] == ["float16", "int8", "int4"]
    f16, i8, i4 = rows[:3]
    assert i4["file_mb"] < i8["file_mb"] < f16["file_mb"]
    assert i8["z_rel_error"] <= i4["z_rel_error"]


def test_text_encoder_quantizes_to_8_bit(tmp_path):
    from fixtures_t5 import make_tiny_mlx_t5

    from starflow_mlx.io.text_encoder import load_text_encoder, quantize_text_encoder

    src = make_tiny_mlx_t5(tmp_path / "t5")
    quantize_text_encoder(src, tmp_path / "q", bits=8, group_size=32)
    ref, q = load_text_encoder(src), load_text_encoder(tmp_path / "q")
    assert isinstance(q.model.encoder.block[0].layer[0].SelfAttention.q, nn.QuantizedLinear)
    prompts = ["a cat playing piano", "hello"]
    assert rel(q.encode(prompts, 8), ref.encode(prompts, 8)) < 5e-2
