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
from starflow_mlx.io.image_input import ImageInputError, open_image
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
    for name in ("pipe.mp4", "pipe"):
        line = one_line(cli("generate", "--from-metadata", tmp_path / name, "-o", tmp_path / "x.png"))
        assert "not a regular file" in line


def test_pyav_errors_are_one_clear_line(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"\x00" * 64)
    line = one_line(cli("score", path, "-p", "7", "-m", "demo-video"))
    assert line == f"error: cannot read {path} as a video: Invalid data found when processing input"


# -- no clobbering ---------------------------------------------------------------------------
def failed(res) -> str:
    """The ``error:`` line that ends a failed run (progress lines may come before it)."""
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and lines[-1].startswith("error:") and sum("error" in ln for ln in lines) == 1, res.output
    return lines[-1]


def beaten_to_it(monkeypatch, cls, method, out):
    """Make ``cls.method`` (the sampler) write ``out`` first, as a second command on the same name would."""
    real = getattr(cls, method)

    def racing(self, *args, **kwargs):
        out.write_bytes(b"the other command's file")
        yield from real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, racing)


def test_a_file_that_appears_while_generating_is_never_replaced(tmp_path, monkeypatch):
    from starflow_mlx.pipelines.image import Pipeline

    out = tmp_path / "same.png"
    beaten_to_it(monkeypatch, Pipeline, "generate_batches", out)
    line = failed(cli("generate", "7", "-m", "demo", "-o", out))
    assert "appeared while this command ran" in line and "--overwrite" in line
    assert out.read_bytes() == b"the other command's file" and os.listdir(tmp_path) == ["same.png"]
    assert cli("generate", "7", "-m", "demo", "-o", out, "--overwrite").exit_code == 0
    assert Image.open(out).format == "PNG"


def test_an_mp4_that_appears_while_generating_is_never_replaced(tmp_path, monkeypatch):
    from starflow_mlx.pipelines.video import VideoPipeline

    out = tmp_path / "same.mp4"
    beaten_to_it(monkeypatch, VideoPipeline, "stream", out)
    assert "appeared while this command ran" in failed(cli("generate", "7 moving right", "-m", "demo-video",
                                                           "-o", out))
    assert out.read_bytes() == b"the other command's file" and os.listdir(tmp_path) == ["same.mp4"]


def test_a_folder_job_publishes_all_its_files_or_none(tmp_path):
    from starflow_mlx.pipelines.image_files import save_images
    from starflow_mlx.io.staged_files import OutputExistsError

    (tmp_path / "b.png").write_bytes(b"kept")
    with pytest.raises(OutputExistsError):
        save_images([(Image.new("L", (4, 4)), tmp_path / name, {}) for name in ("a.png", "b.png", "c.png")])
    assert os.listdir(tmp_path) == ["b.png"] and (tmp_path / "b.png").read_bytes() == b"kept"


# -- signals and leftovers -------------------------------------------------------------------
STARFLOW = "from starflow_mlx.apps.cli import main; main()"
# The staged-write path of the command without its model: the CLI's signal handling, then an mp4 that is
# written frame by frame until a signal comes.
WRITER = """
import sys, time
import numpy as np
from starflow_mlx.io.termination import describe, install
from starflow_mlx.pipelines.video_io import write_videos
install()

def frames():
    yield np.zeros((1, 1, 16, 16, 3), np.uint8)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
        yield np.zeros((1, 1, 16, 16, 3), np.uint8)

try:
    write_videos(frames(), [(sys.argv[1], {}, 0)], 16)
except KeyboardInterrupt as exc:
    text, status = describe(exc)
    print("error: " + text, file=sys.stderr)
    sys.exit(status)
"""


def wait_for_staging(proc, folder):
    import time

    deadline = time.monotonic() + 120
    while not any(".starflow-tmp-" in name for name in os.listdir(folder)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)


