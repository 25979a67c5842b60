"""jacobi=None ("auto") picks the sampler per device and model; explicit choices are kept."""

from types import SimpleNamespace

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from flow_factory import IMAGE, NOTEXT, random_flow
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.config import FlowConfig
from starflow_mlx.io.loading import load_flow
from starflow_mlx.pipelines.image_files import read_metadata
from starflow_mlx.sampling import auto

CPU, GPU = mx.Device(mx.cpu), mx.Device(mx.gpu)
WITH_SOS, NO_SOS = FlowConfig(**IMAGE), FlowConfig(**{**NOTEXT, "sos": False})


def test_rule_per_device_and_model():
    assert auto.choose_jacobi(WITH_SOS, CPU) is False
    assert auto.choose_jacobi(WITH_SOS, GPU) is True
    assert auto.choose_jacobi(NO_SOS, GPU) is False  # Jacobi needs a start-of-sequence token


@pytest.mark.parametrize("device", [CPU, GPU])
def test_explicit_choice_is_kept(device):
    assert auto.resolve_jacobi(True, WITH_SOS, device) is True
    assert auto.resolve_jacobi(False, WITH_SOS, device) is False
    assert auto.resolve_jacobi(None, WITH_SOS, device) is auto.choose_jacobi(WITH_SOS, device)


def test_reverse_auto_runs_the_chosen_sampler(monkeypatch):
    flow = random_flow(**IMAGE)
    z = mx.random.normal((1, 4, 4, 4), key=mx.random.key(0))
    y = mx.random.normal((1, 6, 24), key=mx.random.key(1))
    seq, jac = flow.reverse(z, y, jacobi=False), flow.reverse(z, y, jacobi=True)
    for device, expected in ((CPU, seq), (GPU, jac)):
        # Only the sampler's choice sees the other device; the model still computes on this one.
        monkeypatch.setattr(auto, "mx", SimpleNamespace(default_device=lambda device=device: device,
                                                        DeviceType=mx.DeviceType))
        assert mx.array_equal(flow.reverse(z, y, jacobi=None), expected).item()


def test_cli_default_records_the_sampler_that_ran(tmp_path):
    register(app)
    res = CliRunner().invoke(app, ["generate", "7", "--model", "demo", "-o", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    assert read_metadata(tmp_path / "a.png")["jacobi"] is auto.choose_jacobi(load_flow("demo").config)
