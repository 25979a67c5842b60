"""``starflow encode`` and ``starflow generate --from-noise``: the round trip from the command line, bad noise files."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fixtures_cli import one_line
from fixtures_inversion import make_class_video_folder
from fixtures_model import make_class_model_folder
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register

register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inv-cli")
    return {"image": make_class_model_folder(root / "image"), "other": make_class_model_folder(root / "other", seed=5),
            "video": make_class_video_folder(root / "video")}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_an_image_survives_encode_and_generate_from_noise(models, tmp_path):
    source, noise, back = tmp_path / "src.png", tmp_path / "n.safetensors", tmp_path / "back.png"
    assert run("generate", "2", "-m", models["image"], "--seed", 4, "-o", source).exit_code == 0
    res = run("encode", source, "-p", "2", "-m", models["image"], "--cfg", 1.0, "-o", noise)
    assert res.exit_code == 0, res.output
    import mlx.core as mx

    _, meta = mx.load(str(noise), return_metadata=True)
    assert meta["prompt"] == "2" and meta["cfg"] == "1.0" and meta["model"] == str(models["image"].resolve())
    from starflow_mlx.pipelines.video_io import file_sha256

    assert meta["source_sha256"] == file_sha256(source)
    res = run("generate", "--from-noise", noise, "-o", back)  # the model and cfg come from the file
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(back)), np.asarray(Image.open(source)))


def test_a_clip_survives_encode_and_generate_from_noise(models, tmp_path):
    from starflow_mlx import Pipeline
    from starflow_mlx.pipelines.video_io import read_video

    source, noise, back = tmp_path / "src.mp4", tmp_path / "n.safetensors", tmp_path / "back.mp4"
    assert run("generate", "3 moving left", "-m", models["video"], "-o", source).exit_code == 0
    assert run("encode", source, "-p", "3 moving left", "-m", models["video"], "-o", noise).exit_code == 0
    res = run("generate", "--from-noise", noise, "-o", back)
    assert res.exit_code == 0, res.output
    # mp4 is lossy: compare what the flow reads of each clip, which the round trip keeps to float32 rounding.
    pipe = Pipeline.from_pretrained(models["video"])
    first, second = (np.array(pipe.clip_input(read_video(p)[0])[0]) for p in (source, back))
    assert np.abs(first - second).max() < 0.05


def test_noise_files_of_another_model_or_damaged_are_one_line_and_write_nothing(models, tmp_path):
    source, noise = tmp_path / "src.png", tmp_path / "n.safetensors"
    run("generate", "1", "-m", models["image"], "-o", source)
    assert run("encode", source, "-p", "1", "-m", models["image"], "-o", noise).exit_code == 0
    out = tmp_path / "out.png"
    assert "encoded with the model" in one_line(run("generate", "--from-noise", noise, "-m", models["video"], "-o", out))
    data = noise.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "cannot read noise file" in one_line(run("generate", "--from-noise", tmp_path / "cut.safetensors", "-o", out))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "cannot read noise file" in one_line(run("generate", "--from-noise", tmp_path / "junk.safetensors",
                                                    "-o", out))
    import mlx.core as mx

    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"noise": mx.zeros((1, 8, 8, 1))})
    assert "not a starflow-mlx noise file" in one_line(run("generate", "--from-noise", tmp_path / "plain.safetensors",
                                                           "-o", out))
    assert "with --cfg 3" in one_line(run("generate", "--from-noise", noise, "--cfg", 3, "-o", out))
    assert "--seed has no effect" in one_line(run("generate", "--from-noise", noise, "--seed", 2, "-o", out))
    assert not out.exists()
    assert "already exists" in one_line(run("encode", source, "-p", "1", "-m", models["image"], "-o", noise))
    assert "weights differ" in one_line(run("generate", "--from-noise", noise, "-m", models["other"], "-o", out))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
