"""STARFlow's checks, known first frames, denoiser and blocks (models/starflow.py): gaps found by mutation testing.

What the other tests could not see: a height or width check that looks at one side only (or the wrong axis), the
exact refusals of bad context frames (naming ``context``) and of text, a context of zero frames, which flow layouts
may take context, the context of a deep block flipped inside frames, the denoiser's refusals and its images (which
must not be read as frames), which blocks without layers are skipped, when frames can be pipelined. The context
tokens are checked against the deep block's input of the whole clip, flipped inside frames with numpy.
"""

import mlx.core as mx
import numpy as np
import pytest
from flow_factory import NOTEXT, VIDEO, flow_inputs, random_flow

from starflow_mlx.config import FlowConfig
from starflow_mlx.jsonconfig import ConfigError

PATCHED = {**NOTEXT, "in_channels": 3, "patch_size": 2, "latent_size": 2}


@pytest.mark.parametrize("shape", [(2, 3, 4, 3), (2, 4, 3, 3), (1, 2, 3, 4, 3), (1, 2, 4, 3, 3)],
                         ids=["image-height", "image-width", "video-height", "video-width"])
def test_one_side_off_the_patch_grid_is_refused(shape):
    flow = random_flow(1, **PATCHED)
    with pytest.raises(ValueError) as error:
        flow.forward(mx.zeros(shape))
    assert str(error.value) == f"x height and width must be multiples of the patch size 2, got {shape}"


@pytest.fixture(scope="module")
def video():
    flow = random_flow(7, **{**VIDEO, "num_frames": 4})
    z, y, _ = flow_inputs(flow, batch=2, frames=4)
    return flow, z, y


def refusal(flow, z, y, context) -> str:
    with pytest.raises(ValueError) as error:
        flow.reverse(z, y, context=context)
    return str(error.value)


def test_context_of_the_wrong_channels_is_refused_by_name(video):
    flow, z, y = video
    assert refusal(flow, z, y, mx.zeros((2, 1, 2, 2, 3))) == \
        "context must be channels-last (B, H, W, 4) or (B, T, H, W, 4), got (2, 1, 2, 2, 3)"


def test_an_image_as_context_is_refused(video):
    flow, z, y = video
    assert refusal(flow, z, y, z[:, 0]) == "context frames need a video model and video noise (B, T, H, W, c)"


@pytest.mark.parametrize("frames", [0, 4])
def test_context_must_hold_some_frames_and_fewer_than_the_noise(video, frames):
    flow, z, y = video
    assert refusal(flow, z, y, mx.zeros((2, frames, 2, 2, 4))) == \
        f"context (2, {frames}, 2, 2, 4) must match the noise (2, 4, 2, 2, 4) in batch and frame size and hold " \
        "fewer frames"


LAYOUT_REFUSAL = "context frames need frame-local shallow blocks and a deep block in frame order"


@pytest.mark.parametrize("fields", [
    {"shallow_block_local": False},  # 4 blocks, whole-clip shallow blocks
    {"shallow_block_local": False, "layers_per_block": [1, 2]},  # 2 blocks: one shallow block is enough
    {"temporal_causal": 0, "layers_per_block": [1, 1, 2]},  # deep block flips the whole clip
], ids=["whole-clip-shallow", "two-blocks", "whole-clip-flip"])
def test_flows_whose_deep_block_cannot_take_context_refuse_it(fields):
    flow = random_flow(3, **{**VIDEO, **fields})
    z, y, _ = flow_inputs(flow, batch=1, frames=3)
    assert refusal(flow, z, y, z[:, :1]) == LAYOUT_REFUSAL


def deep_input(flow, x, y):
    """The deep block's input tokens of the whole clip ``x`` in its order, the flip done with numpy."""
    grid, _ = flow._forward_blocks(flow._patchify(x), y, flow.blocks[:-1])
    b, t, h, w, c = grid.shape
    frames = np.array(grid).reshape(b, t, h * w, c)
    if flow.blocks[-1].flips:
        frames = frames[:, :, ::-1]
    return frames.reshape(b, t * h * w, c)


