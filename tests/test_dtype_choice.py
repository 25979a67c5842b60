"""Compute dtype per device: quantized models run float32 scales on the CPU, stay float16 on a GPU."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from starflow_mlx.io import loading
from starflow_mlx.quantize.quantize_folder import quantize_model_folder

CPU, GPU = mx.Device(mx.cpu), mx.Device(mx.gpu)


def test_rule_per_device():
    assert loading.auto_dtype(True, CPU) == mx.float32
    assert loading.auto_dtype(True, GPU) is None  # Metal/CUDA kernels are fast with the stored float16
    assert loading.auto_dtype(False, CPU) is None  # unquantized weights keep their memory footprint
    assert loading.auto_dtype(False, GPU) is None


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "demo-int8"
    quantize_model_folder("demo", out, bits=8)
    return out


def float_dtypes(flow) -> set:
    return {a.dtype for _, a in tree_flatten(flow.parameters()) if mx.issubdtype(a.dtype, mx.floating)}


@pytest.mark.parametrize("device, expected", [(CPU, {mx.float32}), (GPU, {mx.float16})])
def test_load_flow_picks_per_device(int8_folder, monkeypatch, device, expected):
    monkeypatch.setattr(loading.mx, "default_device", lambda: device)
    flow = loading.load_flow(int8_folder)
    assert float_dtypes(flow) == expected
    assert flow.blocks[-1].dtype == next(iter(expected))  # activations follow the scales


def test_explicit_dtype_overrides(int8_folder):
    assert float_dtypes(loading.load_flow(int8_folder, dtype="float16")) == {mx.float16}
    assert float_dtypes(loading.load_flow("demo")) == {mx.float32}  # unquantized: as stored (the demo is float32)
    assert float_dtypes(loading.load_flow("demo", dtype="bfloat16")) == {mx.bfloat16}


@pytest.mark.parametrize("device, expected", [(CPU, mx.float32), (GPU, mx.float16)])
def test_quantized_text_encoder_picks_per_device(tmp_path, monkeypatch, device, expected):
    from fixtures_t5 import make_tiny_mlx_t5

    from starflow_mlx.io.text_encoder import load_text_encoder, quantize_text_encoder

    quantize_text_encoder(make_tiny_mlx_t5(tmp_path / "t5"), tmp_path / "q", bits=8, group_size=32)
    monkeypatch.setattr(loading.mx, "default_device", lambda: device)
    encoder = load_text_encoder(tmp_path / "q")
    assert encoder.model.encoder.block[0].layer[0].SelfAttention.q.scales.dtype == expected
