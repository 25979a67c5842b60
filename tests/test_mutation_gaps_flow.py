"""The flow step (models/tarflow.py, sampling/sequential.py, models/starflow.py): gaps found by mutation testing.

The golden upstream vectors pin a TARFlow block's arithmetic for the options upstream's tests use (soft clip 0 or
4, softplus or exp, with or without SOS, guidance 1.5 and 2.5, 3-frame videos). What they could not see: a soft
clip below 1, guidance at weights up to 1, text given to a block without it, the pipeline-parallel stage hooks
(run only across processes), the cache's dtype and bits, the sampler's defaults, frame hook and progress, the
per-token and per-frame densities, a 2-frame in-frame flip, the exact refusals. Values are computed another way
where there is arithmetic: numpy for the head, patches, flips and densities, and for sampling a forward-pass
reference (each token from ``block.affine`` over the tokens the cache would hold: no cache, no compiled step).
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from flow_factory import IMAGE, NOTEXT, OPTIONS, VIDEO, flow_inputs, random_flow

from starflow_mlx.models.kv_cache import KVCache
from starflow_mlx.models.starflow import Layout
from starflow_mlx.sampling.guidance import guide
from starflow_mlx.sampling.jacobi import JacobiStats
from starflow_mlx.sampling.sequential import invert_sequential


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


# -- sequential inversion against the block's own forward pass ---------------------------------------------------

def reference_sequential(block, z, y, cos, sin, cfg=0.0, prefix=None, frame_size=0, window=None, context_frames=1):
    """Token by token, each token's (a, b) from a whole forward pass (``block.affine``) over the tokens the sampler's
    cache would hold: no cache, no compiled step. A window of ``window`` frames restarts, when full, from the last
    ``context_frames`` frames as a fresh sequence (rotary positions from 0 again); a prefix longer than the window
    allows is cut the same way."""
    n = z.shape[1]
    text_len = y.shape[1] if block.sees_text and y is not None else 0
    span = n if window is None else min(n, window * frame_size)
    keep = context_frames * frame_size
    x = np.zeros(z.shape, np.float32)
    first = shift = 0
    if prefix is not None:
        first = prefix.shape[1]
        x[:, :first] = np.array(prefix)
        shift = 0 if first + frame_size <= span else first - keep
    for t in range(first, n):
        if t - shift == span:
            shift = t - keep
        seq = mx.array(x[:, shift : t + 1])  # token t itself is a placeholder: causal, it predicts nothing here
        length = text_len + seq.shape[1]
        rope = (cos[:length], sin[:length])
        if cfg > 0:
            a, b = block.affine(mx.concatenate([seq, seq]), y, rope)
            a, b = guide(a[:, -1], b[:, -1], cfg)
        else:
            a, b = block.affine(seq, y, rope)
            a, b = a[:, -1], b[:, -1]
        x[:, t] = np.array(z[:, t] * a[: z.shape[0]] + b[: z.shape[0]])
    return x


def image_block(fields, index=-1, seed=6):
    flow = random_flow(seed, **fields)
    z, y, y_u = flow_inputs(flow, batch=2)
    block = flow.blocks[index]
    layout = flow._layout(z, block.index)
    text_len = y.shape[1] if block.sees_text else 0
    cos, sin = flow.rope(layout, text_len)
    return block, layout.to_sequence(z), y, y_u, cos, sin


def test_sequential_with_its_defaults_matches_the_forward_pass():
    # No cfg argument: unguided, the batch as given (a default that guides doubles the batch against y's rows).
    block, z, y, _, cos, sin = image_block(IMAGE)
    got = invert_sequential(block, z, y, cos, sin)
    np.testing.assert_allclose(np.array(got), reference_sequential(block, z, y, cos, sin), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("fields", [IMAGE, OPTIONS], ids=["sos", "no-sos"])
def test_guided_sequential_matches_the_forward_pass(fields, cfg):
    # Any weight above 0 guides, those up to 1 included (upstream's vectors use 1.5 and 2.5).
    block, z, y, y_u, cos, sin = image_block(fields)
    y2 = mx.concatenate([y, y_u])
    got = invert_sequential(block, z, y2, cos, sin, cfg)
    want = reference_sequential(block, z, y2, cos, sin, cfg)
    np.testing.assert_allclose(np.array(got), want, atol=2e-5, rtol=1e-4)
    unguided = reference_sequential(block, z, y, cos, sin)
    assert np.abs(want - unguided).max() > 1e-3  # the guidance shows


def test_a_block_without_text_samples_the_same_when_given_text():
    block, z, y, _, cos, sin = image_block(IMAGE, index=0)
    assert not block.sees_text
    with_text = invert_sequential(block, z, y, cos, sin)
    assert mx.array_equal(with_text, invert_sequential(block, z, None, cos, sin))
    np.testing.assert_allclose(np.array(with_text), reference_sequential(block, z, None, cos, sin), atol=2e-5,
                               rtol=1e-4)


@pytest.fixture(scope="module")
def video_deep():
    flow = random_flow(8, **{**VIDEO, "num_frames": 2})
    z, y, y_u = flow_inputs(flow, batch=2, frames=5)
    block = flow.blocks[-1]
    layout = flow._layout(z, block.index)
    cos, sin = flow.rope(layout, y.shape[1])
    return block, layout.to_sequence(z), y, y_u, cos, sin, layout.frame_size


@pytest.mark.parametrize("known", [0, 1, 3])
def test_the_window_slides_from_one_context_frame_by_default(video_deep, known):
    # 5 frames through a window of 2: full at frame 2, it restarts from the last frame (context_frames' default, 1)
    # at positions 0..; a known prefix of 3 frames is cut to its last frame before the first step.
    block, z, y, _, cos, sin, frame = video_deep
    prefix = z[:, : known * frame] + 0.5 if known else None  # any known tokens, not the sample's own
    got = invert_sequential(block, z, y, cos, sin, prefix=prefix, frame_size=frame, window=2)
    want = reference_sequential(block, z, y, cos, sin, prefix=prefix, frame_size=frame, window=2)
    np.testing.assert_allclose(np.array(got), want, atol=5e-5, rtol=1e-4)
    if known:
        assert mx.array_equal(got[:, : known * frame], prefix)


def test_one_known_token_is_context_enough(video_deep):
    block, z, y, _, cos, sin, frame = video_deep
    prefix = z[:, :1] + 0.5
    got = invert_sequential(block, z, y, cos, sin, prefix=prefix, frame_size=frame, window=2)
    want = reference_sequential(block, z, y, cos, sin, prefix=prefix, frame_size=frame, window=2)
    np.testing.assert_allclose(np.array(got), want, atol=5e-5, rtol=1e-4)


MESSAGE = "context needs a start-of-sequence token and must be shorter than the sequence"


@pytest.mark.parametrize("length", [0, "n"])
def test_known_tokens_must_leave_something_to_sample(video_deep, length):
    block, z, y, _, cos, sin, frame = video_deep
    prefix = z[:, : z.shape[1] if length == "n" else length]
    with pytest.raises(ValueError) as error:
        invert_sequential(block, z, y, cos, sin, prefix=prefix, frame_size=frame)
    assert str(error.value) == MESSAGE


def test_known_tokens_need_a_start_token():
    # Without SOS token 0 passes through, so the cache cannot be primed with known tokens.
    block, z, y, _, cos, sin = image_block(OPTIONS)
    with pytest.raises(ValueError) as error:
        invert_sequential(block, z, y, cos, sin, prefix=z[:, :2])
    assert str(error.value) == MESSAGE


def test_guided_frames_reach_the_hook_in_order_known_ones_first(video_deep):
    # cfg 0.5 with a known first frame: both halves of the doubled batch start from it; the hook gets each of the
    # 5 frames once, in order, as the conditional half, and they are the sample's frames.
    block, z, y, y_u, cos, sin, frame = video_deep
    y2, prefix = mx.concatenate([y, y_u]), z[:, :frame] + 0.5
    calls = []
    got = invert_sequential(block, z, y2, cos, sin, 0.5, prefix=prefix, frame_size=frame, window=2,
                            on_frame=lambda t, tokens: calls.append((t, np.array(tokens))))
    want = reference_sequential(block, z, y2, cos, sin, 0.5, prefix=prefix, frame_size=frame, window=2)
    np.testing.assert_allclose(np.array(got), want, atol=5e-5, rtol=1e-4)
    assert [t for t, _ in calls] == [0, 1, 2, 3, 4]
    assert all(tokens.shape == (2, frame, z.shape[-1]) for _, tokens in calls)
    np.testing.assert_array_equal(np.concatenate([tokens for _, tokens in calls], axis=1), np.array(got))


@pytest.mark.parametrize("known", [0, 3])
def test_progress_every_64_tokens_and_at_the_end(known):
    flow = random_flow(1, **{**NOTEXT, "latent_size": 9})  # 81 tokens
    z, _, _ = flow_inputs(flow, batch=1)
    block = flow.blocks[-1]
    layout = flow._layout(z, block.index)
    cos, sin = flow.rope(layout, 0)
    seq = layout.to_sequence(z)
    calls = []
    invert_sequential(block, seq, None, cos, sin, on_token=lambda done, total: calls.append((done, total)),
                      prefix=seq[:, :known] if known else None)
    assert calls == [(64, 81), (81, 81)]


# -- STARFlow's per-block arithmetic (models/starflow.py) ----------------------------------------------------------

@pytest.mark.parametrize("lead", [(2,), (2, 3)], ids=["image", "video"])
def test_patches_by_hand(lead):
    # Token (i, j) holds pixels (i p + p1, j p + p2) in the order p1, p2, channel (upstream's patchify); every config
    # of upstream's vectors has patch size 1, where both are the identity.
    p, c = 2, 3
    flow = random_flow(1, **{**NOTEXT, "in_channels": c, "patch_size": p, "latent_size": 2})
    x = np.random.default_rng(0).normal(size=(*lead, 4, 6, c)).astype(np.float32)
    want = np.zeros((*lead, 2, 3, p * p * c), np.float32)
    for i in range(2):
        for j in range(3):
            for p1 in range(p):
                for p2 in range(p):
                    want[..., i, j, (p1 * p + p2) * c : (p1 * p + p2 + 1) * c] = x[..., i * p + p1, j * p + p2, :]
    patches = flow._patchify(mx.array(x))
    np.testing.assert_array_equal(np.array(patches), want)
    np.testing.assert_array_equal(np.array(flow._unpatchify(mx.array(want))), x)


@pytest.mark.parametrize("method,name", [("forward", "x"), ("log_prob", "x"), ("log_prob_tokens", "x"),
                                         ("log_prob_frames", "x"), ("reverse", "z")])
def test_a_wrong_shape_is_refused_naming_the_argument(method, name):
    flow = random_flow(1, **NOTEXT)
    with pytest.raises(ValueError) as error:
        getattr(flow, method)(mx.zeros((2, 4, 4, 3)))
    assert str(error.value) == f"{name} must be channels-last (B, H, W, 1) or (B, T, H, W, 1), got (2, 4, 4, 3)"


@pytest.mark.parametrize("layers", [[1, 1, 1, 2], [1, 1, 2]], ids=["deep-in-order", "deep-flipped-in-frame"])
def test_frame_densities_follow_the_chain_rule(layers):
    # Frame-local shallow blocks and a temporally causal deep block: the first k frames' entries add up to the
    # density of the clip cut to k frames, computed by the whole-sample log_prob (no per-element path).
    flow = random_flow(4, **{**VIDEO, "layers_per_block": layers})
    x, y, _ = flow_inputs(flow, batch=2, frames=3, seed=5)
    frames = flow.log_prob_frames(x, y)
    assert frames.shape == (2, 3) and frames.dtype == mx.float32
    for k in (1, 2, 3):
        np.testing.assert_allclose(np.array(frames[:, :k].sum(axis=1)), np.array(flow.log_prob(x[:, :k], y)),
                                   rtol=1e-5)


def test_frame_densities_need_a_video():
    flow = random_flow(1, **NOTEXT)
    with pytest.raises(ValueError) as error:
        flow.log_prob_frames(mx.zeros((2, 4, 4, 1)))
    assert str(error.value) == "x must be a video (B, T, H, W, c) to split by frame, got (2, 4, 4, 1)"


def reference_reverse(flow, z, y, y_u, cfg):
    """An image flow's reverse by hand: the deep block first, then the shallow ones, each on the tokens in raster
    order reversed where the block flips, guided only where the block sees text."""
    b, h, w, c = z.shape
    x = np.array(z).reshape(b, h * w, c)
    for block in reversed(flow.blocks):
        if block.is_identity:
            continue
        text = block.sees_text
        cos, sin = flow.rope(Layout(b, 0, h, w, c, False), y.shape[1] if text else 0)
        guided = cfg if text else 0.0
        y_block = (mx.concatenate([y, y_u]) if guided else y) if text else None
        seq = x[:, ::-1] if block.flips else x
        out = reference_sequential(block, mx.array(np.ascontiguousarray(seq)), y_block, cos, sin, guided)
        x = out[:, ::-1] if block.flips else out
    return x.reshape(z.shape)


@pytest.mark.parametrize("cfg", [0.0, 0.5, 2.5])
def test_reverse_by_hand(cfg):
    flow = random_flow(9, **IMAGE)  # blocks 0 and 2 flip, block 1 is the identity, text on the deep block only
    assert [b.flips for b in flow.blocks if not b.is_identity] == [True, True, False]
    z, y, y_u = flow_inputs(flow, batch=2)
    got = flow.reverse(z, y, y_uncond=y_u, cfg=cfg)
    np.testing.assert_allclose(np.array(got), reference_reverse(flow, z, y, y_u, cfg), atol=5e-5, rtol=1e-4)


def test_reverse_through_a_deep_block_flipped_inside_frames_inverts_the_forward_pass():
    # The forward pass of this flip is pinned against numpy (test_ground_truth); a reverse that flipped the whole
    # video instead would not give the noise back.
    flow = random_flow(2, **{**VIDEO, "layers_per_block": [1, 1, 2]})
    assert flow.blocks[-1].flips and flow.config.temporal_causal > 0
    z, y, _ = flow_inputs(flow, batch=2, frames=3)
    x = flow.reverse(z, y)
    np.testing.assert_allclose(np.array(flow.forward(x, y)[0]), np.array(z), atol=2e-4, rtol=1e-4)


def test_progress_is_labelled_per_block_deep_first():
    flow = random_flow(9, **IMAGE)
    z, y, _ = flow_inputs(flow, batch=1)
    calls = []
    flow.reverse(z, y, progress=lambda label, done, total, **info: calls.append((label, done, total)))
    assert calls == [("block 3 (deep)", 0, 16), ("block 3 (deep)", 16, 16), ("block 2", 0, 16), ("block 2", 16, 16),
                     ("block 0", 0, 16), ("block 0", 16, 16)]


def test_jacobi_progress_is_labelled_per_block_with_its_chunks():
    flow = random_flow(9, **IMAGE)
    z, y, _ = flow_inputs(flow, batch=1)
    calls = []
    flow.reverse(z, y, jacobi=True, jacobi_block_size=8, jacobi_threshold=1e-9, jacobi_max_iter=3,
                 progress=lambda label, done, total, **info: calls.append((label, done, total, sorted(info))))
    for label in ("block 3 (deep)", "block 2", "block 0"):
        mine = [c[1:] for c in calls if c[0] == label]
        # The bar starts at 0, then one call per chunk of 8 with its iterations and residual.
        assert [m[:2] for m in mine] == [(0, 16), (8, 16), (16, 16)]
        assert [m[2] for m in mine] == [[], ["iterations", "residual"], ["iterations", "residual"]]


def test_a_long_video_without_a_start_token_is_refused():
    flow = random_flow(1, **{**VIDEO, "sos": False, "num_frames": 2})
    z, y, _ = flow_inputs(flow, batch=1, frames=3)
    with pytest.raises(ValueError) as error:
        flow.reverse(z, y)
    assert str(error.value) == "a video longer than the model's window needs a start-of-sequence token to slide it"


def test_a_long_videos_context_defaults_to_all_but_one_frame_of_the_window():
    # Upstream's default: min(16, window - 1) frames re-encoded; with a window of 3, that is 2 (not 1).
    flow = random_flow(3, **{**VIDEO, "num_frames": 3})
    z, y, _ = flow_inputs(flow, batch=1, frames=5)
    default = flow.reverse(z, y)
    assert mx.array_equal(default, flow.reverse(z, y, context_frames=2))
    assert float(mx.abs(default - flow.reverse(z, y, context_frames=1)).max()) > 1e-3


@pytest.mark.parametrize("scale", [0.2, 0.4])
def test_jacobi_defaults_are_upstreams(scale):
    # Chunks of 64, threshold 0.005, at most 32 iterations (upstream's sample.py). 81 tokens make a chunk of 64;
    # the weights at 0.2 make the threshold decide the iterations (6 and 29 here), at 0.4 the cap (32).
    flow = random_flow(1, scale=scale, **{**NOTEXT, "latent_size": 9})
    z, _, _ = flow_inputs(flow, batch=1)
    runs = []
    for options in ({}, {"jacobi_block_size": 64, "jacobi_threshold": 0.005, "jacobi_max_iter": 32}):
        stats = JacobiStats()
        flow.reverse(z, jacobi=True, stats=stats, **options)
        runs.append([(c.block, c.start, c.size, c.iterations) for c in stats.chunks])
    assert runs[0] == runs[1]
    assert [c[1:3] for c in runs[0]] == [(0, 64), (64, 17)] * 2
    iterations = [c[3] for c in runs[0]]
    assert (max(iterations) == 32) if scale == 0.4 else (2 < max(iterations) < 32)


def test_refusals_of_reverse_name_what_is_missing():
    flow = random_flow(1, **IMAGE)
    z, y, _ = flow_inputs(flow, batch=1)
    with pytest.raises(ValueError) as error:
        flow.reverse(z, y, cfg=1.5)
    assert str(error.value) == "cfg > 0 needs y_uncond (the features of the empty prompt)"
    no_sos = random_flow(1, **OPTIONS)
    with pytest.raises(ValueError) as error:
        no_sos.reverse(z, y, jacobi=True)
    assert str(error.value) == "Jacobi sampling needs a model with a start-of-sequence token (sos)"



@pytest.mark.parametrize("frames", [1, 2, 3])
def test_an_in_frame_flip_reverses_each_frame_by_hand(frames):
    # A two-frame video is flipped inside each frame too (the golden and ground-truth videos have 3 frames).
    layout = Layout(2, frames, 2, 3, 4, False)
    seq = np.random.default_rng(1).normal(size=(2, frames * 6, 4)).astype(np.float32)
    order = np.concatenate([f * 6 + np.arange(6)[::-1] for f in range(frames)])
    np.testing.assert_array_equal(np.array(layout.permute(mx.array(seq), True, True)), seq[:, order])
    np.testing.assert_array_equal(np.array(layout.permute(mx.array(seq), True, False)), seq[:, ::-1])
    np.testing.assert_array_equal(np.array(layout.permute(mx.array(seq), False, True)), seq)


def test_token_densities_by_hand():
    # Each block's per-element log-det is put back where its token sits in the grid (blocks 0 and 2 flip): numpy
    # flips, block by block, then the Gaussian prior of the final noise.
    flow = random_flow(9, **IMAGE)
    x, y, _ = flow_inputs(flow, batch=2, seed=3)
    b, h, w, c = x.shape
    seq = np.array(x).reshape(b, h * w, c)
    logdet = np.zeros_like(seq)
    for block in flow.blocks:
        if block.is_identity:
            continue
        text = block.sees_text
        rope = flow.rope(Layout(b, 0, h, w, c, False), y.shape[1] if text else 0)
        order = np.arange(h * w)[::-1] if block.flips else np.arange(h * w)
        z, ld = block.forward(mx.array(np.ascontiguousarray(seq[:, order])), y if text else None, rope,
                              elementwise=True)
        seq[:, order], logdet[:, order] = np.array(z), logdet[:, order] + np.array(ld)
    want = (-0.5 * seq**2 - 0.5 * math.log(2 * math.pi) + logdet).sum(axis=-1).reshape(b, h, w)
    np.testing.assert_allclose(np.array(flow.log_prob_tokens(x, y)), want, rtol=1e-5, atol=1e-5)


def test_reverse_passes_the_jacobi_check_interval_and_schedule_on():
    flow = random_flow(9, scale=0.2, **IMAGE)
    z, y, _ = flow_inputs(flow, batch=1)

    def chunks(**options):
        stats = JacobiStats()
        flow.reverse(z, y, jacobi=True, jacobi_threshold=1e-4, jacobi_max_iter=64, stats=stats, **options)
        return [(c.block, c.start, c.size, c.iterations) for c in stats.chunks]

    # Checked every 3 iterations, a chunk stops at a multiple of 3 (block 0 converges at 7 when checked each time).
    every = chunks(jacobi_block_size=16, jacobi_check_every=3)
    assert all(c[3] % 3 == 0 for c in every) and every != chunks(jacobi_block_size=16)
    # The window schedule slides by the tokens it commits: its windows start one token apart at first.
    assert [c[1] for c in chunks(jacobi_block_size=4, jacobi_schedule="window")][:3] == [0, 1, 2]