@pytest.mark.parametrize("fields", [
    {"layers_per_block": [1, 1, 2]},  # deep block flipped inside each frame
    {"shallow_block_local": False, "layers_per_block": [3]},  # the deep block alone: nothing to be local
], ids=["in-frame-flip", "one-block"])
def test_context_is_the_deep_blocks_input_and_reproduces_the_sample(fields):
    flow = random_flow(2, **{**VIDEO, **fields})
    z, y, _ = flow_inputs(flow, batch=2, frames=3)
    x = flow.reverse(z, y)
    tokens = flow._context_tokens(x[:, :2], z, y)
    want = deep_input(flow, x, y)[:, : tokens.shape[1]]
    assert tokens.shape[1] == 2 * flow.config.latent_size**2
    np.testing.assert_allclose(np.array(tokens), want, atol=1e-5, rtol=1e-5)
    again = flow.reverse(z, y, context=x[:, :2])
    np.testing.assert_allclose(np.array(again), np.array(x), atol=2e-4, rtol=1e-4)


def test_a_model_without_a_denoiser_says_so():
    flow = random_flow(1, **NOTEXT)
    with pytest.raises(ValueError) as error:
        flow.denoiser(mx.zeros((1, 4, 4, 1)))
    assert str(error.value) == "this model has no learnable denoiser (learnable_self_denoiser is off)"


def test_a_text_conditioned_denoiser_needs_text(video):
    flow, z, _ = video
    with pytest.raises(ValueError) as error:
        flow.denoiser(z)
    assert str(error.value) == "this denoiser is text-conditioned: pass y"


def test_a_wrong_shape_for_the_denoiser_is_refused_naming_x(video):
    flow, _, y = video
    with pytest.raises(ValueError) as error:
        flow.denoiser(mx.zeros((1, 2, 2, 3)), y[:1])
    assert str(error.value) == "x must be channels-last (B, H, W, 4) or (B, T, H, W, 4), got (1, 2, 2, 3)"


@pytest.mark.parametrize("fields", [VIDEO, {**VIDEO, "temporal_causal": 0, "shallow_block_local": False},
                                    {**VIDEO, "conditional_denoiser": False}],
                         ids=["frame-causal", "whole-clip", "without-text"])
def test_the_denoiser_sees_an_image_as_a_one_frame_video(fields):
    # An image has no frame axis: read as one, its rows would be taken for frames.
    flow = random_flow(2, **{**fields, "latent_size": 4})
    z, y, _ = flow_inputs(flow, batch=2)
    image = flow.denoiser(z, y)
    np.testing.assert_array_equal(np.array(image), np.array(flow.denoiser(z[:, None], y)[:, 0]))


def test_only_shallow_blocks_without_layers_are_skipped():
    flow = random_flow(1, **{**NOTEXT, "layers_per_block": [0, 1]})
    assert [b.is_identity for b in flow.blocks] == [True, False]
    x = mx.random.normal((2, 4, 4, 1), key=mx.random.key(0))
    z, logdet = flow.forward(x)
    assert float(mx.abs(z - x).max()) > 1e-2 and float(mx.abs(logdet).min()) > 1e-2


def test_a_deep_block_without_layers_is_refused():
    # It used to be built, and then sampling failed on its empty cache (IndexError).
    with pytest.raises(ConfigError) as error:
        FlowConfig(**{**NOTEXT, "layers_per_block": [1, 0]})
    assert str(error.value) == "layers_per_block ends in 0: the deep (last) block needs at least one layer"


def test_text_of_the_wrong_width_or_none_is_refused_naming_the_block(video):
    flow, z, y = video
    with pytest.raises(ValueError) as error:
        flow.forward(z)
    assert str(error.value) == "block 3 is text-conditioned: pass y (B, L, 24)"
    with pytest.raises(ValueError) as error:
        flow.forward(z, y[..., :23])
    assert str(error.value) == "y must be (B, L, 24) text features, got (2, 6, 23)"


@pytest.mark.parametrize("layers,per_frame", [([1, 1, 1, 2], True), ([1, 1, 2], False)])
def test_frames_are_pipelined_unless_the_deep_block_flips_the_whole_clip(layers, per_frame):
    # Without in-frame flips (temporal_causal 0) a deep block that flips reverses the clip: its first frame out is
    # the last one, so the shallow blocks cannot start on it. The 4-block flow's deep block does not flip.
    flow = random_flow(1, **{**VIDEO, "temporal_causal": 0, "layers_per_block": layers})
    assert flow.blocks[-1].flips is not per_frame
    assert flow._frames_pipeline(mx.zeros((1, 3, 2, 2, 4))) is per_frame
