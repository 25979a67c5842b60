"""Checkpointed LoRA layers attend a group of heads at a time: the same outputs and gradients as all heads at once,
and a step's memory within the estimate that counts one group's scores (the peak comparison at the 7B's shapes is
in benchmarks/README.md, "Attention a group of heads at a time")."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import starflow_mlx.training.head_groups as head_groups
from starflow_mlx.benchmarks.configs import NAMED
from starflow_mlx.benchmarks.lora_memory import EXTRA, measure_step
from starflow_mlx.config import FlowConfig
from starflow_mlx.models.layers import attention
from starflow_mlx.models.lora import apply_lora, target_paths
from starflow_mlx.models.starflow import STARFlow
from starflow_mlx.training.head_groups import grouped_attention, heads_at_once
from starflow_mlx.training.lora import LoRASettings, checkpoint_layers, lora_training_bytes
from starflow_mlx.training.trainer import nll_per_dim

TOKENS = 12


def per_head(tokens=TOKENS):
    return 4 * tokens * tokens  # bytes of one head's float32 scores


def test_a_group_is_whole_kv_heads_within_the_budget(monkeypatch):
    monkeypatch.setattr(head_groups, "SCORE_BYTES", 5 * per_head())
    assert heads_at_once(8, 8, TOKENS, TOKENS) == 5
    assert heads_at_once(8, 4, TOKENS, TOKENS) == 4  # 2 query heads share a key/value head
    assert heads_at_once(8, 1, TOKENS, TOKENS) == 8  # never fewer than the heads of one key/value head
    assert heads_at_once(3, 3, TOKENS, TOKENS) == 3
    assert heads_at_once(8, 8, 1000, 1000) == 1


# 7 heads in groups of 3, 3, 1; 6 query heads on 3 key/value heads in groups of 2 (one key/value head each)
@pytest.mark.parametrize("heads, kv_heads", [(7, 7), (6, 3)])
@pytest.mark.parametrize("mask", ["causal", None])
def test_grouped_attention_and_its_gradients_equal_all_heads_at_once(monkeypatch, heads, kv_heads, mask):
    monkeypatch.setattr(head_groups, "SCORE_BYTES", 3 * per_head())
    mx.random.seed(0)
    q, cotangent = (mx.random.normal((2, heads, TOKENS, 8)) for _ in range(2))
    k, v = (mx.random.normal((2, kv_heads, TOKENS, 8)) for _ in range(2))
    outs = [mx.vjp(lambda q, k, v: [fn(q, k, v, 0.3, mask)], [q, k, v], [cotangent])
            for fn in (attention, grouped_attention)]
    (plain, plain_grads), (grouped, grouped_grads) = outs
    assert np.allclose(plain[0], grouped[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(plain_grads, grouped_grads, strict=True):
        assert a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-6)


def tiny_flow() -> STARFlow:
    """A text-conditioned flow with 8 heads of 32 channels, rank-4 LoRA on every block (B random, so A has gradients
    too), checkpointed."""
    config = FlowConfig(**{k: v for k, v in NAMED["tiny"].items() if k not in EXTRA} | dict(channels=256, latent_size=6))
    mx.random.seed(1)
    flow = STARFlow(config)
    apply_lora(flow, target_paths(flow, "all"), 4, 2.0)
    flow.freeze()
    flow.unfreeze(keys=["lora_a", "lora_b"])
    flow.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(flow.parameters())
                                if k.endswith("lora_b")]))
    checkpoint_layers(flow)
    return flow


def test_a_checkpointed_flow_gets_the_same_lora_gradients_a_group_at_a_time(monkeypatch):
    flow = tiny_flow()
    tokens = 36 + flow.config.txt_size
    x = mx.random.normal((2, 6, 6, flow.config.in_channels))
    y = mx.random.normal((2, flow.config.txt_size, flow.config.txt_dim))
    loss = nn.value_and_grad(flow, lambda model: mx.mean(nll_per_dim(model, x, y)))
    results = []
    for budget in (8 * per_head(tokens), 3 * per_head(tokens)):  # all 8 heads at once; groups of 3, 3, 2
        monkeypatch.setattr(head_groups, "SCORE_BYTES", budget)
        value, grads = loss(flow)
        results.append((value.item(), dict(tree_flatten(grads))))
    (value, grads), (grouped_value, grouped_grads) = results
    assert grouped_value == pytest.approx(value, rel=1e-6)
    assert grads.keys() == grouped_grads.keys() and any(k.endswith("lora_a") for k in grads)
    for name, grad in grads.items():
        assert np.abs(grad).max() > 0 and np.allclose(grad, grouped_grads[name], rtol=1e-4, atol=1e-6), name


def test_a_step_attending_a_head_at_a_time_stays_within_the_estimate(monkeypatch):
    """1024 + 32 tokens over 8 heads of 32 channels: every group's scores alive at once (the groups not made to wait
    for each other) measured 1.5 times the estimate, which counts one head's."""
    config = FlowConfig(**{k: v for k, v in NAMED["starflow-3b"].items() if k not in EXTRA} | dict(
        channels=256, head_dim=32, latent_size=32, txt_size=32, txt_dim=64, layers_per_block=[1, 2]))
    monkeypatch.setattr(head_groups, "SCORE_BYTES", per_head(1024 + 32))
    settings = LoRASettings(rank=8, alpha=16.0, blocks="deep", base_bits=4, grad_checkpoint=True)
    estimate = sum(lora_training_bytes(config, 1, settings).values())
    assert measure_step(config, settings)["peak"] <= estimate
