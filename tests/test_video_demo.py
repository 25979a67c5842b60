"""Moving digits, pixel-space video models and the built-in demo-video: trained, generated, continued, judged."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_cli import one_line
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.pipelines.video import VideoPipeline
from starflow_mlx.pipelines.video_io import read_metadata, read_video
from starflow_mlx.training.data import load_digits_split
from starflow_mlx.training.moving_digits import DIRECTIONS, class_names, load_moving_digits_split, render_clip

pytest.importorskip("sklearn")
register(app)
runner = CliRunner()
TINY = ["--data", "moving-digits", "--image-size", "8", "--frames", "3", "--patch-size", "2", "--batch-size", "4",
        "--channels", "32", "--layers", "1 1", "--checkpoint-every", "0", "--warmup", "1"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_video_model(tmp_path_factory):
    """A moving-digits video model trained for 3 steps by `starflow train`: 8x8 canvas, 3-frame window."""
    out = tmp_path_factory.mktemp("video") / "model"
    res = cli("train", *TINY, "--steps", "3", "-o", out)
    assert res.exit_code == 0, res.output
    return out


def test_clips_move_one_pixel_a_frame_around_the_canvas():
    digit = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    clip = render_clip(digit, "down", 20, 12, row=3, col=5)[..., 0]
    assert clip.shape == (20, 12, 12)
    for t in range(1, 20):
        assert np.array_equal(clip[t], np.roll(clip[t - 1], 1, axis=0))
    assert np.array_equal(clip[12], clip[0])  # the canvas wraps: 12 frames go once round
    left = render_clip(digit, "left", 2, 12, 0, 0)[..., 0]
    assert np.array_equal(left[1], np.roll(left[0], -1, axis=1))


def test_the_split_follows_the_digits_and_names_every_prompt():
    train, test = load_moving_digits_split(frames=3, canvas=8)
    assert train.images.shape[1:] == (3, 8, 8, 1) and test.images.shape[1:] == (3, 8, 8, 1)
    digits_train, digits_test = load_digits_split()
    assert len(train) == 4 * 4 * len(digits_train) and len(test) == 4 * len(digits_test)  # 4 and 1 placements
    assert train.classes == class_names() and len(class_names()) == 40 and class_names()[29] == "7 moving left"
    assert set(np.unique(test.labels)) == set(range(40))
    assert "'<digit> moving <direction>'" in train.prompt_help


def test_a_label_is_one_one_hot_row_per_word():
    from starflow_mlx.jsonconfig import ConfigError
    from starflow_mlx.pipelines.prompts import class_features
    from starflow_mlx.training.moving_digits import WORDS

    table = class_features(class_names(), WORDS)
    assert table.shape == (41, 2, 15)  # 40 prompts and the empty one; a digit row and a direction row
    right, up = class_names().index("7 moving right"), class_names().index("7 moving up")
    assert np.array_equal(table[right, 0], table[up, 0]) and table[right, 0, 7] == 1  # the shared "7"
    assert table[up, 1, WORDS.index("up")] == 1 and (table[-1, :, -1] == 1).all()  # the empty words
    assert class_features(["a", "b"]).shape == (3, 1, 3)  # without words: upstream's one-hot label
    with pytest.raises(ConfigError, match="same number of words"):
        class_features(["7 moving right", "7 right up"], WORDS)


def test_image_steps_train_on_first_frames_alone(tmp_path):
    from starflow_mlx.training.trainer import TrainConfig, Trainer

    train, _ = load_moving_digits_split(frames=3, canvas=8)
    config = TrainConfig(steps=2, batch_size=4, channels=32, layers=[1, 1], patch_size=2, image_every=2, warmup=1,
                         checkpoint_every=0)
    trainer = Trainer(config, train, tmp_path / "ck")
    clips, labels, _ = trainer.batch(0)
    frames, frame_labels, _ = trainer.batch(1)
    assert clips.shape == (4, 3, 8, 8, 1) and labels.shape == (4, 2, 15)
    assert frames.shape == (12, 1, 8, 8, 1) and frame_labels.shape == (12, 2, 15)  # as many frames as the clips held
    losses = trainer.run()
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_trained_folder_is_a_pixel_space_class_video_model(tiny_video_model):
    manifest = json.loads((tiny_video_model / "starflow.json").read_text())
    config = json.loads((tiny_video_model / "config.json").read_text())
    assert manifest["kind"] == "class-to-video" and manifest["vae"] is None and manifest["text_encoder"] is None
    assert manifest["words"][:2] == ["0", "1"] and config["txt_size"] == 2 and config["txt_dim"] == 15
    assert config["num_frames"] == 3 and config["shallow_block_local"] and config["temporal_causal"] == 1
    assert manifest["source"]["frames"] == 3 and manifest["source"]["seconds"] >= 0  # a few tiny steps: 0.0 s


def test_generate_writes_an_mp4_with_the_frames_and_rate_asked(tiny_video_model, tmp_path):
    out = tmp_path / "seven.mp4"
    res = cli("generate", "7 moving right", "--model", tiny_video_model, "--fps", 8, "-o", out)
    assert res.exit_code == 0, res.output
    frames, fps = read_video(out)
    assert frames.shape == (3, 128, 128, 3) and fps == 8  # the training window, enlarged 16x from 8x8
    meta = read_metadata(out)
    assert meta["frames"] == 3 and meta["cfg"] == 2.0 and meta["aspect_ratio"] == "1:1"
    # Past the window (the deep block's window slides), any count: pixel space has no 1 + 4k rule.
    res = cli("generate", "7 moving right", "--model", tiny_video_model, "--frames", 6, "-o", tmp_path / "long.mp4")
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    assert read_video(tmp_path / "long.mp4")[0].shape[0] == 6


def test_image_and_clip_conditioning_start_from_the_given_frames(tiny_video_model, tmp_path):
    from PIL import Image

    digit = load_digits_split()[1].images[0, ..., 0]
    clip = render_clip(digit, "up", 2, 8, 2, 2)[..., 0]
    first = Image.fromarray(np.round((clip[0] + 1) * 127.5).astype(np.uint8)).resize((64, 64), Image.NEAREST)
    first.save(tmp_path / "first.png")
    res = cli("generate", "3 moving up", "--model", tiny_video_model, "--image", tmp_path / "first.png",
              "-o", tmp_path / "ti2v.mp4")
    assert res.exit_code == 0, res.output
    frames, _ = read_video(tmp_path / "ti2v.mp4")
    # The given frame comes back first (the 64x64 picture reduced by block averages, with the training noise
    # added and removed again, then enlarged): far closer to it than to a blank canvas.
    given = np.asarray(first)[::8, ::8].astype(int)
    error = np.abs(frames[0, ::16, ::16, 0].astype(int) - given).mean()
    assert error < 0.25 * np.abs(given - given.min()).mean(), error
    res = cli("generate", "3 moving up", "--model", tiny_video_model, "--video", tmp_path / "ti2v.mp4",
              "--frames", 5, "-o", tmp_path / "more.mp4")
    assert res.exit_code == 0, res.output
    more, _ = read_video(tmp_path / "more.mp4")
    known = frames.astype(int)
    assert more.shape[0] == 5 and np.abs(more[:3] - known).mean() < 0.25 * np.abs(known - known.min()).mean()


def test_python_api_samples_pixel_frames(tiny_video_model, tmp_path):
    import shutil

    # A copy whose data are pixels times 2, so the frames must undo a scale that is not 1.
    folder = tmp_path / "scaled"
    shutil.copytree(tiny_video_model, folder)
    manifest = json.loads((folder / "starflow.json").read_text())
    (folder / "starflow.json").write_text(json.dumps({**manifest, "pixel_scale": 2.0}))
    pipe = VideoPipeline.from_pretrained(folder)
    x = pipe.sample("0 moving down", frames=4, num_videos=2, seed=3)
    assert x.shape == (2, 4, 8, 8, 1)
    videos = pipe.generate("0 moving down", frames=4, num_videos=2, seed=3)
    assert len(videos) == 2 and videos[0].shape == (4, 128, 128, 3) and videos[0].dtype == np.uint8
    # The frames are the samples, computed here by hand: data / pixel_scale, clamped to [-1, 1], to 0..255 by
    # (v + 1) * 127.5 rounded, each pixel a 16x16 block (8 -> 128), the one gray channel copied to RGB.
    gray = np.round((np.clip(np.array(x, np.float64) / 2.0, -1, 1) + 1) * 127.5)
    expected = np.repeat(np.repeat(gray, 16, axis=2), 16, axis=3).repeat(3, axis=4)
    assert np.unique(gray).size > 10  # real content, not a constant frame
    for video, want in zip(videos, expected):
        # float32 against float64 rounding: a value on a .5 boundary may round either way, one grey level.
        assert np.abs(video.astype(int) - want).max() <= 1 and (video.astype(int) == want).mean() > 0.99


@pytest.mark.parametrize("prompt", ["7 moving sideways", "12 moving left", "a cat"])
def test_an_unknown_prompt_is_one_line_naming_the_valid_ones(tiny_video_model, tmp_path, prompt):
    res = cli("generate", prompt, "--model", tiny_video_model, "-o", tmp_path / "x.mp4")
    line = one_line(res)
    assert f"unknown class {prompt!r}" in line and "'<digit> moving <direction>'" in line
    assert all(way in line for way in DIRECTIONS) and not (tmp_path / "x.mp4").exists()


def test_vae_options_are_refused_for_a_pixel_model(tiny_video_model, tmp_path):
    line = one_line(cli("generate", "1 moving up", "--model", tiny_video_model, "--vae-tile", 4, "-o", tmp_path / "v.mp4"))
    assert "--vae-tile" in line and "no VAE" in line


def test_the_judge_recovers_real_clips():
    from starflow_mlx.benchmarks.video_demo import direction

    _, test = load_moving_digits_split(frames=5, canvas=12)
    names = list(DIRECTIONS)
    for clip, label in zip(test.images[:40], test.labels[:40]):
        way, speed = direction(clip[..., 0])
        assert way == names[int(label) % 4] and speed == pytest.approx(1.0, abs=1e-6)


def test_built_in_demo_video_makes_a_moving_digit(tmp_path):
    out = tmp_path / "seven.mp4"
    res = cli("generate", "7 moving right", "--model", "demo-video", "-o", out)
    assert res.exit_code == 0, res.output
    frames, fps = read_video(out)
    assert fps == 16 and frames.shape[0] == 5
    from starflow_mlx.benchmarks.video_demo import direction

    gray = frames[:, ::11, ::11, 0].astype(np.float32) / 127.5 - 1  # back to the 12x12 canvas
    assert direction(gray)[0] == "right"
