"""The flow step (models/tarflow.py, sampling/sequential.py): gaps found by mutation testing.

The golden upstream vectors pin a TARFlow block's arithmetic for the options upstream's tests use (soft clip 0 or
4, softplus or exp, with or without SOS). What they could not see: a soft clip below 1, a block without text
given text anyway, the pipeline-parallel stage hooks (run only across processes), the cache's dtype and bits,
and the block width the Core ML export reads. Values are computed here by numpy where there is arithmetic.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import IMAGE, NOTEXT, VIDEO, flow_inputs, random_flow
from starflow_mlx.models.kv_cache import KVCache


def numpy_head(block, h, soft_clip, use_softplus):
    """``(a, b)`` of a block without final norm, by hand: linear, soft clip, split, softplus(x + log(e - 1))."""
    w, bias = np.array(block.proj_out.weight, np.float64), np.array(block.proj_out.bias, np.float64)
    out = np.asarray(h, np.float64) @ w.T + bias
    if soft_clip > 0:
        out = soft_clip * np.tanh(out / soft_clip)
    xa, xb = np.split(out, 2, axis=-1)
    a = np.log1p(np.exp(xa + math.log(math.e - 1))) if use_softplus else np.exp(xa)
    return a, xb


@pytest.mark.parametrize("soft_clip", [0.0, 0.5, 1.0, 4.0])
@pytest.mark.parametrize("use_softplus", [True, False])
def test_head_by_hand(soft_clip, use_softplus):
    # A clip of 0.5 is a real setting (soft_clip may be any value >= 0): a clip applied only above 1 passed upstream's
    # vectors, which use 0 and 4. The weights are large enough that the clip bends every output.
    flow = random_flow(2, scale=0.3, **{**NOTEXT, "use_final_norm": False, "soft_clip": soft_clip,
                                        "use_softplus": use_softplus})
    block = flow.blocks[-1]
    h = mx.random.normal((2, 5, block.channels), key=mx.random.key(4))
    a, b = block._head(h)
    want_a, want_b = numpy_head(block, h, soft_clip, use_softplus)
    np.testing.assert_allclose(np.array(a), want_a, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(b), want_b, rtol=2e-5, atol=1e-6)
    assert a.dtype == b.dtype == mx.float32


def test_a_block_that_sees_no_text_ignores_text_given_to_it():
    # cond_top_only: the shallow blocks have no text projection; a caller passing y to every block (the Core ML
    # clip-residual tools do) must get the same (a, b) as with None, not an error.
    flow = random_flow(3, **IMAGE)
    block = flow.blocks[0]
    assert not block.sees_text
    x, y, _ = flow_inputs(flow, batch=2)
    layout = flow._layout(x, block.index)
    seq = layout.to_sequence(x)
    rope = flow.rope(layout, 0)
    a, b = block.affine(seq, y, rope)
    a0, b0 = block.affine(seq, None, rope)
    assert mx.array_equal(a, a0) and mx.array_equal(b, b0)


class RecordingStage:
    """A one-process stand-in for io.distributed's pipeline stage: passes the hidden state through unchanged and
    records what each hook was given."""

    def __init__(self, channels):
        self.channels, self.calls = channels, []

    def _record(self, name, h, cache):
        assert isinstance(h, mx.array) and h.shape[-1] == self.channels, f"{name} got {type(h).__name__}"
        self.calls.append((name, h.shape[1], type(cache).__name__))
        return h

    def enter(self, h, cache=None):
        return self._record("enter", h, cache)

    def leave(self, h, cache=None):
        return self._record("leave", h, cache)


def test_stage_hooks_wrap_the_layers_of_the_forward_pass():
    flow = random_flow(5, **IMAGE)
    x, y, _ = flow_inputs(flow, batch=2)
    want = flow.forward(x, y)
    deep = flow.blocks[-1]
    deep.stage = RecordingStage(deep.channels)
    got = flow.forward(x, y)
    # The text prefix (6) and the 16 tokens cross into and out of the stage, without a cache.
    assert deep.stage.calls == [("enter", 22, "NoneType"), ("leave", 22, "NoneType")]
    for g, w in zip(got, want):
        assert mx.array_equal(g, w)


def test_stage_hooks_wrap_every_cached_run_with_its_cache():
    z, y, _ = flow_inputs(random_flow(5, **IMAGE), batch=1)
    want = random_flow(5, **IMAGE).reverse(z, y)
    flow = random_flow(5, **IMAGE)  # a fresh one: a block keeps its compiled step, traced without the stage
    deep = flow.blocks[-1]
    deep.stage = RecordingStage(deep.channels)
    got = flow.reverse(z, y)
    # The text (6 positions), then the one-token step (compiled: recorded when traced); each run enters and
    # leaves the stage with the cache.
    assert deep.stage.calls == [("enter", 6, "KVCache"), ("leave", 6, "KVCache"),
                                ("enter", 1, "KVCache"), ("leave", 1, "KVCache")]
    assert mx.array_equal(got, want)


def test_new_cache_keeps_the_blocks_dtype_and_bits():
    flow = random_flow(1, **NOTEXT)
    flow.set_dtype(mx.float16)
    block = flow.blocks[-1]
    cache = block.new_cache(2, 8)
    assert isinstance(cache, KVCache) and cache.bits is None
    assert cache.layers[0].keys[0].dtype == mx.float16 and cache.layers[0].keys[0].shape == (2, block.kv_heads, 8, 32)
    quantized = block.new_cache(2, 8, bits=8)
    assert quantized.bits == 8 and quantized.layers[0].keys[1].dtype == mx.float16


def test_block_width_is_what_the_core_ml_export_reads():
    flow = random_flow(1, **VIDEO)  # top_block_channels: the deep block is wider
    widths = [b.channels for b in flow.blocks if not b.is_identity]
    assert widths == [64, 64, 64, 96]
    assert [b.proj_in.weight.shape[0] for b in flow.blocks if not b.is_identity] == widths
