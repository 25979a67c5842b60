"""`starflow generate` and `starflow score` end to end on a tiny complete model folder."""

import json
import shutil

import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.pipelines.image_files import METADATA_KEY

pytest.importorskip("torch")
pytest.importorskip("diffusers")
register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fixtures_model import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("tiny"))


def generate(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def metadata(path):
    with Image.open(path) as img:
        return json.loads(img.text[METADATA_KEY])


def test_png_carries_its_parameters_and_is_byte_identical_per_seed(model, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        res = generate("a cat playing piano", "--model", model, "--seed", seed, "-o", out, "--jacobi", "--jacobi-block-size", 8)
        assert res.exit_code == 0, res.output
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    assert "block 1 (deep)" in res.output and "decode" in res.output  # per-stage progress and timings
    with Image.open(a) as img:
        assert img.size == (32, 32)
    meta = metadata(a)
    assert {k: meta[k] for k in ("prompt", "model", "seed", "cfg", "aspect_ratio", "index", "jacobi",
                                 "jacobi_block_size", "jacobi_threshold")} == {
        "prompt": "a cat playing piano", "model": str(model), "seed": 3, "cfg": 2.0, "aspect_ratio": "1:1",
        "index": 0, "jacobi": True, "jacobi_block_size": 8, "jacobi_threshold": 0.005}
    assert meta["version"] and meta["num_images"] == 1
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_from_metadata_regenerates_one_image_of_a_batch_exactly(model, tmp_path):
    res = generate("a red bicycle", "--model", model, "-n", 3, "--output-dir", tmp_path / "many", "--no-jacobi",
                   "--cfg", 1.5)
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "many").glob("*.png"))
    assert [metadata(f)["index"] for f in files] == [0, 1, 2] and metadata(files[1])["jacobi"] is False
    res = generate("--from-metadata", files[1], "--model", model, "-o", tmp_path / "again.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.png").read_bytes() == files[1].read_bytes()


def test_many_images_to_one_file_make_a_grid(model, tmp_path):
    res = generate("x", "--model", model, "-n", 4, "-o", tmp_path / "grid.png", "-a", "2:3")
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "grid.png") as img:
        # 2:3 keeps the 32x32 area: 24 wide, 40 high (multiples of 8), tiled 2x2 with 2-pixel gaps
        assert img.size == (2 * 24 + 2, 2 * 40 + 2)
    assert metadata(tmp_path / "grid.png")["index"] is None
    res = generate("--from-metadata", tmp_path / "grid.png", "--model", model)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "grid-again.png").read_bytes() == (tmp_path / "grid.png").read_bytes()


def test_score_prints_the_pipelines_bits_per_dim(model, tmp_path):
    out = tmp_path / "dog.png"
    assert generate("a dog", "--model", model, "--seed", 1, "-o", out).exit_code == 0
    res = runner.invoke(app, ["score", str(out), "--prompt", "a dog", "--model", str(model)])
    assert res.exit_code == 0, res.output
    value, unit = res.output.split()
    with Image.open(out) as img:
        expected = Pipeline.from_pretrained(model).score(img.copy(), "a dog")
    assert unit == "bits/dim" and float(value) == pytest.approx(expected, abs=1e-4)


@pytest.fixture
def flow_only(model, tmp_path):
    folder = tmp_path / "flow-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, folder / name)
    return folder


@pytest.mark.parametrize("args,words", [
    (["x", "-a", "7:5"], "unknown aspect ratio '7:5': use one of 1:1, 2:3, 3:2"),
    (["x", "--model", "/nonexistent/model"], "not found"),
    (["x", "--model", "dmeo"], "model 'dmeo' not found (did you mean demo?)"),
    (["x", "--model", "FLOW_ONLY"], "has no starflow.json"),
    (["x", "--output-dir", "OUT_DIR"], "give --output FILE or --output-dir DIR, not both"),
    (["x", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["x", "--seed", "-2"], "seed must be 0 or more"),
    (["x", "--cfg", "nan"], "cfg must be a number 0 or more, got nan"),
    (["x", "--cfg", "inf"], "cfg must be a number 0 or more, got inf"),
    (["--from-metadata", "PLAIN"], "carries no starflow-mlx generation metadata"),
    (["--from-metadata", "BROKEN"], "cannot read"),
    (["--from-metadata", "DAMAGED"], "damaged starflow-mlx metadata"),
])
def test_bad_inputs_fail_in_one_line_and_write_nothing(model, flow_only, tmp_path, args, words):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("RGB", (8, 8)).save(inputs / "plain.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps({"prompt": "x", "seed": "three"}))
    Image.new("RGB", (8, 8)).save(inputs / "damaged.png", pnginfo=info)
    names = {"FLOW_ONLY": flow_only, "OUT_DIR": tmp_path / "out", "PLAIN": inputs / "plain.png",
             "BROKEN": inputs / "broken.png", "DAMAGED": inputs / "damaged.png"}
    args = [names.get(a, a) for a in args]
    extra = [] if "--model" in args else ["--model", model]
    res = generate(*args, *extra, "-o", tmp_path / "out" / "o.png")
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.output
    assert not (tmp_path / "out").exists()


def test_score_refuses_unreadable_images(model, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for path, words in ((tmp_path / "bad.png", "cannot read image"), (tmp_path / "none.png", "not found")):
        res = runner.invoke(app, ["score", str(path), "--prompt", "x", "--model", str(model)])
        assert res.exit_code == 1 and res.output.startswith("error: ") and words in res.output, res.output
