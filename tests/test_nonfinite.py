"""One non-finite value anywhere is enough to refuse a sample.

Damaged weights rarely turn a whole sample into NaN: one overflowing channel gives one +inf, a single
0/0 one NaN. A check that looks at the mean, at one element, only for NaN, or that asks whether *any*
value is finite instead of *all*, passes an all-NaN test and misses these. (The video pipeline's check
is tested the same way in tests/test_video_pipeline.py; Core ML verify's in tests/test_verify_tolerance.py.)
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.pipelines import image as image_pipeline
from starflow_mlx.pipelines.settings import NonFiniteSampleError, check_finite

BAD = [math.nan, math.inf, -math.inf]
BAD_IDS = ["nan", "+inf", "-inf"]


def one_bad(shape, value, index, dtype=mx.float32):
    """Finite values (in [-3, 3], like latents) with ``value`` at flat ``index``."""
    x = np.random.default_rng(0).uniform(-3, 3, shape).astype(np.float32)
    x.reshape(-1)[index] = value
    return mx.array(x).astype(dtype)


@pytest.mark.parametrize("value", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("index", [0, 37, -1], ids=["first", "middle", "last"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["f32", "f16", "bf16"])
def test_one_non_finite_value_fails_the_check(value, index, dtype):
    x = one_bad((2, 4, 4, 4), value, index, dtype)
    with pytest.raises(NonFiniteSampleError, match="NaN or infinite values"):
        check_finite(x)


def test_finite_extremes_pass():
    # The largest float16 values and subnormals are finite: a check against a magnitude would refuse them.
    x = mx.array([65504.0, -65504.0, 6e-8, -6e-8, 0.0], mx.float16)
    assert check_finite(x) is x


@pytest.fixture(scope="module")
def pipe():
    from starflow_mlx import Pipeline

    return Pipeline.from_pretrained("demo")


@pytest.mark.parametrize("value", BAD, ids=BAD_IDS)
def test_one_bad_value_after_the_score_step_fails_the_image_sample(pipe, monkeypatch, value):
    """The score step is the last thing sample() does: one bad value there must not reach a PNG."""
    def denoise_with_one_bad_value(flow, x, y, noise_std):
        flat = mx.reshape(x, (-1,))
        index = flat.size // 2
        return mx.reshape(mx.concatenate([flat[:index], mx.array([value]), flat[index + 1:]]), x.shape)

    monkeypatch.setattr(image_pipeline, "score_denoise", denoise_with_one_bad_value)
    with pytest.raises(NonFiniteSampleError, match="NaN or infinite values"):
        pipe.sample("7", seed=0)


@pytest.mark.parametrize("value", BAD, ids=BAD_IDS)
def test_one_bad_value_from_the_flow_fails_the_image_sample(pipe, monkeypatch, value):
    """One bad latent from the flow spreads through the score step's gradient or stays put: refused either way."""
    reverse = pipe.flow.reverse

    def reverse_with_one_bad_value(z, *args, **kwargs):
        x = reverse(z, *args, **kwargs)
        mask = mx.arange(x.size).reshape(x.shape) == 5
        return mx.where(mask, mx.array(value, x.dtype), x)

    monkeypatch.setattr(pipe.flow, "reverse", reverse_with_one_bad_value)
    with pytest.raises(NonFiniteSampleError, match="NaN or infinite values"):
        pipe.sample("7", seed=0)
