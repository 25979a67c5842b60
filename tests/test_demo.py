"""The built-in digits model: works offline, draws the requested digits, Jacobi agrees with sequential."""

import os
import subprocess
import sys

import numpy as np
import pytest

from starflow_mlx.io.model_folder import DEMO_DIR

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def quality():
    from starflow_mlx.benchmarks import demo_quality
    from starflow_mlx.pipelines.image import Pipeline
    from starflow_mlx.training.data import load_digits_split

    train, _ = load_digits_split()
    return Pipeline.from_pretrained("demo"), demo_quality.digit_classifier(train), demo_quality.to_features


def test_demo_ships_with_the_package():
    assert (DEMO_DIR / "config.json").is_file() and (DEMO_DIR / "starflow.json").is_file()
    assert (DEMO_DIR / "model.safetensors").stat().st_size < 10 * 2**20


def test_demo_draws_the_requested_digits(quality):
    pipe, clf, features = quality
    correct = 0
    for digit in range(10):
        x = pipe.sample(str(digit), seed=100 + digit, num_images=5)
        correct += int((clf.predict(features(np.array(x))) == digit).sum())
    assert correct / 50 >= 0.85


def test_jacobi_and_sequential_give_the_same_digits(quality):
    pipe, clf, features = quality
    for digit in ("2", "7"):
        jac = pipe.sample(digit, seed=3, num_images=4, jacobi=True, jacobi_threshold=1e-6, jacobi_max_iter=64)
        seq = pipe.sample(digit, seed=3, num_images=4, jacobi=False)
        assert np.abs(np.array(jac) - np.array(seq)).max() < 1e-2
        assert (clf.predict(features(np.array(jac))) == clf.predict(features(np.array(seq)))).all()


def test_generate_needs_no_network(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_PROXY="*", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    code = ("import sys; from starflow_mlx.apps.cli import app; from starflow_mlx.apps.commands import register; "
            "register(app); app(sys.argv[1:], standalone_mode=False); "
            "assert 'huggingface_hub' not in sys.modules, 'the demo path imported the hub client'")
    res = subprocess.run([sys.executable, "-c", code, "generate", "7", "--model", "demo", "-n", "4",
                          "-o", str(tmp_path / "seven.png")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "seven.png").stat().st_size > 0


def test_quality_measure_reports_each_digit_and_the_bits_per_dim():
    from starflow_mlx.benchmarks import demo_quality

    steps = []
    result = demo_quality.measure("demo", per_class=1, jacobi=False, step=lambda: steps.append(1))
    assert len(steps) == 11 and result["samples"] == 10  # what `quantize --report` counts as the demo's parts
