"""The numpy MIL interpreter against numpy references, op by op, on programs saved as real .mlpackages."""

import numpy as np
import pytest

pytest.importorskip("coremltools")

from starflow_mlx.coreml.builder import convert, make_program, mil  # noqa: E402
from starflow_mlx.coreml.interpreter import InterpreterError, Program, unpack_sub_byte  # noqa: E402

mb, types = mil()


def saved(tmp_path, inputs, body, name="p"):
    import coremltools as ct

    program = make_program(inputs, body, ct.target.macOS15)
    path = tmp_path / f"{name}.mlpackage"
    convert(program, ct.target.macOS15, "CPU_ONLY").save(str(path))
    return Program(path)


def test_linear_norm_activation_ops(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    gamma = rng.standard_normal(8).astype(np.float32)

    def body(v):
        x = v["x"]
        n = mb.layer_norm(x=x, axes=[-1], gamma=gamma, epsilon=np.float32(1e-5))
        y = mb.linear(x=n, weight=w, bias=bias)
        return [mb.gelu(x=y, mode="EXACT", name="exact"), mb.gelu(x=y, mode="TANH_APPROXIMATION", name="tanh"),
                mb.softplus(x=y, name="softplus"), mb.softmax(x=y, axis=-1, name="softmax")]

    p = saved(tmp_path, {"x": mb.TensorSpec((2, 3, 8), dtype=types.fp32)}, body)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    out = p.run("main", {"x": x})
    n = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma
    y = n @ w.T + bias
    from math import erf

    exact = 0.5 * y * (1 + np.vectorize(erf)(y / np.sqrt(2)))
    tanh = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
    e = np.exp(y - y.max(-1, keepdims=True))
    np.testing.assert_allclose(out["exact"], exact, atol=1e-5)
    np.testing.assert_allclose(out["tanh"], tanh, atol=1e-5)
    np.testing.assert_allclose(out["softplus"], np.log1p(np.exp(y)), atol=1e-5)
    np.testing.assert_allclose(out["softmax"], e / e.sum(-1, keepdims=True), atol=1e-6)


def test_float16_results_are_rounded_like_the_program_declares(tmp_path):
    def body(v):
        return [mb.add(x=v["x"], y=np.float16(1.0), name="y")]

    p = saved(tmp_path, {"x": mb.TensorSpec((4,), dtype=types.fp16)}, body)
    x = np.array([1e-4, 0.1, 1000.3, 3.14159], np.float32)
    out = p.run("main", {"x": x})["y"]
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, (x.astype(np.float16).astype(np.float32) + 1).astype(np.float16))


def test_conv_with_stride_padding_groups(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)

    def body(v):
        a = mb.conv(x=v["x"], weight=w, pad_type="custom", pad=[1, 1, 1, 1], name="same")
        b = mb.conv(x=v["x"], weight=w, strides=[2, 2], name="strided")
        return [a, b]

    p = saved(tmp_path, {"x": mb.TensorSpec((1, 3, 6, 5), dtype=types.fp32)}, body)
    x = rng.standard_normal((1, 3, 6, 5)).astype(np.float32)
    out = p.run("main", {"x": x})

    def ref(xp, stride):
        kh = w.shape[2]
        oh, ow = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kh) // stride + 1
        o = np.zeros((1, 4, oh, ow), np.float32)
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kh]
                o[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
        return o

    np.testing.assert_allclose(out["same"], ref(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), 1), atol=1e-4)
    np.testing.assert_allclose(out["strided"], ref(x, 2), atol=1e-4)


def test_state_is_updated_in_place_and_starts_at_zero(tmp_path):
    def body(v):
        cache = mb.read_state(input=v["cache"])
        begin = mb.concat(values=[np.zeros(1, np.int32), v["pos"]], axis=0)
        end = mb.add(x=begin, y=np.array([2, 1], np.int32))
        new = mb.slice_update(x=cache, update=v["x"], begin=begin, end=end)
        mb.coreml_update_state(state=v["cache"], value=new)
        return [mb.reduce_sum(x=new, axes=[1], keep_dims=False, name="total")]

    p = saved(tmp_path, {"x": mb.TensorSpec((2, 1), dtype=types.fp16), "pos": mb.TensorSpec((1,), dtype=types.int32),
                         "cache": mb.StateTensorSpec((2, 5), dtype=types.fp16)}, body)
    assert p.signature("main")["states"] == {"cache": ("FLOAT16", (2, 5))}
    state = p.make_state("main")
    assert not state["cache"].any()
    p.run("main", {"x": np.array([[1.0], [2.0]]), "pos": np.array([0], np.int32)}, state)
    out = p.run("main", {"x": np.array([[3.0], [4.0]]), "pos": np.array([3], np.int32)}, state)
    np.testing.assert_array_equal(out["total"], [4.0, 6.0])
    np.testing.assert_array_equal(state["cache"], [[1, 0, 0, 3, 0], [2, 0, 0, 4, 0]])
    with pytest.raises(InterpreterError, match="stateful"):
        p.run("main", {"x": np.zeros((2, 1)), "pos": np.array([0], np.int32)})


