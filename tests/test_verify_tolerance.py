"""Core ML verify's tolerance: float16's error model, bounded above so broken outputs cannot pass.

Errors are relative to the reference's peak. However far MLX's own float16 drifts (issue 29: a clip of the
demo-video export, MLX float16 8.3e-01, gave a tolerance of 3.3 and passed an error of 0.9), an all-zero,
negated or rescaled output must fail, and a float16 rounding of the reference must pass.
(Broken packages through a whole verify_export: tests/test_coreml_export.py; whole clips, checked step by step:
tests/test_coreml_video.py.)
"""

import math

import numpy as np
import pytest

pytest.importorskip("coremltools")

from starflow_mlx.coreml.checks import CAP, FLOOR, Check, rel_error  # noqa: E402

REFERENCE = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)  # pixels in [-1, 1]
FP16_ERRORS = [0.0, 1e-3, 7e-3, 0.05, 0.83, 3.0]  # from a well-behaved package to a chaotic chain


def check(ours, fp16_error):
    return Check("pkg", "what", rel_error(ours, REFERENCE), fp16_error)


@pytest.mark.parametrize("fp16_error", FP16_ERRORS)
@pytest.mark.parametrize("broken", ["zeros", "negated", "half", "double", "shifted", "transposed"])
def test_broken_outputs_fail_whatever_float16_costs(broken, fp16_error):
    ours = {"zeros": np.zeros_like(REFERENCE), "negated": -REFERENCE, "half": 0.5 * REFERENCE,
            "double": 2 * REFERENCE, "shifted": REFERENCE + 0.25,
            "transposed": REFERENCE.transpose(0, 2, 1, 3)}[broken]
    c = check(ours, fp16_error)
    assert c.error > 0.2 and not c.ok and "FAILED" in c.line()


@pytest.mark.parametrize("fp16_error", FP16_ERRORS)
def test_a_float16_rounding_of_the_reference_passes(fp16_error):
    c = check(REFERENCE.astype(np.float16).astype(np.float32), fp16_error)
    assert c.error <= 2**-11 and c.ok  # round to nearest: half a unit in the last place, relative to the peak


def test_the_tolerance_is_float16s_error_model():
    assert Check("p", "w", 0.0, 0.0).tolerance == FLOOR  # about 40 roundings of 2^-11
    assert Check("p", "w", 0.0, 1e-2).tolerance == pytest.approx(4e-2)  # 4x what MLX float16 costs here
    assert Check("p", "w", 0.0, 0.83).tolerance == CAP == 0.1  # never up to the signal's own size
    assert 40 * 2**-11 < FLOOR < CAP <= 0.1


def test_issue_29s_numbers_now_fail():
    assert not Check("video", "7-frame clip from 1 known frame", 0.90, 0.83).ok


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_one_non_finite_value_fails(value):
    ours = REFERENCE.copy()
    ours[1, 7, 3, 2] = value
    with np.errstate(invalid="ignore"):
        c = check(ours, 1e-3)
    assert not c.ok and "FAILED" in c.line()

