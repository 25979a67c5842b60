"""LoRA scaling and merging against the adapter file's own matrices (gaps found by mutation testing).

test_lora_loading.py compares a fused layer with ``base + layer.delta()`` and several adapters with each one loaded
alone: both sides share the scale, so ``alpha * rank`` for ``alpha / rank``, or ``lora_scale`` dropped, passes them.
Here every expected value is ``lora_scale * alpha / rank * B @ A`` with A and B read from ``adapter.safetensors``.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from flow_factory import IMAGE, random_flow, save_flow
from starflow_mlx.io.adapters import load_adapter, load_adapters, save_adapter
from starflow_mlx.io.loading import load_flow
from starflow_mlx.advice import cli_message
from starflow_mlx.config import FlowConfig
from starflow_mlx.jsonconfig import ConfigError
from starflow_mlx.models.lora import (ADAPTER_WEIGHTS, AdapterConfig, AdapterError, LoRALinear, apply_lora,
                                      base_identity, check_blocks, check_rank, check_scale, fuse_lora, lora_layers,
                                      target_paths)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-base") / "model"
    save_flow(random_flow(0, **IMAGE), folder)
    return folder


def make_adapter(base, folder, rank, alpha, blocks="deep", seed=0):
    flow = load_flow(base)
    targets = target_paths(flow, blocks)
    apply_lora(flow, targets, rank, 123.0)  # the scale used while training is not saved: the config's alpha is
    mx.random.seed(seed)
    for _, layer in lora_layers(flow):
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    digest, shape = base_identity(flow.config)
    folder.mkdir(parents=True)
    save_adapter(flow, AdapterConfig(rank=rank, alpha=alpha, targets=targets, blocks=blocks, base_hash=digest,
                                     base_shape=shape), folder)
    return folder


def file_update(folder, path):
    """B @ A of one layer, from the adapter file, float64."""
    saved = mx.load(str(folder / ADAPTER_WEIGHTS))
    a, b = (np.array(saved[f"{path}.{name}"], np.float64) for name in ("lora_a", "lora_b"))
    return b @ a


def weights(flow):
    return {path: np.array(m.weight, np.float64) for path, m in flow.named_modules() if isinstance(m, nn.Linear)}


def test_scale_is_alpha_over_rank():
    config = AdapterConfig(rank=4, alpha=6.0, targets=["blocks.0.attn_blocks.0.attention.qkv"], base_hash="x")
    assert config.scale == 1.5


def test_a_loaded_adapter_adds_lora_scale_times_alpha_over_rank_b_a(base, tmp_path):
    folder = make_adapter(base, tmp_path / "a", rank=2, alpha=6.0)  # alpha / rank = 3
    plain = weights(load_flow(base))
    flow = load_flow(base)
    config = load_adapter(flow, folder, 0.5)
    assert config.rank == 2 and config.alpha == 6.0
    layers = dict(lora_layers(flow))
    assert layers and all(layer.scale == 1.5 for layer in layers.values())
    fuse_lora(flow)
    fused = weights(flow)
    for path in layers:
        # float32 weights of order 0.1 plus an update of order 1e-2: float32 rounding, 1e-6 absolute.
        np.testing.assert_allclose(fused[path], plain[path] + 1.5 * file_update(folder, path), rtol=0, atol=1e-6)
    untouched = set(plain) - set(layers)
    assert untouched and all(np.array_equal(fused[p], plain[p]) for p in untouched)


def test_several_adapters_add_each_scaled_update(base, tmp_path):
    a = make_adapter(base, tmp_path / "a", rank=2, alpha=2.0, blocks="deep", seed=1)  # alpha / rank 1
    b = make_adapter(base, tmp_path / "b", rank=3, alpha=12.0, blocks="all", seed=2)  # alpha / rank 4
    plain = weights(load_flow(base))
    flow = load_flow(base)
    configs = load_adapters(flow, [a, b], [0.5, -0.25])
    assert [c.rank for c in configs] == [2, 3]
    deep = set(target_paths(flow, "deep"))
    layers = dict(lora_layers(flow))
    assert set(layers) == set(target_paths(flow, "all"))
    for path, layer in layers.items():
        assert layer.scale == 1.0 and layer.lora_a.shape[0] == (5 if path in deep else 3)
    fuse_lora(flow)
    fused = weights(flow)
    for path in layers:
        expected = plain[path] + (-0.25 * 4.0) * file_update(b, path)
        if path in deep:
            expected = expected + (0.5 * 1.0) * file_update(a, path)
        np.testing.assert_allclose(fused[path], expected, rtol=0, atol=1e-6)


def test_lora_linear_by_hand():
    """base(x) + scale * x A^T B^T, and fusing adds scale * B A to W (nn.Linear stores (out, in))."""
    rng = np.random.default_rng(0)
    w, bias = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    a, b = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    linear = nn.Linear(4, 3)
    linear.weight, linear.bias = mx.array(w), mx.array(bias)
    layer = LoRALinear(linear, rank=2, scale=0.75)
    layer.lora_a, layer.lora_b = mx.array(a), mx.array(b)
    expected = x @ w.T + bias + 0.75 * (x @ a.T) @ b.T
    np.testing.assert_allclose(np.array(layer(mx.array(x))), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(layer.delta()), 0.75 * b @ a, rtol=0, atol=1e-6)
    fused = layer.fused()
    np.testing.assert_allclose(np.array(fused.weight), w + 0.75 * b @ a, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.array(fused.bias), bias)
    np.testing.assert_allclose(np.array(fused(mx.array(x))), expected, rtol=0, atol=1e-5)


def test_a_quantized_base_fuses_to_its_dequantized_weight_plus_the_update():
    """QLoRA: the fused layer is the base's dequantized weight plus scale * B A, quantized again with the base's
    group size and bits (so 8-bit stays 8-bit), and keeps a bias-free base bias-free."""
    rng = np.random.default_rng(1)
    linear = nn.Linear(64, 8, bias=False)
    linear.weight = mx.array(rng.normal(size=(8, 64)).astype(np.float32))
    q = linear.to_quantized(group_size=32, bits=8)  # not MLX's default 4: a dropped bits argument shows
    layer = LoRALinear(q, rank=2, scale=2.0)
    layer.lora_a = mx.array(rng.normal(size=(2, 64)).astype(np.float32))
    layer.lora_b = mx.array(0.1 * rng.normal(size=(8, 2)).astype(np.float32))
    fused = layer.fused()
    assert isinstance(fused, nn.QuantizedLinear) and (fused.group_size, fused.bits) == (32, 8) and "bias" not in fused
    target = np.array(mx.dequantize(q.weight, q.scales, q.biases, 32, 8)) + 2.0 * np.array(layer.lora_b) @ np.array(layer.lora_a)
    requantized = mx.dequantize(*mx.quantize(mx.array(target), group_size=32, bits=8), group_size=32, bits=8)
    got = np.array(mx.dequantize(fused.weight, fused.scales, fused.biases, 32, 8))
    # The same float32 target quantized the same way; numpy's and MLX's sums may differ in the last bit: 1e-5.
    np.testing.assert_allclose(got, np.array(requantized), rtol=0, atol=1e-5)


def test_the_first_matrix_starts_like_nn_linear_and_the_second_at_zero():
    mx.random.seed(3)
    layer = LoRALinear(nn.Linear(100, 7), rank=50, scale=1.0)
    a = np.array(layer.lora_a)
    # U(-1/sqrt(in), 1/sqrt(in)): 5000 draws reach near both ends
    assert a.shape == (50, 100) and np.abs(a).max() <= 0.1 and a.max() > 0.09 and a.min() < -0.09
    assert np.array(layer.lora_b).shape == (7, 50) and not np.array(layer.lora_b).any()


@pytest.mark.parametrize("scale,ok", [(-1000.0, True), (1000.0, True), (1000.5, False), (-1000.5, False),
                                      (float("nan"), False), (0.0, True)])
def test_lora_scale_bounds(scale, ok):
    if ok:
        check_scale(scale)
    else:
        with pytest.raises(AdapterError, match="^lora_scale must be a number between -1000 and 1000") as caught:
            check_scale(scale)
        assert caught.value.cli_message.startswith("--lora-scale must be")


@pytest.mark.parametrize("rank,alpha,ok", [(1, 0.0, True), (4096, None, True), (0, None, False), (4097, 1.0, False),
                                           (2, -0.5, False), (2, float("inf"), False), (2, float("nan"), False)])
def test_rank_and_alpha_bounds(rank, alpha, ok):
    if ok:
        check_rank(rank, alpha)
    else:
        with pytest.raises(AdapterError, match="^rank must be between 1 and 4096" if not 1 <= rank <= 4096 else
                           "^alpha must be a number 0 or more"):
            check_rank(rank, alpha)


def test_only_the_lora_matrices_of_the_targets_train(base):
    """apply_lora freezes the model and unfreezes each target's A and B: not its base weights, not other layers."""
    from mlx.utils import tree_flatten

    flow = load_flow(base)
    targets = target_paths(flow, "deep")[:3]
    apply_lora(flow, targets, 2, 1.0)
    trainable = {name for name, _ in tree_flatten(flow.trainable_parameters())}
    assert trainable == {f"{path}.{m}" for path in targets for m in ("lora_a", "lora_b")}


