"""The wheel installs everything under starflow_mlx/, nothing under generic names like convert/ or apps/."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("starflow_mlx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert all(t in ("starflow_mlx", "starflow_mlx_blas.pth") or t.endswith(".dist-info") for t in tops), tops
    assert "starflow_mlx_blas.pth" in names  # the start-up hook of starflow_mlx/blas.py
    for sub in ("convert", "quantize", "apps", "benchmarks", "models", "sampling", "pipelines", "training", "coreml"):
        assert f"starflow_mlx/{sub}/__init__.py" in names, sub
    assert "starflow_mlx/registry.json" in names
    for demo in ("demo", "demo_video"):  # the built-in models ship whole
        assert {f"starflow_mlx/{demo}/{f}" for f in ("config.json", "model.safetensors", "starflow.json")} <= set(names)


def test_editable_install_maps_top_level_folders():
    import starflow_mlx.apps.cli
    import starflow_mlx.convert.torch_pickle
    import starflow_mlx.quantize.policy

    assert Path(starflow_mlx.convert.torch_pickle.__file__).parent.name == "convert"
    assert Path(starflow_mlx.apps.cli.__file__).parent.name == "apps"
