"""Hostile video and image files, and the files written (issue 28): memory bounded by pixels, not bytes;
temporary files cleaned up on signals and swept after SIGKILL; no output replaced without --overwrite;
paths named by a file's metadata never opened unless given again."""

import os
import struct
import subprocess
import sys
from fractions import Fraction
from io import BytesIO

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fixtures_cli import one_line
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.image_input import ImageInputError, open_image
from starflow_mlx.pipelines.video_io import MAX_VIDEO_PIXELS, read_video

av = pytest.importorskip("av")
register(app)
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def encode_black(path, side: int, count: int) -> None:
    """``count`` black ``side`` x ``side`` frames at the highest compression: kilobytes on disk."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(16), options={"preset": "ultrafast", "crf": "51"})
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        picture = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
        for t in range(count):
            picture.pts, picture.time_base = t, Fraction(1, 16)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def huge_clip(tmp_path_factory):
    """About 50 KB of H.264 holding 20 frames of 4096x4096: 335 megapixels, 1 GB as RGB."""
    path = tmp_path_factory.mktemp("clips") / "huge.mp4"
    encode_black(path, 4096, 20)
    assert path.stat().st_size < 200_000 and 20 * 4096 * 4096 > MAX_VIDEO_PIXELS
    return path


def capped(code: str, *args, cap_mb: int = 900):
    """Run ``code`` in a child capped at ``cap_mb`` of address space: (exit code, output)."""
    prefix = f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap_mb} << 20, {cap_mb} << 20))\n"
    res = subprocess.run([sys.executable, "-c", prefix + code, *map(str, args)], capture_output=True, text=True,
                         timeout=120)
    return res.returncode, res.stdout + res.stderr


READ = ("from starflow_mlx.pipelines.video_io import read_video\n"
        "try:\n    print(read_video(sys.argv[1], frames=int(sys.argv[2]) or None)[0].shape)\n"
        "except ValueError as exc:\n    print('refused:', exc)\n")


def test_a_tiny_clip_of_huge_frames_is_refused_from_its_header_within_a_memory_cap(huge_clip):
    code, out = capped(READ, huge_clip, 0)
    assert code == 0 and out.startswith("refused:") and "20 frames of 4096x4096" in out and "megapixels" in out, out


def test_only_the_frames_used_are_decoded(huge_clip):
    code, out = capped(READ, huge_clip, 2)  # 2 frames: 200 MB with the stacked copy; all 20 would be 2 GB
    assert code == 0 and out.strip() == "(2, 4096, 4096, 3)", out


def test_score_refuses_the_huge_clip_in_one_line_before_the_model(huge_clip, monkeypatch):
    from starflow_mlx.pipelines.image import Pipeline

    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model first"))
    assert "megapixels" in one_line(cli("score", huge_clip, "-p", "7 moving right", "-m", "demo-video"))


def ico_with(picture: bytes) -> bytes:
    """An ICO whose directory says 256x256 and whose one entry is ``picture`` (a PNG or a bitmap)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(picture), 6 + 16)
    return header + entry + picture


def test_an_icon_holding_a_huge_png_is_refused_before_decoding(tmp_path):
    png = BytesIO()
    Image.new("L", (9000, 9000)).save(png, format="PNG")  # 81 megapixels: PIL itself only warns
    path = tmp_path / "bomb.ico"
    path.write_bytes(ico_with(png.getvalue()))
    with pytest.raises(ImageInputError, match="declares 9000x9000 pixels"):
        open_image(path)
    bitmap = struct.pack("<IiiHHIIiiII", 40, 9000, 18000, 1, 32, 0, 0, 0, 0, 0, 0)  # a header, no pixels
    (tmp_path / "dib.ico").write_bytes(ico_with(bitmap))
    with pytest.raises(ImageInputError, match="declares 9000x9000 pixels"):
        open_image(tmp_path / "dib.ico")


def test_a_small_icon_still_opens(tmp_path):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "ok.ico")
    assert open_image(tmp_path / "ok.ico").size == (32, 32)


def test_formats_whose_header_does_not_bound_decoding_are_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.tga")
    with pytest.raises(ImageInputError, match="not a PNG, JPEG"):
        open_image(tmp_path / "x.tga")


def test_exif_orientation_turns_a_phone_photo_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (0, 0, 0)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert open_image(tmp_path / "phone.jpg").size == (20, 40)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_fifos_are_not_regular_files_and_are_never_opened(fifo, tmp_path):
    with pytest.raises(ImageInputError, match="not a regular file"):
        open_image(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_video(fifo)
    mp4 = tmp_path / "pipe.mp4"
    os.mkfifo(mp4)
    assert "not a regular file" in one_line(cli("score", mp4, "-p", "7", "-m", "demo-video"))
    assert "not a regular file" in one_line(cli("score", fifo, "-p", "7", "-m", "demo"))
    assert "not found" in one_line(cli("score", tmp_path / "absent.mp4", "-p", "7", "-m", "demo-video"))


def test_pyav_errors_are_one_clear_line(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"\x00" * 64)
    line = one_line(cli("score", path, "-p", "7", "-m", "demo-video"))
    assert line == f"error: cannot read {path} as a video: Invalid data found when processing input"