def test_a_target_that_is_not_a_linear_is_named(base):
    flow = load_flow(base)
    with pytest.raises(AdapterError, match=r"^the adapter targets blocks\.9\.attn_blocks\.0\.attention\.qkv, which this "
                                           "model does not have as a linear layer$"):
        apply_lora(flow, ["blocks.9.attn_blocks.0.attention.qkv"], 2, 1.0)


# -- The rest of the module: the config's target check, block choice, base identity, layer paths and sizes ------


def test_the_first_target_that_is_not_a_flow_linear_is_named_cut_at_80_characters():
    good = "blocks.0.attn_blocks.0.attention.qkv"
    for bad, shown in ((["x" * 100, "y"], "x" * 80), ([good + ".weight"], good + ".weight")):
        with pytest.raises(ConfigError) as refused:
            AdapterConfig(rank=2, alpha=2.0, targets=[good, *bad], base_hash="x")
        assert str(refused.value) == (f"LoRA adapter config: target {shown!r} is not an attention or MLP linear of "
                                      "a flow")
    long = "blocks." + "1" * 100 + ".attn_blocks.0.attention.qkv"
    for twice, shown in (([good, "blocks.1.attn_blocks.0.mlp.main.0", good], good), ([long, long], long[:80])):
        with pytest.raises(ConfigError) as refused:
            AdapterConfig(rank=2, alpha=2.0, targets=twice, base_hash="x")
        assert str(refused.value) == f"LoRA adapter config: target {shown!r} is listed more than once"
    with pytest.raises(ConfigError) as refused:
        AdapterConfig(rank=2, alpha=2.0, targets=[], base_hash="x")
    assert str(refused.value) == "LoRA adapter config: targets is empty: the adapter changes nothing"


