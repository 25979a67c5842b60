"""The 3-D rotary embedding against the upstream definition, written out token by token and pair by pair.

Expected values come from upstream-format.md section 5 (positions of text and of image/video tokens, the split of
the rotary width into spatial and 8 latent dims, the pt_seq_len rescale, interleaved pairs), computed here with
plain loops, never with the functions under test. Grids are not square, so rows and columns cannot trade places.
"""

from __future__ import annotations

import math
import threading

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.config import FlowConfig
from starflow_mlx.models.rope import apply_rope, rope_angles, rope_tables, token_positions
from starflow_mlx.models.starflow import Layout, STARFlow


def expected_positions(h, w, frames, text_len, span, three_d):
    rows = [(0.0, 0.0, k * span / text_len) for k in range(text_len)]
    scale = span / math.sqrt(h * w)
    for t in range(max(frames, 1)):
        rows += [(r * scale, c * scale, float(t)) for r in range(h) for c in range(w)]
    out = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return out if three_d else out[:, :2]


def expected_angles(positions, head_dim, three_d):
    half = head_dim // 2
    spatial = half - 8 if three_d else half
    f = [10000.0 ** (-2 * j / spatial) for j in range(spatial // 2)]
    g = [10000.0 ** (-j / 8) for j in range(8)]
    out = []
    for p in positions:
        angles = [p[0] * v for v in f] + [p[1] * v for v in f] + ([p[2] * v for v in g] if three_d else [])
        assert len(angles) == half
        out.append([a for a in angles for _ in (0, 1)])
    return np.array(out)


def expected_rotation(x, cos, sin):
    out = np.empty_like(x)
    for i in range(0, x.shape[-1], 2):
        x0, x1 = x[..., i], x[..., i + 1]
        out[..., i] = x0 * cos[:, i] - x1 * sin[:, i]
        out[..., i + 1] = x1 * cos[:, i + 1] + x0 * sin[:, i + 1]
    return out


@pytest.mark.parametrize("h, w, frames, text_len, span", [(2, 3, 0, 0, 5), (2, 3, 0, 4, 5), (3, 2, 2, 3, 7),
                                                          (3, 2, 3, 0, 4), (1, 4, 1, 2, 6)])
def test_3d_positions_are_upstreams(h, w, frames, text_len, span):
    got = token_positions(h, w, frames, text_len, span, True)
    assert got.dtype == np.float32 and got.shape == (text_len + max(frames, 1) * h * w, 3)
    np.testing.assert_allclose(got, expected_positions(h, w, frames, text_len, span, True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("h, w, span", [(2, 3, 5), (3, 2, 4), (4, 4, 4)])
def test_2d_positions_are_upstreams(h, w, span):
    got = token_positions(h, w, 0, 0, span, False)
    assert got.shape == (h * w, 2)
    np.testing.assert_allclose(got, expected_positions(h, w, 0, 0, span, False), rtol=1e-6, atol=1e-6)


def test_2d_positions_refuse_text():
    with pytest.raises(ValueError, match=r"^2-D rotary positions cannot carry text$"):
        token_positions(2, 2, 0, 3, 2, False)


@pytest.mark.parametrize("head_dim, three_d", [(48, True), (64, True), (32, False), (24, False)])
def test_angles_split_the_head_dims_as_upstream(head_dim, three_d):
    positions = np.random.default_rng(0).uniform(0, 9, (5, 3 if three_d else 2)).astype(np.float32)
    got = rope_angles(positions, head_dim, three_d)
    assert got.dtype == np.float32 and got.shape == (5, head_dim)
    np.testing.assert_allclose(got, expected_angles(positions, head_dim, three_d), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("three_d", [True, False])
def test_tables_are_cos_and_sin_of_the_angles(three_d):
    h, w, frames, text_len, span, head_dim = 2, 3, (2 if three_d else 0), (3 if three_d else 0), 5, 48
    cos, sin = rope_tables(h, w, frames, text_len, span, head_dim, three_d)
    angles = expected_angles(expected_positions(h, w, frames, text_len, span, three_d), head_dim, three_d)
    assert cos.dtype == sin.dtype == mx.float32
    np.testing.assert_allclose(np.array(cos), np.cos(angles), atol=2e-6)
    np.testing.assert_allclose(np.array(sin), np.sin(angles), atol=2e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_rotation_turns_adjacent_pairs(dtype):
    rng = np.random.default_rng(1)
    seq, head_dim = 5, 8
    x = rng.normal(size=(2, 3, seq, head_dim)).astype(np.float32)
    angles = rng.uniform(-3, 3, (seq, head_dim // 2)).repeat(2, axis=-1)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    got = apply_rope(mx.array(x).astype(dtype), mx.array(cos), mx.array(sin))
    assert got.dtype == dtype
    x_in = np.array(mx.array(x).astype(dtype).astype(mx.float32))
    tol = 1e-6 if dtype == mx.float32 else 5e-3
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), expected_rotation(x_in, cos, sin), atol=tol, rtol=tol)


def flow(txt_size: int) -> STARFlow:
    return STARFlow(FlowConfig(in_channels=2, channels=48, layers_per_block=[1], latent_size=4, head_dim=48,
                               pt_seq_len=6, txt_size=txt_size, txt_dim=8 if txt_size else 0))


@pytest.mark.parametrize("txt_size, frames, local, text_len", [(4, 0, False, 4), (4, 0, False, 0), (1, 0, False, 1),
                                                                (4, 2, False, 4), (4, 3, True, 4), (0, 0, False, 0)])
def test_flow_tables_follow_the_model_and_layout(txt_size, frames, local, text_len):
    model = flow(txt_size)
    seq_frames = 1 if local else frames
    three_d = txt_size > 0
    cos, sin = model.rope(Layout(1, frames, 2, 3, 2, local), text_len)
    angles = expected_angles(expected_positions(2, 3, seq_frames, text_len, 6, three_d), 48, three_d)
    np.testing.assert_allclose(np.array(cos), np.cos(angles), atol=2e-6)
    np.testing.assert_allclose(np.array(sin), np.sin(angles), atol=2e-6)


def test_padded_rows_do_not_turn_and_each_shape_has_its_table():
    model = flow(4)
    layout = Layout(1, 0, 2, 3, 2, False)
    cos, sin = model.rope(layout, 4, pad=3)
    plain_cos, plain_sin = model.rope(layout, 4)
    assert cos.shape == sin.shape == (4 + 6 + 3, 48) and plain_cos.shape == (4 + 6, 48)
    np.testing.assert_array_equal(np.array(cos[:10]), np.array(plain_cos))
    np.testing.assert_array_equal(np.array(sin[:10]), np.array(plain_sin))
    np.testing.assert_array_equal(np.array(cos[10:]), np.ones((3, 48)))
    np.testing.assert_array_equal(np.array(sin[10:]), np.zeros((3, 48)))
    assert model.rope(layout, 4, pad=3)[0] is cos and model.rope(layout, 2)[0].shape == (2 + 6, 48)


def test_padded_tables_can_be_read_from_another_thread():
    """The pipelining worker reads the cached tables from its own thread, where MLX cannot evaluate work
    still queued on this thread's stream: the padded tables must be concrete when cached."""
    cos, sin = flow(4).rope(Layout(1, 0, 2, 3, 2, False), 4, pad=3)
    read = {}

    def worker():
        try:
            read["tables"] = np.array(cos), np.array(sin)
        except RuntimeError as error:
            read["error"] = str(error)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert "error" not in read, read.get("error")
    angles = expected_angles(expected_positions(2, 3, 0, 4, 6, True), 48, True)
    np.testing.assert_allclose(read["tables"][0][:10], np.cos(angles), atol=2e-6)
    np.testing.assert_allclose(read["tables"][1][:10], np.sin(angles), atol=2e-6)


def test_video_needs_text_rotary_dims():
    with pytest.raises(ValueError, match=r"^video input needs a model with text rotary dims \(txt_size > 0\)$"):
        flow(0).rope(Layout(1, 2, 2, 3, 2, False), 0)
