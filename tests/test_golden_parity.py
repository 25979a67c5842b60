"""Parity with the upstream PyTorch code, through the real conversion path.

Each case in tests/golden/ holds a tiny upstream model's state dict, inputs and
the outputs upstream computed (tests/golden/README.md says how they were made).
The test saves the state dict as a .pth, converts it with ``convert_checkpoint``
(float32) and compares our forward z / logdet, sequential reverse with and
without guidance, block-wise Jacobi and the denoiser.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from starflow_mlx.convert.flow_checkpoint import convert_checkpoint
from starflow_mlx.io.loading import load_flow

torch = pytest.importorskip("torch")
GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.json"))
TOL = 1e-4


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def load_case(name, tmp_path, prefix=""):
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    arrays = load_file(str(GOLDEN / f"{name}.safetensors"))
    state = {prefix + k[len("weights."):]: torch.from_numpy(v.copy()) for k, v in arrays.items()
             if k.startswith("weights.")}
    torch.save(state, tmp_path / "model.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"arguments": meta["arguments"]}))
    convert_checkpoint(tmp_path / "model.pth", tmp_path / "config.yaml", tmp_path / "mlx", dtype="float32")
    return meta, arrays, load_flow(tmp_path / "mlx")


def get(arrays, key):
    return mx.array(arrays[key]) if key in arrays else None


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_upstream(name, tmp_path):
    meta, arrays, flow = load_case(name, tmp_path, prefix="module." if name == "image" else "")
    if "out.forward.z" not in arrays:
        pytest.skip(f"{name} has no forward reference")
    x, y = get(arrays, "in.x"), get(arrays, "in.y")
    z, logdet = flow.forward(x, y)
    assert rel_err(z, arrays["out.forward.z"]) < TOL
    assert rel_err(logdet, arrays["out.forward.logdet"]) < TOL
    if "in.x_wide" in arrays:
        z, logdet = flow.forward(get(arrays, "in.x_wide"), y)
        assert rel_err(z, arrays["out.forward_wide.z"]) < TOL
        assert rel_err(logdet, arrays["out.forward_wide.logdet"]) < TOL


@pytest.mark.parametrize("name", CASES)
def test_sampling_matches_upstream(name, tmp_path):
    meta, arrays, flow = load_case(name, tmp_path)
    z, y, y_u = get(arrays, "in.z"), get(arrays, "in.y"), get(arrays, "in.y_uncond")
    jac = meta.get("jacobi", {})
    jacobi_kw = dict(jacobi=True, jacobi_block_size=jac.get("block_size", 64),
                     jacobi_threshold=jac.get("threshold", 0.005), jacobi_max_iter=jac.get("max_iter", 32),
                     context_frames=meta.get("context_length"))
    checked = 0
    for key, kwargs in [("out.reverse", {}), ("out.reverse_cfg", {"y_uncond": y_u, "cfg": meta.get("cfg", 0)}),
                        ("out.jacobi", jacobi_kw),
                        ("out.jacobi_cfg", {**jacobi_kw, "y_uncond": y_u, "cfg": meta.get("cfg", 0)})]:
        if key in arrays:
            assert rel_err(flow.reverse(z, y, **kwargs), arrays[key]) < TOL, key
            checked += 1
    assert checked, f"{name} has no sampling reference"


@pytest.mark.parametrize("name", [c for c in CASES if "out.denoiser" in load_file(str(GOLDEN / f"{c}.safetensors"))])
def test_denoiser_matches_upstream(name, tmp_path):
    _, arrays, flow = load_case(name, tmp_path)
    out = flow.denoiser(get(arrays, "in.x"), get(arrays, "in.y"))
    assert rel_err(out, arrays["out.denoiser"]) < TOL
