"""Video inpainting with a mask clip: one mask frame per input frame, from Python (an array) and the CLI (an .mp4)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_cli import one_line
from fixtures_inversion import make_class_video_folder
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register

register(app)
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def moving_hole(frames: int, side: int) -> np.ndarray:
    """A square hole that moves down the frame, a different region in every frame (and none in the last)."""
    hole = np.zeros((frames, side, side), bool)
    step = side // frames
    for t in range(frames - 1):
        hole[t, t * step: t * step + side // 3, side // 4: 3 * side // 4] = True
    return hole


def test_each_frame_keeps_its_own_known_region_exactly_on_the_demo_video():
    from starflow_mlx import load_pipeline

    pipe = load_pipeline("demo-video")
    source = pipe.generate("3 moving right", seed=2)[0]
    hole = moving_hole(len(source), source.shape[1])
    out = pipe.inpaint(source, hole, "8 moving right", rounds=1)
    assert out.shape == source.shape
    for t in range(len(source)):
        assert np.array_equal(out[t][~hole[t]], source[t][~hole[t]])  # every known pixel of this frame
    assert not np.array_equal(out[hole], source[hole])  # and the hole is new
    # uint8 masks are cut at mid-grey, RGB ones read by their luma: the same result as the bool mask
    grey = np.where(hole, 200, 60).astype(np.uint8)
    assert np.array_equal(pipe.inpaint(source, np.repeat(grey[..., None], 3, -1), "8 moving right", rounds=1), out)
    with pytest.raises(ValueError, match="mask_frames is for a mask image"):
        pipe.inpaint(source, hole, "8 moving right", mask_frames=[0])


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    return make_class_video_folder(tmp_path_factory.mktemp("mask-clip") / "video")


def test_a_mask_mp4_from_the_command_line_and_again_from_metadata(video_model, tmp_path, monkeypatch):
    from starflow_mlx.pipelines.video_io import read_metadata, read_video, write_mp4

    monkeypatch.chdir(tmp_path)
    assert run("generate", "3 moving right", "-m", video_model, "-o", "src.mp4").exit_code == 0
    source = read_video("src.mp4")[0]
    hole = moving_hole(len(source), source.shape[1])
    write_mp4("masks.mp4", np.repeat(np.where(hole, 255, 0).astype(np.uint8)[..., None], 3, -1), 16)
    res = run("edit", "src.mp4", "--to", "8 moving right", "--mask", "masks.mp4", "-m", video_model, "-o", "in.mp4")
    assert res.exit_code == 0, res.output
    meta = read_metadata("in.mp4")
    from starflow_mlx.pipelines.video_io import file_sha256

    assert meta["mask_sha256"] == file_sha256("masks.mp4") and meta["mask_frames"] is None
    # The same edit in Python with the mask clip as the CLI read it: the CLI wrote exactly that (up to H.264).
    from starflow_mlx import load_pipeline

    pipe = load_pipeline(video_model)
    made = pipe.inpaint(source, read_video("masks.mp4")[0], "8 moving right")
    assert np.abs(read_video("in.mp4")[0].astype(int) - made).mean() < 3
    assert run("edit", "src.mp4", "--mask", "masks.mp4", "--from-metadata", "in.mp4", "-m", video_model,
               "-o", "again.mp4").exit_code == 0
    assert np.array_equal(read_video("again.mp4")[0], read_video("in.mp4")[0])


def test_bad_mask_clips_are_one_line_and_write_nothing(video_model, tmp_path, monkeypatch):
    from starflow_mlx.pipelines.video_io import read_video, write_mp4

    monkeypatch.chdir(tmp_path)
    run("generate", "3 moving right", "-m", video_model, "-o", "src.mp4")
    frames, side = read_video("src.mp4")[0].shape[:2]
    hole = np.repeat(np.where(moving_hole(frames, side), 255, 0).astype(np.uint8)[..., None], 3, -1)
    write_mp4("short.mp4", hole[:-1], 16)
    write_mp4("small.mp4", hole[:, : side - 2, : side - 2], 16)
    write_mp4("empty.mp4", np.zeros_like(hole), 16)
    write_mp4("full.mp4", np.full_like(hole, 255), 16)
    write_mp4("ok.mp4", hole, 16)
    edit = ("edit", "src.mp4", "--to", "8 moving right", "-m", video_model, "-o", "out.mp4", "--mask")
    assert f"has {frames - 1} frames but the input has {frames} (both read at 16 fps)" in one_line(run(*edit,
                                                                                                   "short.mp4"))
    assert f"frames are {side - 2}x{side - 2} but the input's are {side}x{side}" in one_line(run(*edit, "small.mp4"))
    assert "no white pixels" in one_line(run(*edit, "empty.mp4"))
    assert "all white" in one_line(run(*edit, "full.mp4"))
    assert "--mask-frames is for a mask image" in one_line(run(*edit, "ok.mp4", "--mask-frames", "0"))
    assert "not found" in one_line(run(*edit, "missing.mp4"))
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 64)
    assert "junk.mp4" in one_line(run(*edit, "junk.mp4"))
    from PIL import Image

    Image.new("L", (64, 64)).save("digit.png")
    assert "a mask clip is for an .mp4 input" in one_line(run("edit", "digit.png", "--to", "1", "-m", "demo",
                                                              "--mask", "ok.mp4", "-o", "out.png"))
    assert not (tmp_path / "out.png").exists()
    assert not (tmp_path / "out.mp4").exists()
