"""What reaches the terminal on bad input: one line, exit 1, no escape sequences from files, no usage box."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from flow_factory import IMAGE, random_flow
from fixtures_cli import ARGS, one_line
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.io.model_folder import DEMO_DIR

torch = pytest.importorskip("torch")
register(app)
runner = CliRunner()


def test_unreadable_paths_are_one_line_not_a_usage_box(tmp_path, monkeypatch):
    (tmp_path / "c.pth").write_bytes(b"junk")
    (tmp_path / "c.yaml").write_text("arguments: []")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # what a file without read permission looks like
    line = one_line(runner.invoke(app, ["convert", str(tmp_path / "c.pth"), "-c", str(tmp_path / "c.yaml"),
                                        "-o", str(tmp_path / "out")]))
    assert "not a PyTorch checkpoint" in line


def test_escape_sequences_in_tensor_names_are_not_echoed(tmp_path):
    state = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(random_flow(**IMAGE).parameters())}
    state["blocks.0.\x1b]0;owned\x07\x1b[2J\rname"] = torch.zeros(1)
    torch.save(state, tmp_path / "c.pth")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    res = runner.invoke(app, ["convert", str(tmp_path / "c.pth"), "-c", str(tmp_path / "c.yaml"),
                              "-o", str(tmp_path / "out")])
    line = one_line(res)
    assert "\x1b" not in res.output and "\r" not in res.output and "\x07" not in res.output
    assert "unexpected tensor blocks.0.\\x1b]0;owned\\x07\\x1b[2J\\rname" in line


@pytest.mark.parametrize("manifest", [[1, 2], {"kind": "class-to-image", "classes": {"a": 1}}, "x" * 10])
def test_wrong_shape_manifest_is_one_line(tmp_path, manifest):
    folder = tmp_path / "model"
    shutil.copytree(DEMO_DIR, folder)
    (folder / "starflow.json").write_text(json.dumps(manifest))
    line = one_line(runner.invoke(app, ["generate", "7", "--model", str(folder), "-o", str(tmp_path / "x.png")]))
    assert "starflow.json" in line and not (tmp_path / "x.png").exists()


def test_anything_unexpected_is_still_one_line(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a bug\nwith a second line")

    monkeypatch.setattr("starflow_mlx.convert.full_model.build_model_folder", broken)
    line = one_line(runner.invoke(app, ["convert", "x.pth", "-c", "x.yaml", "-o", str(tmp_path / "out")]))
    assert "internal error (TypeError: a bug)" in line and "STARFLOW_DEBUG=1" in line


@pytest.mark.parametrize("args, message", [
    (["generate", "--from-metadata", "{dir}"], "is a folder: give an image file"),
    (["convert", "x.pth", "-c", "x.yaml", "-o", "{dir}/out", "--quantize", "3"], "--quantize must be 4 or 8, got 3"),
    (["bench", "--config", "tiny", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["train", "-o", "{dir}/model", "--channels", "16", "--steps", "1"], "--channels 16 must be a multiple of 32"),
    (["train", "-o", "{dir}/model", "--channels", "32768", "--steps", "1"], "GB is available: use a smaller"),
])
def test_messages_name_the_option_the_user_gave(tmp_path, args, message):
    line = one_line(runner.invoke(app, [a.format(dir=tmp_path) for a in args]))
    assert message in line
    assert list(tmp_path.iterdir()) == []  # nothing written

