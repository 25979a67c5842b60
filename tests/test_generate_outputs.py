"""`starflow generate` on the demo model: whole-job checks, batches, file names, formats, no silent overwrite."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from starflow_mlx.apps import generate_cmd, job_files
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.pipelines.image_files import GUTTER, METADATA_KEY, read_metadata, save_images

register(app)
runner = CliRunner()
CAP = 3 << 30  # an address-space cap far below what a million-image job needs


def generate(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def capped_cli(cwd, *args):
    """The CLI in a subprocess under a small memory cap: a job larger than memory must be refused, not crash."""
    script = ("import resource, sys\n"
              f"resource.setrlimit(resource.RLIMIT_AS, ({CAP}, {CAP}))\n"
              "from starflow_mlx.apps.cli import main\n"
              "sys.argv = ['starflow', *sys.argv[1:]]\nmain()\n")
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_a_million_images_are_refused_in_one_line_not_a_crash(tmp_path):
    grid = capped_cli(tmp_path, "generate", "7", "--model", "demo", "-n", 1_000_000, "-o", "grid.png")
    batch = capped_cli(tmp_path, "generate", "7", "--model", "demo", "-n", 1_000_000, "--batch-size", 1_000_000,
                       "--output-dir", "out")
    for res, words in ((grid, "a grid of 1000000 images would be 64000x64000 pixels"),
                       (batch, "a batch of 1000000 images needs")):
        assert res.returncode == 1, res.stderr  # a segfault is -11 (139 from a shell)
        assert res.stderr.strip().splitlines() == [res.stderr.strip()] and words in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []
    one = capped_cli(tmp_path, "generate", "7", "--model", "demo", "--batch-size", 1_000_000, "-o", "one.png")
    assert one.returncode == 0, one.stderr  # the batch is the one image asked for
    assert read_metadata(tmp_path / "one.png")["batch_size"] == 1
    (tmp_path / "one.png").unlink()
    ok = capped_cli(tmp_path, "generate", "7", "--model", "demo", "-n", 3, "--batch-size", 2, "--output-dir", "out")
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"7-seed0-00{i}.png" for i in range(3)]
    assert ok.stderr.count("block 2 (deep): 64/64 in") == 2  # two batches, each with its own block stages


def test_a_grid_larger_than_memory_is_refused_before_sampling(tmp_path, monkeypatch):
    # 1.05 GB: the demo model fits (1 GB of working memory + 2 MB), a grid of 7000 images (2 x 29 MB) does not.
    monkeypatch.setattr("starflow_mlx.io.memory.memory_limit", lambda: int(1.05 * 2**30))
    res = generate("7", "--model", "demo", "-n", 7000, "-o", tmp_path / "grid.png")
    assert res.exit_code == 1 and "a grid of 7000 images needs about" in res.output, res.output
    assert "--output-dir" in res.output and not list(tmp_path.iterdir())


def test_huge_num_images_in_metadata_regenerates_only_the_images_batch(tmp_path):
    res = generate("3", "--model", "demo", "-n", 6, "--batch-size", 2, "--seed", 5, "--output-dir", tmp_path / "out")
    assert res.exit_code == 0, res.output
    original = tmp_path / "out" / "3-seed5-004.png"
    assert read_metadata(original)["batch_size"] == 2
    meta = dict(read_metadata(original), num_images=10**12)  # image 4 of a trillion: its batch is images 4 and 5
    with Image.open(original) as img:
        save_images([(img.copy(), tmp_path / "huge.png", meta)])
    res = generate("--from-metadata", tmp_path / "huge.png", "-o", tmp_path / "again.png")
    assert res.exit_code == 0, res.output
    with Image.open(original) as a, Image.open(tmp_path / "again.png") as b:
        assert a.tobytes() == b.tobytes()
    grid = dict(meta, index=None)
    save_images([(Image.new("L", (8, 8)), tmp_path / "huge-grid.png", grid)])
    res = generate("--from-metadata", tmp_path / "huge-grid.png")
    assert res.exit_code == 1 and "a grid of 1000000000000 images would be" in res.output
    assert res.output.strip().count("\n") == 0


def test_outputs_larger_than_the_free_disk_are_refused_before_sampling(tmp_path, monkeypatch):
    class Usage:
        free = 10_000  # bytes: room for a couple of small PNGs

    monkeypatch.setattr(generate_cmd.shutil, "disk_usage", lambda path: Usage)
    monkeypatch.setattr("starflow_mlx.pipelines.image.Pipeline.generate_batches",
                        lambda *a, **k: pytest.fail("sampled before checking the disk"))
    res = generate("7", "--model", "demo", "-n", 50, "--output-dir", tmp_path / "out")
    assert res.exit_code == 1 and "the images need up to" in res.output and "is free" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_default_output_is_named_from_prompt_and_seed_and_never_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = generate("a film still of a cat playing piano!", "--model", "demo", "--seed", 3)
    assert first.exit_code == 1 and "unknown class" in first.output  # the demo draws digits; the name comes first
    for _ in range(2):
        res = generate("7", "--model", "demo", "--seed", 3)
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7-seed3-2.png", "7-seed3.png"]
    assert "wrote 7-seed3-2.png (7-seed3.png exists)" in res.output
    assert job_files.file_stem("A film still of a cat, playing piano!", 0) == "a-film-still-of-a-cat-playing-piano-seed0"


def test_output_dir_names_carry_prompt_seed_and_index_and_refuse_to_overwrite(tmp_path):
    out = tmp_path / "out"
    assert generate("7", "--model", "demo", "-n", 2, "--seed", 7, "--output-dir", out).exit_code == 0
    assert generate("3", "--model", "demo", "-n", 2, "--seed", 7, "--output-dir", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["3-seed7-000.png", "3-seed7-001.png",
                                                     "7-seed7-000.png", "7-seed7-001.png"]
    before = (out / "7-seed7-000.png").read_bytes()
    res = generate("7", "--model", "demo", "-n", 2, "--seed", 7, "--output-dir", out, "--cfg", 0)
    assert res.exit_code == 1 and "7-seed7-000.png already exists (2 of the files" in res.output
    assert "--overwrite" in res.output and (out / "7-seed7-000.png").read_bytes() == before
    res = generate("7", "--model", "demo", "-o", out / "7-seed7-000.png")
    assert res.exit_code == 1 and "already exists: pass --overwrite" in res.output
    res = generate("7", "--model", "demo", "-n", 2, "--seed", 7, "--output-dir", out, "--cfg", 0, "--overwrite")
    assert res.exit_code == 0 and (out / "7-seed7-000.png").read_bytes() != before


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_jpeg_and_webp_carry_metadata_and_regenerate(tmp_path, suffix):
    path = tmp_path / f"seven{suffix}"
    res = generate("7", "--model", "demo", "--seed", 4, "-o", path)
    assert res.exit_code == 0, res.output
    with Image.open(path) as img:
        assert img.format == {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix]
    assert read_metadata(path)["seed"] == 4
    res = generate("--from-metadata", path)
    assert res.exit_code == 0, res.output
    assert (tmp_path / f"seven-again{suffix}").read_bytes() == path.read_bytes()
    assert generate("7", "--model", "demo", "-o", tmp_path / "seven.gif").output.startswith(
        "error: " + str(tmp_path / "seven.gif") + ": the file name must end in .png, .jpg, .jpeg or .webp")


def test_grid_gutters_are_light(tmp_path):
    assert generate("1", "--model", "demo", "-n", 4, "-o", tmp_path / "grid.png").exit_code == 0
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (130, 130)  # 2x2 tiles of 64 with a 2-pixel gutter
        assert img.getpixel((64, 10)) == GUTTER and img.getpixel((10, 65)) == GUTTER
        assert json.loads(img.text[METADATA_KEY])["index"] is None


def test_score_warns_when_the_image_must_be_resized(tmp_path):
    assert generate("7", "--model", "demo", "-n", 4, "-o", tmp_path / "grid.png").exit_code == 0
    assert generate("7", "--model", "demo", "-o", tmp_path / "seven.png").exit_code == 0
    res = runner.invoke(app, ["score", str(tmp_path / "grid.png"), "--prompt", "7", "--model", "demo"])
    assert res.exit_code == 0 and "warning: the image is 130x130 but the model scores 64x64 images" in res.output
    res = runner.invoke(app, ["score", str(tmp_path / "seven.png"), "--prompt", "7", "--model", "demo"])
    assert res.exit_code == 0 and "warning" not in res.output and "bits/dim" in res.output


def test_stage_lines_when_not_on_a_terminal(tmp_path):
    res = generate("7", "--model", "demo", "-n", 2, "-o", tmp_path / "two.png")
    assert res.exit_code == 0, res.output
    for stage in ("text: 1/1 in", "block 2 (deep): 64/64 in", "block 1: 64/64 in", "block 0: 64/64 in",
                  "denoise: 1/1 in", "decode: 1/1 in", "images: 2/2 in"):
        assert stage in res.output, res.output
    assert "\x1b[" not in res.output  # no bar drawing codes in a log


def test_help_shows_flags_as_flags_and_version_exists():
    for command in ("generate", "quantize", "export-coreml", "coreml-video", "train", "convert", "bench", "score"):
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0 and "<bool>" not in res.output, (command, res.output)
    res = runner.invoke(app, ["--version"])
    from starflow_mlx import __version__

    assert res.exit_code == 0 and res.output.strip() == f"starflow-mlx {__version__}"


def test_override_matching_no_layer_is_refused(tmp_path):
    res = runner.invoke(app, ["quantize", "demo", "--override", "nomatch.*=4", "-o", str(tmp_path / "q")])
    assert res.exit_code == 1 and res.output.startswith("error: --override 'nomatch.*' matches no layer")
    assert res.output.strip().count("\n") == 0 and not (tmp_path / "q").exists()


def test_resumed_training_reports_the_steps_it_ran(tmp_path):
    small = ["--data", "digits", "--output", str(tmp_path / "m"), "--channels", "32", "--layers", "1 1",
             "--batch-size", "8", "--warmup", "1", "--checkpoint-every", "2"]
    assert runner.invoke(app, ["train", *small, "--steps", "2"]).exit_code == 0
    res = runner.invoke(app, ["train", *small, "--steps", "3", "--resume"])
    assert res.exit_code == 0, res.output
    assert re.search(r": 1 steps \(steps 3 to 3; \S+ min in all\) in", res.output), res.output
    assert os.path.isdir(tmp_path / "m")


def test_resume_makes_only_the_missing_images_and_the_same_bytes(tmp_path):
    job = ("3", "--model", "demo", "-n", 5, "--batch-size", 2, "--seed", 4, "--output-dir")
    assert generate(*job, tmp_path / "whole").exit_code == 0
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    # An interrupted run: batch 0 written, batch 1 cut short after its first file, batch 2 never reached,
    # and a half-written file where image 2 goes.
    part = tmp_path / "part"
    part.mkdir()
    for name in ("3-seed4-000.png", "3-seed4-001.png", "3-seed4-003.png"):
        (part / name).write_bytes(whole[name])
    (part / "3-seed4-002.png").write_bytes(whole["3-seed4-002.png"][:200])
    kept = {name: (part / name).stat().st_mtime_ns for name in ("3-seed4-000.png", "3-seed4-001.png")}
    refused = generate(*job, part)
    assert refused.exit_code == 1 and "--resume" in refused.output  # without the flag nothing is replaced
    damaged = generate(*job, part, "--resume")
    assert damaged.exit_code == 1 and "3-seed4-002.png exists but is not image 2 of this job" in damaged.output
    (part / "3-seed4-002.png").unlink()
    res = runner.invoke(app, ["generate", *map(str, job), str(part), "--resume"])
    assert res.exit_code == 0, res.output
    assert "kept 3 image(s)" in res.output and res.output.count("wrote ") == 2
    assert {p.name: p.read_bytes() for p in part.iterdir()} == whole  # the same pixels and metadata
    assert all((part / name).stat().st_mtime_ns == ns for name, ns in kept.items())  # batch 0 was not redone
    assert generate("3", "--model", "demo", "-o", tmp_path / "x.png", "--resume").exit_code == 1


@pytest.mark.parametrize("model, name", [("demo", "seven.png"), ("demo-video", "seven.mp4")])
def test_a_relative_model_folder_is_recorded_so_metadata_works_from_another_folder(tmp_path, monkeypatch, model,
                                                                                     name):
    import shutil

    from starflow_mlx.io.model_folder import BUILT_IN

    shutil.copytree(BUILT_IN[model], tmp_path / "models" / "mine")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    prompt = "7" if model == "demo" else "7 moving right"
    res = generate(prompt, "--model", "models/mine", "--seed", 3, "-o", f"out/{name}")
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path / "out")
    res = generate("--from-metadata", name)  # a folder named by metadata is used only when given again
    mine = tmp_path / "models" / "mine"
    assert res.exit_code == 1 and f"names the model folder {mine}: a path from a file's metadata" in res.output
    res = generate("--from-metadata", name, "--model", "../models/mine")
    assert res.exit_code == 0, res.output
    again = tmp_path / "out" / name.replace(".", "-again.")
    assert again.read_bytes() == (tmp_path / "out" / name).read_bytes()