def start_writer(out):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready", proc.communicate()
    wait_for_staging(proc, out.parent)
    return proc


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signals_remove_the_staged_mp4(tmp_path, signum):
    import signal

    proc = start_writer(tmp_path / "long.mp4")
    proc.send_signal(getattr(signal, signum))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, signum), err
    assert err.strip() == ("error: interrupted" if signum == "SIGINT" else f"error: terminated by {signum}")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_sigterm_stops_generate_and_removes_its_staged_mp4(tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-c", STARFLOW, "generate", "7 moving right", "-m", "demo-video",
                             "--frames", "400", "-o", str(tmp_path / "long.mp4")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_staging(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "error: terminated by SIGTERM", err
    assert os.listdir(tmp_path) == []


def test_a_killed_writers_leftover_is_swept_by_the_next_write(tmp_path):
    import signal

    from starflow_mlx.pipelines.video_io import write_mp4

    proc = start_writer(tmp_path / "long.mp4")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    leftover = os.listdir(tmp_path)
    assert len(leftover) == 1 and f"-{proc.pid}-" in leftover[0]
    mine = tmp_path / f".x.mp4.starflow-tmp-{leftover[0].split('-tmp-')[1][:8]}-{os.getpid()}-abc.mp4"
    mine.write_bytes(b"a live writer's")  # this process is alive: kept
    (tmp_path / ".notes.starflow-tmp").write_bytes(b"not ours")
    write_mp4(tmp_path / "next.mp4", np.zeros((1, 16, 16, 3), np.uint8), 16)
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, ".notes.starflow-tmp", "next.mp4"])


# -- paths named by metadata -----------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A demo image and a demo-video clip, and a local 'secret' a crafted file's metadata could point at."""
    folder = tmp_path_factory.mktemp("made")
    assert cli("generate", "7", "-m", "demo", "-o", folder / "seven.png").exit_code == 0
    assert cli("generate", "7 moving right", "-m", "demo-video", "-o", folder / "seven.mp4").exit_code == 0
    (folder / "secret").write_bytes(b"not for a stranger's file to read")
    return folder


def crafted(made, tmp_path, name, **changes):
    """``name`` from ``made`` with its pixels, its metadata changed by ``changes``."""
    from starflow_mlx.pipelines import image_files, video_io

    out = tmp_path / name
    if name.endswith(".png"):
        meta = image_files.read_metadata(made / name)
        image_files.save_images([(Image.open(made / name), out, {**meta, **changes})])
    else:
        frames, _ = video_io.read_video(made / name)
        video_io.write_mp4(out, frames, 16, {**video_io.read_metadata(made / name), **changes})
    return out


@pytest.fixture
def nothing_loaded(monkeypatch):
    from starflow_mlx.pipelines import video_io
    from starflow_mlx.pipelines.image import Pipeline

    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(video_io, "file_sha256", lambda *a, **k: pytest.fail("read a file the metadata named"))


@pytest.mark.parametrize("name, field, option, what", [
    ("seven.png", "model", "--model", "model folder"),
    ("seven.png", "lora", "--lora", "LoRA adapter"),
    ("seven.mp4", "model", "--model", "model folder"),
    ("seven.mp4", "image", "--image", "first frame (image)"),
    ("seven.mp4", "video", "--video", "clip (video)"),
])
def test_a_path_named_by_metadata_is_not_opened_unless_given_again(made, tmp_path, nothing_loaded, name, field,
                                                                   option, what):
    secret = made / ("secret" if field in ("image", "video") else "")
    path = crafted(made, tmp_path, name, **{field: str(secret)})
    line = one_line(cli("generate", "--from-metadata", path, "-o", tmp_path / ("again" + path.suffix)))
    assert f"names the {what} {secret}" in line and f"pass {option} {secret}" in line


def test_an_input_the_file_was_made_without_is_refused(made, tmp_path, nothing_loaded):
    line = one_line(cli("generate", "--from-metadata", made / "seven.mp4", "--image", made / "seven.png",
                        "-o", tmp_path / "again.mp4"))
    assert line == f"error: {made / 'seven.mp4'} was made without --image: drop --image to make it again"
    line = one_line(cli("generate", "--from-metadata", made / "seven.png", "--lora", made, "-o", tmp_path / "a.png"))
    assert "was made without --lora" in line


def test_a_model_folder_given_again_is_used(made, tmp_path):
    import shutil

    from starflow_mlx.io.model_folder import BUILT_IN

    shutil.copytree(BUILT_IN["demo"], tmp_path / "mine")
    path = crafted(made, tmp_path, "seven.png", model=str(tmp_path / "mine"))
    res = cli("generate", "--from-metadata", path, "--model", tmp_path / "mine", "-o", tmp_path / "again.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.png").read_bytes() == path.read_bytes()
