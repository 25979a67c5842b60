"""The LoRA training estimate (what `starflow train --lora` prints and refuses with) against measured steps.

A text-conditioned flow of the released architecture at a small width, 4-bit base, rank 8 on the deep block,
``--grad-checkpoint``: the estimate is within 25% of MLX's measured peak with one deep layer and with four. With
four it also checks the checkpointing itself: layers recomputed all at once, before the gradient reaches them,
held every layer's attention and measured far above the estimate.
"""

from __future__ import annotations

import pytest

from starflow_mlx.benchmarks.configs import NAMED
from starflow_mlx.benchmarks.lora_memory import EXTRA, measure_step
from starflow_mlx.config import FlowConfig
from starflow_mlx.training.lora import LoRASettings, lora_training_bytes

# 576 latent tokens + 32 text tokens, 256 wide, 4 heads: attention is about half of a layer's working set, as in the 3B.
SMALL = {k: v for k, v in NAMED["starflow-3b"].items() if k not in EXTRA} | dict(
    channels=256, latent_size=24, txt_size=32, txt_dim=64)


@pytest.mark.parametrize("deep_layers", [1, 4])
def test_estimate_is_within_a_quarter_of_a_measured_checkpointed_step(deep_layers):
    config = FlowConfig(**SMALL | dict(layers_per_block=[1, deep_layers]))
    settings = LoRASettings(rank=8, alpha=16.0, blocks="deep", base_bits=4, grad_checkpoint=True)
    estimate = sum(lora_training_bytes(config, 1, settings).values())
    measured = measure_step(config, settings)["peak"]
    assert 0.85 < estimate / measured < 1.25, (estimate, measured)
