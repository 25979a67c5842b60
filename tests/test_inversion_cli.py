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
    # The cfg comes from the file; a local model folder it names is loaded only when given again.
    assert "pass --model" in one_line(run("generate", "--from-noise", noise, "-o", back))
    res = run("generate", "--from-noise", noise, "-m", models["image"], "-o", back)
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(back)), np.asarray(Image.open(source)))


def test_a_clip_survives_encode_and_generate_from_noise(models, tmp_path):
    from starflow_mlx import load_pipeline
    from starflow_mlx.pipelines.video_io import read_video

    source, noise, back = tmp_path / "src.mp4", tmp_path / "n.safetensors", tmp_path / "back.mp4"
    assert run("generate", "3 moving left", "-m", models["video"], "-o", source).exit_code == 0
    assert run("encode", source, "-p", "3 moving left", "-m", models["video"], "-o", noise).exit_code == 0
    res = run("generate", "--from-noise", noise, "-m", models["video"], "-o", back)
    assert res.exit_code == 0, res.output
    # mp4 is lossy: compare what the flow reads of each clip, which the round trip keeps to float32 rounding.
    pipe = load_pipeline(models["video"])
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
    assert "cannot read noise file" in one_line(run("generate", "--from-noise", tmp_path / "cut.safetensors",
                                                    "-m", models["image"], "-o", out))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "cannot read noise file" in one_line(run("generate", "--from-noise", tmp_path / "junk.safetensors",
                                                    "-o", out))
    import mlx.core as mx

    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"noise": mx.zeros((1, 8, 8, 1))})
    assert "not a starflow-mlx noise file" in one_line(run("generate", "--from-noise", tmp_path / "plain.safetensors",
                                                           "-o", out))
    assert "with --cfg 3" in one_line(run("generate", "--from-noise", noise, "-m", models["image"], "--cfg", 3,
                                          "-o", out))
    assert "--seed has no effect" in one_line(run("generate", "--from-noise", noise, "--seed", 2, "-o", out))
    assert not out.exists()
    assert "already exists" in one_line(run("encode", source, "-p", "1", "-m", models["image"], "-o", noise))
    assert "weights differ" in one_line(run("generate", "--from-noise", noise, "-m", models["other"], "-o", out))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_edit_and_inpaint_from_the_command_line_and_again_from_metadata(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source, mask = tmp_path / "src.png", tmp_path / "mask.png"
    run("generate", "0", "-m", models["image"], "-o", source)
    Image.fromarray(np.where(np.arange(64)[:, None] >= 32, 255, 0).astype(np.uint8).repeat(64, 1)).save(mask)
    res = run("edit", source, "--from", "0", "--to", "2", "--strength", 0.4, "--seed", 3, "-m", models["image"])
    assert res.exit_code == 0, res.output
    edited = tmp_path / "src-edit.png"
    from starflow_mlx.pipelines.image_files import read_metadata

    meta = read_metadata(edited)
    assert (meta["operation"], meta["source_prompt"], meta["prompt"], meta["strength"], meta["seed"]) == \
        ("edit", "0", "2", 0.4, 3)
    # A path from the metadata is opened only when given again (the model folder, the input).
    assert "pass INPUT with --from-metadata" in one_line(run("edit", "--from-metadata", edited, "-m", models["image"],
                                                             "-o", "again.png"))
    assert "pass --model" in one_line(run("edit", source, "--from-metadata", edited, "-o", "again.png"))
    assert run("edit", source, "--from-metadata", edited, "-m", models["image"], "-o", "again.png").exit_code == 0
    assert (tmp_path / "again.png").read_bytes() == edited.read_bytes()
    res = run("edit", source, "--to", "1", "--mask", mask, "--method", "resample", "-m", models["image"], "-o", "in.png")
    assert res.exit_code == 0, res.output
    out = np.asarray(Image.open("in.png"))
    assert np.array_equal(out[:32], np.asarray(Image.open(source))[:32])
    assert read_metadata("in.png")["mask_sha256"] is not None
    assert run("edit", source, "--mask", mask, "--from-metadata", "in.png", "-m", models["image"],
               "-o", "in2.png").exit_code == 0
    assert (tmp_path / "in2.png").read_bytes() == (tmp_path / "in.png").read_bytes()
    mask.rename(tmp_path / "moved.png")
    again = ("edit", source, "--from-metadata", "in.png", "-m", models["image"])
    assert "pass --mask FILE with --from-metadata" in one_line(run(*again, "-o", "x.png"))
    assert run(*again, "--mask", "moved.png", "-o", "x.png").exit_code == 0
    assert "sha256 differs" in one_line(run(*again, "--mask", source, "-o", "y.png"))
    assert "not made by starflow edit" in one_line(run("edit", "--from-metadata", source, "-o", "y.png"))
    assert "made by starflow edit: redo it with starflow edit" in one_line(run("generate", "--from-metadata", "in.png"))


def test_bad_edits_are_one_line_and_write_nothing(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run("generate", "0", "-m", models["image"], "-o", "src.png")
    Image.new("L", (10, 10), 255).save("small.png")
    Image.new("L", (64, 64), 0).save("black.png")
    Image.new("L", (64, 64), 255).save("white.png")
    image = ("edit", "src.png", "-m", models["image"], "-o", "out.png")
    assert "mask is 10x10" in one_line(run(*image, "--to", "1", "--mask", "small.png"))
    assert "no white pixels" in one_line(run(*image, "--to", "1", "--mask", "black.png"))
    assert "all white" in one_line(run(*image, "--to", "1", "--mask", "white.png"))
    assert "mask missing.png not found" in one_line(run(*image, "--to", "1", "--mask", "missing.png"))
    assert "--strength has no effect with --mask" in one_line(run(*image, "--to", "1", "--mask", "white.png",
                                                                  "--strength", 0.5))
    assert "give --from PROMPT" in one_line(run(*image, "--to", "1"))
    assert "--method is for inpainting" in one_line(run(*image, "--from", "0", "--to", "1", "--method", "replace"))
    assert "--strength must be from 0 to 1" in one_line(run(*image, "--from", "0", "--to", "1", "--strength", 2))
    assert "unknown class" in one_line(run(*image, "--from", "0", "--to", "7"))
    assert "--method must be replace or resample" in one_line(run(*image, "--to", "1", "--mask", "small.png",
                                                                "--method", "x"))
    assert not (tmp_path / "out.png").exists()


def test_video_to_video_and_clip_inpainting_write_mp4s(models, tmp_path, monkeypatch):
    from starflow_mlx.pipelines.video_io import read_metadata, read_video

    monkeypatch.chdir(tmp_path)
    run("generate", "3 moving right", "-m", models["video"], "-o", "src.mp4")
    res = run("edit", "src.mp4", "--from", "3 moving right", "--to", "8 moving right", "-m", models["video"])
    assert res.exit_code == 0, res.output
    assert read_video("src-edit.mp4")[0].shape == read_video("src.mp4")[0].shape
    assert read_metadata("src-edit.mp4")["prompt"] == "8 moving right"
    frame = read_video("src.mp4")[0].shape[1:3]
    Image.new("L", frame[::-1], 255).save("all.png")
    res = run("edit", "src.mp4", "--to", "8 moving right", "--mask", "all.png", "--mask-frames", "1-2",
              "-m", models["video"], "-o", "in.mp4")
    assert res.exit_code == 0, res.output
    assert read_metadata("in.mp4")["mask_frames"] == [1, 2]
    assert "--mask-frames is for an .mp4" in one_line(run("edit", "all.png", "--to", "1", "--mask", "all.png",
                                                          "--mask-frames", "0", "-m", models["image"]))
    assert "mask frame 7 is not among" in one_line(run("edit", "src.mp4", "--to", "8 moving right", "--mask",
                                                       "all.png", "--mask-frames", "7", "-m", models["video"],
                                                       "-o", "x.mp4"))


def test_a_noise_file_whose_latents_do_not_match_is_refused(tmp_path):
    import mlx.core as mx

    from starflow_mlx.pipelines.noise_file import FORMAT, VERSION, NoiseFileError, load_noise

    meta = {"format": FORMAT, "format_version": VERSION, "model": "demo", "model_fingerprint": "x", "prompt": "1",
            "cfg": "2.0", "aspect_ratio": "1:1", "fps": "0", "source": "/a.png", "source_sha256": "y"}
    mx.save_safetensors(str(tmp_path / "n.safetensors"), {"noise": mx.zeros((1, 4, 4, 4)),
                                                          "latents": mx.zeros((1, 4, 4, 3))}, metadata=meta)
    with pytest.raises(NoiseFileError, match="latents that do not match"):
        load_noise(tmp_path / "n.safetensors")
    mx.save_safetensors(str(tmp_path / "n.safetensors"), {"noise": mx.zeros((1, 4, 4, 4))},
                        metadata=dict(meta, cfg="nan"))
    with pytest.raises(NoiseFileError, match="cfg or fps"):
        load_noise(tmp_path / "n.safetensors")