def test_an_unknown_block_choice_names_the_choices():
    with pytest.raises(AdapterError) as refused:
        check_blocks("top")
    assert str(refused.value) == "blocks must be deep, shallow or all, got 'top'"
    assert cli_message(refused.value) == "--lora-blocks must be deep, shallow or all, got 'top'"
    for blocks in ("deep", "shallow", "all"):
        check_blocks(blocks)


def test_base_identity_is_the_sorted_architecture_hash_ignoring_storage_and_sampling():
    """The hash adapters already on disk carry: sha256 of the architecture's JSON with sorted keys, 16 hex digits;
    dtype, quantization, default guidance and extras do not change it, an architecture field does."""
    import dataclasses
    import hashlib
    import json

    config = FlowConfig(**IMAGE)
    arch = {k: v for k, v in config.to_dict().items() if k not in ("dtype", "quantization", "cfg", "extra")}
    digest, shape = base_identity(config)
    assert digest == hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    assert shape == "channels 64, layers [1, 0, 1, 2], 4x4"
    stored = dataclasses.replace(config, dtype="float16", cfg=3.0, extra={"note": 1},
                                 quantization={"bits": 4, "group_size": 64})
    assert base_identity(stored)[0] == digest
    assert base_identity(dataclasses.replace(config, channels=96))[0] != digest


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_linear_dims_of_float_and_quantized_layers(bits):
    from starflow_mlx.models.lora import linear_dims

    layer = nn.Linear(64, 8)
    if bits:
        layer = layer.to_quantized(group_size=32, bits=bits)
    dims = linear_dims(layer)
    assert dims == (8, 64) and all(type(d) is int for d in dims)  # shapes: 64.0 would not do