def test_attention_gather_split_and_masks(tmp_path):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((7, 4)).astype(np.float32)

    def body(v):
        rows = mb.add(x=v["pos"], y=np.arange(3, dtype=np.int32))
        picked = mb.gather(x=table, indices=rows, axis=0, name="picked")
        mask = mb.less_equal(x=np.arange(5, dtype=np.int32)[None, :], y=mb.expand_dims(x=rows, axes=[1]))
        att = mb.scaled_dot_product_attention(query=v["q"], key=v["k"], value=v["k"], attn_mask=mask, name="att")
        first, second = mb.split(x=v["k"], split_sizes=[2, 2], axis=-1)
        return [picked, att, mb.identity(x=second, name="second")]

    p = saved(tmp_path, {"q": mb.TensorSpec((1, 3, 4), dtype=types.fp32), "k": mb.TensorSpec((1, 5, 4), dtype=types.fp32),
                         "pos": mb.TensorSpec((1,), dtype=types.int32)}, body)
    q, k = rng.standard_normal((1, 3, 4)).astype(np.float32), rng.standard_normal((1, 5, 4)).astype(np.float32)
    out = p.run("main", {"q": q, "k": k, "pos": np.array([1], np.int32)})
    np.testing.assert_array_equal(out["picked"], table[1:4])
    scores = q @ k.transpose(0, 2, 1) / 2.0
    scores = np.where(np.arange(5)[None, :] <= (1 + np.arange(3))[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(out["att"], probs / probs.sum(-1, keepdims=True) @ k, atol=1e-5)
    np.testing.assert_array_equal(out["second"], k[..., 2:])


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_quantized_constants(tmp_path, bits):
    rng = np.random.default_rng(3)
    q = rng.integers(0, 2**bits, size=(4, 16)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, size=(4, 2)).astype(np.float16)
    offset = rng.uniform(0, 2**bits - 1, size=(4, 2)).astype(np.float16)
    data = q.astype(types.np_uint4_dtype) if bits == 4 else q

    def body(v):
        w = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset)
        return [mb.linear(x=v["x"], weight=w, name="y")]

    p = saved(tmp_path, {"x": mb.TensorSpec((1, 16), dtype=types.fp16)}, body)
    x = rng.standard_normal((1, 16)).astype(np.float16)
    w = (np.repeat(scale.astype(np.float32), 8, 1) * (q - np.repeat(offset.astype(np.float32), 8, 1)))
    expected = x.astype(np.float32) @ w.astype(np.float16).astype(np.float32).T
    np.testing.assert_allclose(p.run("main", {"x": x})["y"].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_sub_byte_unpacking_matches_coremltools():
    from coremltools.optimize import _utils as optimize_utils

    values = np.random.default_rng(4).integers(0, 16, size=11).astype(np.uint8)
    packed = optimize_utils.pack_elements_into_bits(values, 4)
    np.testing.assert_array_equal(unpack_sub_byte(packed.tobytes(), 4, False, 11), values)
    signed = np.array([-8, -1, 0, 7, 3], np.int8)
    packed = optimize_utils.pack_elements_into_bits(signed, 4)
    np.testing.assert_array_equal(unpack_sub_byte(packed.tobytes(), 4, True, 5), signed)


def test_unknown_op_and_bad_inputs_are_named(tmp_path):
    p = saved(tmp_path, {"x": mb.TensorSpec((3,), dtype=types.fp32)}, lambda v: [mb.sin(x=v["x"], name="y")])
    with pytest.raises(InterpreterError, match="op sin"):
        p.run("main", {"x": np.zeros(3)})
    with pytest.raises(InterpreterError, match=r"input x must be \(3,\)"):
        p.run("main", {"x": np.zeros(4)})
    with pytest.raises(InterpreterError, match="no function 'step'"):
        p.run("step", {"x": np.zeros(3)})
