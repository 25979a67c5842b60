"""What a user finds after the tour: given frames kept, options that take effect, honest messages."""

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_cli import one_line

from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register

register(app)
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo_video():
    from starflow_mlx.pipelines.video import VideoPipeline

    return VideoPipeline.from_pretrained("demo-video")


def moving_digit(frames: int) -> np.ndarray:
    """A test clip of the demo's kind on its 12x12 canvas, uint8 RGB (T, 12, 12, 3)."""
    from starflow_mlx.training.data import load_digits_split
    from starflow_mlx.training.moving_digits import render_clip

    clip = render_clip(load_digits_split()[1].images[0, ..., 0], "right", frames, 12, 2, 2)[..., 0]
    return np.repeat(np.round((clip + 1) * 127.5).astype(np.uint8)[..., None], 3, axis=-1)


# -- a continued clip, or a starting image, comes back as given ---------------------------------
def test_a_continued_clip_keeps_its_frames_exactly_in_a_pixel_model(demo_video):
    given = moving_digit(3)
    out = demo_video.generate("3 moving right", frames=5, video=given, seed=1)[0]
    k = out.shape[1] // 12  # the written frames are the canvas enlarged k times
    assert out.shape[0] == 5
    np.testing.assert_array_equal(out[:3, ::k, ::k], given)


def test_a_starting_image_is_the_first_frame_exactly(demo_video):
    from PIL import Image

    given = moving_digit(1)[0]
    out = demo_video.generate("3 moving right", frames=3, image=Image.fromarray(given), seed=2)[0]
    k = out.shape[1] // 12
    np.testing.assert_array_equal(out[0, ::k, ::k], given)


def test_a_clip_continued_from_the_command_line_comes_back_up_to_h264(tmp_path):
    """Its frames went through H.264 twice (read, then written again): a few grey levels, not the sampler's 100+."""
    from starflow_mlx.pipelines.video_io import read_video

    clip, more = tmp_path / "seven.mp4", tmp_path / "more.mp4"
    assert cli("generate", "7 moving right", "--model", "demo-video", "-o", clip).exit_code == 0
    res = cli("generate", "7 moving right", "--model", "demo-video", "--video", clip, "--frames", 8, "-o", more)
    assert res.exit_code == 0, res.output
    given, out = read_video(clip)[0], read_video(more)[0]
    assert out.shape[0] == 8

    def canvas(frames):  # what the model reads: each 11x11 block of the 132x132 frame averaged
        return frames.reshape(len(frames), 12, 11, 12, 11, 3).mean(axis=(2, 4))

    difference = np.abs(canvas(out[:5]) - canvas(given))
    assert difference.mean() < 1 and difference.max() < 10, (difference.mean(), difference.max())  # sampled: 3.5, 30


def test_a_latent_model_returns_the_clean_latents_of_the_given_frames(tmp_path):
    """Through the VAE: the sample's first latent frames are the clip's encoding, without the training noise."""
    from fixtures_video import make_video_model
    from starflow_mlx.pipelines.video import VideoPipeline

    pipe = VideoPipeline.from_pretrained(make_video_model(tmp_path))
    height, width = pipe.size("16:9")
    clip = np.random.default_rng(0).integers(0, 256, (5, height, width, 3), dtype=np.uint8)
    x = pipe.sample("a cat", frames=9, video=clip, seed=0, num_videos=2)
    clean = np.array(pipe.encode(clip[None]))
    assert clean.shape[1] == 2
    for video in np.array(x):
        np.testing.assert_allclose(video[:2], clean[0], atol=1e-6)


# -- a --jacobi-* option asks for Jacobi; a sequential run records no Jacobi settings -----------
JACOBI_KEYS = ("jacobi_block_size", "jacobi_threshold", "jacobi_max_iter")


@pytest.mark.parametrize("option, value", [("--jacobi-block-size", 8), ("--jacobi-threshold", 0.01),
                                           ("--jacobi-max-iter", 4)])
def test_a_jacobi_setting_selects_jacobi_and_is_recorded(tmp_path, option, value):
    from starflow_mlx.pipelines.image_files import read_metadata

    res = cli("generate", "7", "--model", "demo", option, value, "-o", tmp_path / "j.png")
    assert res.exit_code == 0, res.output
    meta = read_metadata(tmp_path / "j.png")
    assert meta["jacobi"] is True and meta[option[2:].replace("-", "_")] == value
    assert all(meta[key] is not None for key in JACOBI_KEYS)  # the settings Jacobi ran with, defaults included