def test_target_paths_of_each_block_choice(base):
    """IMAGE has layers [1, 0, 1, 2]: the deep block is blocks.3, the others 0 and 2 (1 is empty)."""
    flow = load_flow(base)
    linears = ("attention.qkv", "attention.proj", "mlp.main.0", "mlp.main.2")
    paths = {block: {f"blocks.{block}.attn_blocks.{i}.{name}" for i in range(n) for name in linears}
             for block, n in ((0, 1), (2, 1), (3, 2))}
    assert set(target_paths(flow, "deep")) == paths[3]
    assert set(target_paths(flow, "shallow")) == paths[0] | paths[2]
    assert set(target_paths(flow, "all")) == paths[0] | paths[2] | paths[3]


def test_modules_are_found_and_replaced_by_path_in_lists_and_attributes(base):
    from starflow_mlx.models.lora import _get, _set

    flow = load_flow(base)
    assert _get(flow, "blocks.0.attn_blocks.0.mlp.main.0") is flow.blocks[0].attn_blocks[0].mlp.main[0]
    assert _get(flow, "blocks.3.attn_blocks.1.attention.qkv") is flow.blocks[3].attn_blocks[1].attention.qkv
    for missing in ("blocks.9.attn_blocks.0.attention.qkv", "blocks.x.attn_blocks.0.attention.qkv",
                    "blocks.0.attn_blocks.0.attention.nothing", "nothing.at.all"):
        assert _get(flow, missing) is None, missing
    new, other = nn.Linear(2, 2), nn.Linear(3, 3)
    _set(flow, "blocks.0.attn_blocks.0.mlp.main.2", new)  # an item of a list
    _set(flow, "blocks.2.attn_blocks.0.attention.proj", other)  # an attribute
    assert flow.blocks[0].attn_blocks[0].mlp.main[2] is new and flow.blocks[2].attn_blocks[0].attention.proj is other


def test_lora_weights_and_trainable_count_name_and_count_only_a_and_b(base):
    from starflow_mlx.models.lora import linear_dims, lora_weights, trainable_count

    flow = load_flow(base)
    targets = target_paths(flow, "shallow")[:3]
    dims = {path: linear_dims(_module(flow, path)) for path in targets}
    apply_lora(flow, targets, 3, 1.0)
    weights = lora_weights(flow)
    assert set(weights) == {f"{p}.{m}" for p in targets for m in ("lora_a", "lora_b")}
    for path, (out_dims, in_dims) in dims.items():
        assert weights[f"{path}.lora_a"].shape == (3, in_dims) and weights[f"{path}.lora_b"].shape == (out_dims, 3)
    assert trainable_count(flow) == sum(3 * (o + i) for o, i in dims.values())
    assert [p for p, _ in lora_layers(flow)] == [p for p, _ in flow.named_modules() if p in dims]


def _module(flow, path):
    return dict(flow.named_modules())[path]
