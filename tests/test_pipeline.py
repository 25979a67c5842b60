"""The image pipeline and `starflow generate` / `starflow score` on a tiny complete model folder."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fixtures_model import make_model_folder
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.pipelines.png import METADATA_KEY

torch = pytest.importorskip("torch")
register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("tiny"))


def generate(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_model_folder_layout(model):
    manifest = json.loads((model / "starflow.json").read_text())
    assert manifest["kind"] == "text-to-image"
    assert (model / "text_encoder" / "tokenizer").is_dir() and (model / "vae" / "model.safetensors").is_file()


def test_generate_writes_png_with_metadata_and_is_deterministic(model, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        res = generate("a cat playing piano", "--model", model, "--seed", 3, "-o", out, "--jacobi-block-size", 8)
        assert res.exit_code == 0, res.output
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as img:
        assert img.size == (32, 32)
        meta = json.loads(img.text[METADATA_KEY])
    assert meta["prompt"] == "a cat playing piano" and meta["seed"] == 3 and meta["cfg"] == 2.0
    res = generate("a cat playing piano", "--model", model, "--seed", 4, "-o", tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes() != a.read_bytes()


def test_from_metadata_regenerates_exactly(model, tmp_path):
    res = generate("a red bicycle", "--model", model, "-n", 3, "--output-dir", tmp_path / "many", "--no-jacobi")
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "many").glob("*.png"))
    assert len(files) == 3
    res = generate("--from-metadata", files[1], "-o", tmp_path / "again.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.png").read_bytes() == files[1].read_bytes()


def test_grid_and_aspect_ratio(model, tmp_path):
    res = generate("x", "--model", model, "-n", 4, "-o", tmp_path / "grid.png", "-a", "2:3")
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "grid.png") as img:
        # 2:3 at 32x32 pixels keeps the area: 40 high, 24 wide (multiples of 8), tiled 2x2 with 2 px gaps
        assert img.size == (2 * 24 + 2, 2 * 40 + 2)


def test_score_is_the_flow_likelihood(model, tmp_path):
    pipe = Pipeline.from_pretrained(model)
    image = pipe.generate("a dog", seed=1, num_images=1)[0]
    image.save(tmp_path / "dog.png")
    res = runner.invoke(app, ["score", str(tmp_path / "dog.png"), "--prompt", "a dog", "--model", str(model)])
    assert res.exit_code == 0, res.output
    bpd = float(res.output.split()[0])
    x = pipe.to_model_input(image)
    y, _ = pipe.conditioning("a dog", 1, None)
    expected = -float(pipe.flow.log_prob(x, y)[0].item()) / (np.prod(x.shape[1:]) * np.log(2))
    assert abs(bpd - expected) < 1e-3


def test_long_prompt_is_truncated_with_a_warning(model):
    pipe = Pipeline.from_pretrained(model)
    with pytest.warns(UserWarning, match="cut off"):
        pipe.generate("word " * 40, num_images=1)


@pytest.mark.parametrize("args,words", [
    (["x", "-a", "7:5"], "unknown aspect ratio"),
    (["x", "--model", "/nonexistent/model"], "not found"),
    (["x"], "exactly one of"),
])
def test_bad_inputs_fail_in_one_line(model, tmp_path, args, words):
    extra = [] if "--model" in args else ["--model", str(model)]
    out = [] if args == ["x"] else ["-o", str(tmp_path / "out.png")]
    res = generate(*args, *extra, *out)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.output
    assert not list(tmp_path.glob("*.png"))


def test_from_metadata_rejects_foreign_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    for name, words in (("plain.png", "no starflow-mlx generation metadata"), ("broken.png", "cannot read")):
        res = generate("--from-metadata", tmp_path / name, "-o", tmp_path / "o.png")
        assert res.exit_code == 1 and words in res.output
    assert not (tmp_path / "o.png").exists()


def test_manifest_required_for_pipeline(model, tmp_path):
    flow_only = tmp_path / "flow"
    flow_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (flow_only / name).write_bytes((model / name).read_bytes())
    res = generate("x", "--model", flow_only, "-o", tmp_path / "o.png")
    assert res.exit_code == 1 and "starflow.json" in res.output