def test_a_sequential_image_records_no_jacobi_settings_and_is_made_again(tmp_path):
    from starflow_mlx.pipelines.image_files import read_metadata

    res = cli("generate", "7", "--model", "demo", "--no-jacobi", "-o", tmp_path / "s.png")
    assert res.exit_code == 0, res.output
    meta = read_metadata(tmp_path / "s.png")
    assert meta["jacobi"] is False and not any(key in meta for key in JACOBI_KEYS)
    res = cli("generate", "--model", "demo", "--from-metadata", tmp_path / "s.png", "-o", tmp_path / "again.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "s.png").read_bytes()


def test_a_video_jacobi_setting_selects_jacobi_and_is_recorded(tmp_path):
    from starflow_mlx.pipelines.video_io import read_metadata

    res = cli("generate", "2 moving down", "--model", "demo-video", "--jacobi-block-size", 8, "-o", tmp_path / "j.mp4")
    assert res.exit_code == 0, res.output
    meta = read_metadata(tmp_path / "j.mp4")
    assert meta["jacobi"] is True and meta["jacobi_block_size"] == 8 and meta["jacobi_threshold"] == 0.001
    res = cli("generate", "2 moving down", "--model", "demo-video", "--no-jacobi", "-o", tmp_path / "s.mp4")
    assert res.exit_code == 0, res.output
    meta = read_metadata(tmp_path / "s.mp4")
    assert meta["jacobi"] is False and not any(key in meta for key in JACOBI_KEYS)


@pytest.mark.parametrize("model, out", [("demo", "x.png"), ("demo-video", "x.mp4")])
def test_a_jacobi_setting_with_no_jacobi_is_one_error_line(tmp_path, model, out):
    res = cli("generate", "7" if model == "demo" else "7 moving up", "--model", model, "--no-jacobi",
              "--jacobi-threshold", 0.01, "-o", tmp_path / out)
    line = one_line(res)
    assert "--jacobi-threshold" in line and "--no-jacobi" in line and not (tmp_path / out).exists()


def test_the_python_api_takes_a_jacobi_setting_as_asking_for_jacobi():
    from starflow_mlx.pipelines.image import Pipeline

    pipe = Pipeline.from_pretrained("demo")
    implied = np.array(pipe.sample("3", seed=4, jacobi_block_size=8))
    np.testing.assert_array_equal(implied, np.array(pipe.sample("3", seed=4, jacobi=True, jacobi_block_size=8)))
    assert not np.array_equal(implied, np.array(pipe.sample("3", seed=4, jacobi=False)))
    with pytest.raises(ValueError, match="jacobi_block_size is for Jacobi sampling"):
        pipe.sample("3", jacobi=False, jacobi_block_size=8)


# -- the built-in video model is named wherever the built-in image model is ---------------------
def test_an_unknown_model_error_names_both_built_in_models(tmp_path):
    line = one_line(cli("generate", "7", "--model", "no-such-model", "-o", tmp_path / "x.png"))
    assert "'demo'" in line and "'demo-video'" in line


@pytest.mark.parametrize("command", [["generate"], ["score", "x.png"], ["serve"], ["quantize"], ["export-coreml"]])
def test_help_names_demo_video_beside_demo(command):
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and "'demo-video'" in res.output, res.output


def test_a_folder_without_a_manifest_suggests_both_built_in_models(tmp_path):
    from starflow_mlx.io.model_folder import Manifest

    with pytest.raises(ValueError, match="'demo' or 'demo-video'"):
        Manifest.load(tmp_path)


# -- small sizes never read as 0 MB ---------------------------------------------------------------
def test_byte_sizes_keep_small_sizes_visible():
    from starflow_mlx.byte_sizes import describe_bytes

    assert describe_bytes(300) == "300 bytes" and describe_bytes(150_000) == "146 KB"
    assert describe_bytes(3 * 2**20 + 2**19) == "3.50 MB" and describe_bytes(5 * 2**30) == "5.00 GB"


def test_a_config_larger_than_a_tiny_checkpoint_names_both_sizes(tmp_path):
    """A checkpoint of one tensor against a small model's config: the message gave 'at least 0 MB'."""
    import torch
    import yaml

    from fixtures_cli import ARGS

    torch.save({"blocks.0.proj_in.weight": torch.zeros(4, 4)}, tmp_path / "c.pth")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    line = one_line(cli("convert", tmp_path / "c.pth", "-c", tmp_path / "c.yaml", "-o", tmp_path / "out"))
    assert "do not belong together" in line and " 0 MB" not in line and "KB" in line, line


def test_the_files_past_the_first_three_are_counted_in_plain_words(tmp_path):
    res = cli("generate", "3", "--model", "demo", "-n", 4, "--output-dir", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert f"wrote 1 more file in {tmp_path / 'out'} (4 in all)" in res.output.splitlines()
    res = cli("generate", "3", "--model", "demo", "-n", 5, "--output-dir", tmp_path / "five")
    assert f"wrote 2 more files in {tmp_path / 'five'} (5 in all)" in res.output.splitlines()


# -- video sizes are the written ones; several videos in one file say so ------------------------
def test_a_video_is_reported_at_its_written_size_and_a_grid_says_so(tmp_path):
    from starflow_mlx.pipelines.video_io import read_video

    res = cli("generate", "7 moving right", "--model", "demo-video", "-o", tmp_path / "one.mp4")
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'one.mp4'} (5 frames of 132x132 at 16 fps)" in res.output.splitlines()
    res = cli("generate", "7 moving right", "--model", "demo-video", "-n", 2, "-o", tmp_path / "two.mp4")
    assert res.exit_code == 0, res.output
    frames, _ = read_video(tmp_path / "two.mp4")
    assert frames.shape[1:3] == (132, 266)
    line = next(line for line in res.output.splitlines() if line.startswith("wrote"))
    assert "2 videos side by side in one 266x132 grid" in line and "--output-dir" in line


def test_the_server_lists_a_pixel_video_models_written_size(demo_video):
    from starflow_mlx.server.request_types import aspect_ratio, image_sizes

    assert list(image_sizes(demo_video)) == ["132x132"] and aspect_ratio(demo_video, "132x132") == "1:1"
    assert demo_video.size("1:1") == (12, 12) and demo_video.frame_size("1:1") == (132, 132)


# -- the model's own enlarged frames are read back without a resize warning ---------------------
def test_the_models_own_clip_and_frames_are_read_back_quietly(tmp_path):
    from PIL import Image

    from starflow_mlx.pipelines.video_io import read_video

    clip = tmp_path / "seven.mp4"
    assert cli("generate", "7 moving right", "--model", "demo-video", "-o", clip).exit_code == 0
    Image.fromarray(read_video(clip)[0][0]).save(tmp_path / "first.png")
    runs = [cli("score", clip, "--prompt", "7 moving right", "--model", "demo-video"),
            cli("generate", "7 moving right", "--model", "demo-video", "--video", clip, "--frames", 7,
                "-o", tmp_path / "more.mp4"),
            cli("generate", "7 moving right", "--model", "demo-video", "--image", tmp_path / "first.png",
                "-o", tmp_path / "from-image.mp4")]
    for res in runs:
        assert res.exit_code == 0 and "warning" not in res.output, res.output
    Image.fromarray(read_video(clip)[0][0]).resize((100, 100)).save(tmp_path / "other.png")
    res = cli("generate", "7 moving right", "--model", "demo-video", "--image", tmp_path / "other.png",
              "-o", tmp_path / "other.mp4")
    assert res.exit_code == 0 and "warning: the image is 100x100: resized to cover 12x12" in res.output


# -- each README bash block makes the files it reads ---------------------------------------------
# Inputs a block may take from elsewhere: the reader's own files, or a Python block's (bash and Python run apart).
OUTSIDE_INPUTS = {"fox.jpg": "the reader's own picture", "fox.png": "the reader's own picture",
                  "three.png": "written by the Python block just above"}


def block_inputs_and_outputs(block: str) -> tuple[list[str], set[str], list[str]]:
    """Files a README block reads (in order), files it writes, and folders it writes into."""
    import re
    import shlex

    from starflow_mlx.apps.job_files import file_stem

    reads, writes, folders = [], set(), []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        words = shlex.split(line, comments=True)
        for command in " ".join(shlex.quote(w) for w in words).split(" '&&' ") if words else []:
            argv = shlex.split(command)
            if len(argv) < 2 or not argv[0].endswith("starflow"):
                continue
            options = dict(zip(argv, argv[1:]))
            if argv[1] == "score":
                reads.append(argv[2])
            reads += [options[flag] for flag in ("--image", "--video", "--from-metadata") if flag in options]
            out = options.get("-o") or options.get("--output")
            if out:
                writes.add(out)
            elif "--output-dir" in options:
                folders.append(options["--output-dir"])
            elif argv[1] == "generate" and not argv[2].startswith("-"):
                suffix = ".mp4" if "demo-video" in argv else ".png"
                writes.add(file_stem(argv[2], int(options.get("--seed", 0))) + suffix)
    return reads, writes, folders


def test_every_readme_block_makes_the_files_it_reads():
    """The README's and docs' bash blocks each make what they read, so a reader can start at any block."""
    import re

    from test_docs import PAGES

    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            reads, writes, folders = block_inputs_and_outputs(block)
            for name in reads:
                made = name in writes or any(name.startswith(folder) for folder in folders) or name in OUTSIDE_INPUTS
                assert made, f"a block of {page.name} reads {name} without making it:\n{block}"


# -- a first image that builds kernels is named while it runs, off a terminal -------------------
def test_a_stage_gets_a_line_within_seconds_when_not_on_a_terminal(monkeypatch):
    import io
    import time

    from rich.console import Console

    from starflow_mlx import progress as progress_module
    from starflow_mlx.progress import StageProgress

    monkeypatch.setattr(progress_module, "LOG_FIRST", 0.1)  # 5 s in use: scaled down, as LOG_EVERY's test does
    out = io.StringIO()
    with StageProgress(Console(file=out, width=200), live=False) as stages:
        stages("block 2 (deep)", 0, 64)
        time.sleep(0.6)  # building kernels: no report meanwhile, and far less than LOG_EVERY (30 s)
        stages("block 2 (deep)", 64, 64)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("block 2 (deep): 0/64, ") and lines[0].endswith("s so far"), lines
    assert len(lines) == 2 and lines[1].startswith("block 2 (deep): 64/64 in "), lines  # once, not every beat


# -- the video benchmark prints the rows README.md's table shows --------------------------------
def test_the_video_benchmarks_row_labels_are_the_readmes():
    from pathlib import Path

    from starflow_mlx.benchmarks.video_demo import JACOBI_LABELS, row_labels

    readme = (Path(__file__).resolve().parents[1] / "docs" / "video.md").read_text()
    # The README's run: --per-class 5, the default 3 given frames, demo-video's 5-frame window.
    for label in [*row_labels(5, 3, 5).values(), *JACOBI_LABELS.values()]:
        assert f"\n| {label} |" in readme, label


# -- time estimates: seconds when short -------------------------------------------------------------
@pytest.mark.parametrize("seconds, words", [(0.4, "a few seconds"), (20, "about 20 s"), (63, "about 65 s"),
                                            (170, "about 3 min"), (4000, "about 67 min"), (40680, "about 11.3 h")])
def test_estimates_are_in_seconds_when_short(seconds, words):
    from starflow_mlx.progress import about

    assert about(seconds) == words


# -- quantized layers on a CPU: many rows go through the BLAS ---------------------------------------
def quantized_layer(bits):
    import mlx.nn as nn

    from starflow_mlx.models.quantized_linear import use_row_aware_layers

    model = nn.Sequential(nn.Linear(64, 192).to_quantized(group_size=64, bits=bits))
    use_row_aware_layers(model)
    return model.layers[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_layer_gives_mlxs_result_for_few_and_many_rows(bits):
    import mlx.core as mx
    import mlx.nn as nn

    layer = quantized_layer(bits)
    for rows in (2, 64):
        x = mx.random.normal((rows, 64), key=mx.random.key(rows))
        np.testing.assert_allclose(np.array(layer(x)), np.array(nn.QuantizedLinear.__call__(layer, x)), atol=2e-5)


def test_many_rows_on_a_cpu_skip_mlxs_quantized_kernel(monkeypatch):
    import mlx.core as mx
    import mlx.nn as nn

    from starflow_mlx.models.quantized_linear import DEQUANTIZE_ROWS

    layer = quantized_layer(8)
    calls = []
    original = nn.QuantizedLinear.__call__
    monkeypatch.setattr(nn.QuantizedLinear, "__call__", lambda self, x: calls.append(x.shape) or original(self, x))
    layer(mx.zeros((2, DEQUANTIZE_ROWS[8] // 2, 64)))  # 16 rows (8 images with guidance): past MLX's fast range
    assert calls == [] and mx.default_device().type == mx.DeviceType.cpu
    layer(mx.zeros((2, 64)))  # a sequential step's two rows keep MLX's kernel
    assert calls == [(2, 64)]


def test_a_loaded_quantized_model_uses_the_row_aware_layer(tmp_path):
    from starflow_mlx.io.loading import load_flow
    from starflow_mlx.models.quantized_linear import QuantizedLinear
    from starflow_mlx.quantize.quantize_folder import quantize_model_folder

    quantize_model_folder("demo", tmp_path / "q8", 8)
    layers = [m for _, m in load_flow(tmp_path / "q8").named_modules() if "Quantized" in type(m).__name__]
    assert layers and all(type(m) is QuantizedLinear for m in layers)
