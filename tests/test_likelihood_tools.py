"""Likelihood as a tool: score many inputs, classify by likelihood (the built-in demo models)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.pipelines.load import load_pipeline
from starflow_mlx.training.data import load_digits_split
from test_generation_options import bomb_png

register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def demo():
    return load_pipeline("demo")


@pytest.fixture(scope="module")
def demo_video():
    return load_pipeline("demo-video")


@pytest.fixture(scope="module")
def digits():
    _, test = load_digits_split()
    return [Image.fromarray(((np.clip(a[..., 0], -1, 1) + 1) * 127.5).round().astype(np.uint8))
            for a in test.images[:10]], [int(v) for v in test.labels[:10]]


def to_clip(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 1) in [-1, 1] -> uint8 RGB frames."""
    return np.repeat(((np.clip(frames, -1, 1) + 1) * 127.5).round().astype(np.uint8), 3, axis=-1)


@pytest.fixture(scope="module")
def clips():
    from starflow_mlx.training.moving_digits import load_moving_digits_split

    _, test = load_moving_digits_split()
    return [to_clip(test.images[i]) for i in range(3)], [test.classes[test.labels[i]] for i in range(3)]


def test_batched_scores_equal_one_at_a_time(demo, digits):
    images, _ = digits
    rows = demo.score_many(images, "3", batch_size=4)
    alone = [demo.score(image, "3") for image in images]
    assert [r.error for r in rows] == [None] * len(images)
    np.testing.assert_allclose([r.bits_per_dim for r in rows], alone, rtol=1e-5, atol=1e-5)
    assert len({round(v, 3) for v in alone}) > 5  # distinct inputs, distinct scores: the rows are not one value


def test_batched_video_scores_equal_one_at_a_time(demo_video, clips):
    frames, prompts = clips
    rows = list(demo_video.iter_scores(frames, prompts[0], batch_size=2))
    for row, clip in zip(rows, frames):
        alone = demo_video.score_frames(clip, prompts[0])
        np.testing.assert_allclose(row.frame_bits, alone, rtol=1e-5, atol=1e-5)
        assert row.bits_per_dim == pytest.approx(np.mean(alone), abs=1e-5)


def test_score_folder_with_a_damaged_file(digits, tmp_path):
    images, labels = digits
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(images[:4]):
        image.save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG damaged")
    bomb_png(folder / "huge.png", side=9000)  # declares 81 megapixels: refused from its header
    res = runner.invoke(app, ["score", str(folder), "-p", "5", "--model", "demo", "--csv", str(tmp_path / "s.csv"),
                              "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 1, res.output
    assert "error: 2 of 6 inputs could not be scored" in res.output
    with open(tmp_path / "s.csv", newline="") as f:
        table = list(csv.DictReader(f))
    names = ("0.png", "1.png", "2.png", "3.png", "broken.png", "huge.png")
    assert [r["path"] for r in table] == [str(folder / n) for n in names]
    assert "cannot read image" in table[-2]["error"] and table[-2]["bits_per_dim"] == ""
    assert "a decompression bomb?" in table[-1]["error"] and table[-1]["bits_per_dim"] == ""
    alone = load_pipeline("demo").score(folder / "2.png", "5")
    assert float(table[2]["bits_per_dim"]) == pytest.approx(alone, abs=1e-4)
    assert json.loads((tmp_path / "s.json").read_text())[2]["bits_per_dim"] == pytest.approx(alone, abs=1e-4)


def test_sort_and_top_rank_least_likely_first(demo, digits, tmp_path):
    images, labels = digits
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    scores = {str(tmp_path / f"{i}.png"): r.bits_per_dim for i, r in enumerate(demo.score_many(images, "6"))}
    res = runner.invoke(app, ["score", str(tmp_path / "*.png"), "-p", "6", "--model", "demo", "--top", "3"])
    assert res.exit_code == 0, res.output
    shown = [line.split()[1] for line in res.output.splitlines() if line.strip() and line.split()[1] in scores]
    assert shown == sorted(scores, key=scores.get, reverse=True)[:3]


def test_one_file_prints_as_before(digits, tmp_path):
    digits[0][0].save(tmp_path / "a.png")
    res = runner.invoke(app, ["score", str(tmp_path / "a.png"), "-p", "6", "--model", "demo"])
    assert res.exit_code == 0 and res.output.strip().endswith("bits/dim") and len(res.output.splitlines()) == 1


def test_table_options_are_checked_before_scoring(digits, tmp_path):
    res = runner.invoke(app, ["score", str(tmp_path), "-p", "6", "--model", "demo", "--csv", str(tmp_path)])
    assert res.exit_code == 1 and "is a folder" in res.output
    res = runner.invoke(app, ["score", str(tmp_path / "none*.png"), "-p", "6", "--model", "demo"])
    assert res.exit_code == 1 and "no file matches" in res.output
    digits[0][0].save(tmp_path / "a.png")
    res = runner.invoke(app, ["score", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "-p", "6", "--model", "demo",
                              "--fps", "8"])
    assert res.exit_code == 1 and "--fps is for scoring .mp4 clips" in res.output


def test_probabilities_sum_to_one_and_a_digit_is_recognised(demo, digits):
    images, labels = digits
    right = 0
    for image, label in zip(images, labels):
        result = demo.classify(image)
        assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-9)
        assert result.prompts == [str(d) for d in range(10)]
        right += result.best == str(label)
    assert right >= 9


def test_classify_candidates_and_video(demo, demo_video, clips, digits):
    result = demo.classify(digits[0][0], ["1", str(digits[1][0])])
    assert result.prompts == ["1", str(digits[1][0])] and result.best == str(digits[1][0])
    ratio = np.exp(result.log_likelihoods[0] - result.log_likelihoods[1])
    assert result.probabilities[0] == pytest.approx(ratio / (1 + ratio))
    frames, prompts = clips
    video = demo_video.classify(frames[0])
    assert video.best == prompts[0] and sum(video.probabilities) == pytest.approx(1.0)
    digit, direction = video.word_marginals().values()
    assert max(digit, key=digit.get) == prompts[0].split()[0]
    assert max(direction, key=direction.get) == prompts[0].split()[-1]


def test_classify_command(digits, tmp_path):
    digits[0][0].save(tmp_path / "a.png")
    res = runner.invoke(app, ["classify", str(tmp_path / "a.png"), "--model", "demo"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith(f"{digits[1][0]} ")
    assert sum(float(line.split()[0]) for line in res.output.splitlines()[1:11]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["IMAGE", "OPTIONS", "VIDEO"])
def test_token_split_sums_to_the_log_density(kind):
    import flow_factory

    flow = flow_factory.random_flow(3, **getattr(flow_factory, kind))
    x, y, _ = flow_factory.flow_inputs(flow, batch=2, frames=3 if kind == "VIDEO" else 0)
    tokens = flow.log_prob_tokens(x, y)
    grid = x.shape[1:-1]
    assert tokens.shape == (2, *grid[:-2], grid[-2] // flow.config.patch_size, grid[-1] // flow.config.patch_size)
    np.testing.assert_allclose(np.array(tokens).reshape(2, -1).sum(axis=1), np.array(flow.log_prob(x, y)), rtol=1e-5)


def test_heatmap_shares_sum_to_the_score(demo, demo_video, digits, clips, tmp_path):
    image = digits[0][0]
    tokens = demo.token_map(image, "6")
    assert tokens.shares.shape == (1, 8, 8)
    assert tokens.shares.sum() == pytest.approx(demo.score(image, "6"), abs=1e-4)
    frames, prompts = clips
    video = demo_video.token_map(frames[0], prompts[0])
    assert video.shares.shape == (5, 3, 3)  # 5 frames of 3x3 patches
    per_frame = video.shares.sum(axis=(1, 2)) * video.shares.shape[0]
    np.testing.assert_allclose(per_frame, demo_video.score_frames(frames[0], prompts[0]), atol=1e-4)
    image.save(tmp_path / "a.png")
    res = runner.invoke(app, ["score", str(tmp_path / "a.png"), "-p", "6", "--model", "demo", "--heatmap",
                              str(tmp_path / "h.png")])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == f"{demo.score(image, '6'):.4f} bits/dim"
    with Image.open(tmp_path / "h.png") as drawn:
        assert drawn.size == (2 * 256 + 4, 256)


def test_likelihood_ratio_is_zero_for_the_null_prompt(demo, digits):
    from starflow_mlx.pipelines.outliers import statistic

    images, labels = digits
    null = demo.score_many(images[:4], "")
    assert statistic(demo, "ratio", images[:4], null, "").tolist() == [0.0] * 4
    given = demo.score_many(images[:4], str(labels[0]))
    ratio = statistic(demo, "ratio", images[:4], given, str(labels[0]))
    np.testing.assert_allclose(ratio, [g.bits_per_dim - n.bits_per_dim for g, n in zip(given, null)], atol=1e-9)
    assert ratio[0] < 0  # a real digit is explained better by its own class than by none


def test_complexity_and_typicality(demo, digits):
    from starflow_mlx.pipelines.outliers import auroc, png_bits_per_dim, statistic, threshold, typicality_test

    images, _ = digits
    rows = demo.score_many(images, "")
    flat = Image.new("L", (8, 8), 0)
    plain = statistic(demo, "complexity", [flat], demo.score_many([flat], ""), "")[0]
    pixels = np.zeros((1, 8, 8, 1), np.uint8)
    assert plain == pytest.approx(demo.score(flat, "") - png_bits_per_dim(pixels))
    noise = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 1), np.uint8)
    assert png_bits_per_dim(pixels) < png_bits_per_dim(noise)
    bits = np.array([r.bits_per_dim for r in rows])
    assert typicality_test(bits[:5], bits).typical
    assert not typicality_test(bits[:5] + 5.0, bits).typical
    assert threshold(bits, 0.05) == pytest.approx(np.quantile(bits, 0.95))
    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([2, 3], [0, 1]) == 0.0 and auroc([1], [1]) == 0.5


def test_ood_command(digits, tmp_path):
    images, _ = digits
    (tmp_path / "ref").mkdir()
    for i, image in enumerate(images):
        image.save(tmp_path / "ref" / f"{i}.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), np.uint8)).save(tmp_path / "noise.png")
    res = runner.invoke(app, ["score", str(tmp_path / "noise.png"), str(tmp_path / "ref" / "0.png"), "-p", "",
                              "--model", "demo", "--ood", "complexity", "--reference", str(tmp_path / "ref"),
                              "--json", str(tmp_path / "o.json")])
    assert res.exit_code == 0, res.output
    noise, digit = json.loads((tmp_path / "o.json").read_text())
    assert noise["outlier"] is True and digit["outlier"] is False
    assert noise["threshold"] == digit["threshold"] and noise["complexity"] > noise["threshold"]
    res = runner.invoke(app, ["score", str(tmp_path / "noise.png"), "-p", "", "--model", "demo", "--ood", "ratio"])
    assert res.exit_code == 1 and "--ood and --reference go together" in res.output


def test_a_clip_among_images_is_a_row_with_its_error(demo_video, clips, digits, tmp_path):
    from starflow_mlx.pipelines.video_io import Mp4Writer

    frames, prompts = clips
    with Mp4Writer(tmp_path / "clip.mp4", 16) as writer:
        writer.write(frames[0])
    digits[0][0].save(tmp_path / "a.png")
    rows = demo_video.score_many([tmp_path], prompts[0])
    assert [r.path for r in rows] == [str(tmp_path / "a.png"), str(tmp_path / "clip.mp4")]
    assert rows[0].error == f"{tmp_path / 'a.png'} is an image but the model is a video model"
    assert rows[1].error is None and len(rows[1].frame_bits) == 5
    res = runner.invoke(app, ["score", str(tmp_path), "-p", "7", "--model", "demo"])
    assert res.exit_code == 1 and "clip.mp4 is a video but the model is an image model" in res.output


def test_classify_among_candidate_prompts(digits, tmp_path):
    images, labels = digits
    images[0].save(tmp_path / "a.png")
    (tmp_path / "two.txt").write_text(f"1\n\n{labels[0]}\n")
    res = runner.invoke(app, ["classify", str(tmp_path / "a.png"), "--model", "demo", "--prompts",
                              str(tmp_path / "two.txt")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{labels[0]} ") and len(lines) == 3
    (tmp_path / "one.txt").write_text("1\n")
    res = runner.invoke(app, ["classify", str(tmp_path / "a.png"), "--model", "demo", "--prompts",
                              str(tmp_path / "one.txt")])
    assert res.exit_code == 1 and "holds 1 prompts: give 2 to 1000" in res.output
    (tmp_path / "bad.txt").write_text("1\nseven\n")
    res = runner.invoke(app, ["classify", str(tmp_path / "a.png"), "--model", "demo", "--prompts",
                              str(tmp_path / "bad.txt")])
    assert res.exit_code == 1 and "unknown class 'seven'" in res.output


def test_text_model_scores_and_ranks_prompts(tmp_path):
    from fixtures_model import make_model_folder

    pipe = load_pipeline(make_model_folder(tmp_path))
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8))  # 3:2, not 1:1
    square = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
    rows = pipe.score_many([wide, square, wide], "a cat", batch_size=3)
    np.testing.assert_allclose([r.bits_per_dim for r in rows], [pipe.score(i, "a cat") for i in (wide, square, wide)],
                               rtol=1e-5, atol=1e-5)
    result = pipe.classify(wide, ["a cat", "a dog"])
    assert result.log_likelihoods[1] == pytest.approx(-pipe.score(wide, "a dog") * result_dims(pipe, wide) * np.log(2),
                                                      rel=1e-5)
    with pytest.raises(ValueError, match="candidate prompts"):
        pipe.classify(wide)


def result_dims(pipe, image) -> int:
    x, _ = pipe.prepare_score(image, "")
    return int(np.prod(x.shape[1:]))


def test_write_file_is_whole_or_absent(tmp_path, monkeypatch):
    from starflow_mlx.io import staging

    staging.write_file(tmp_path / "a.csv", b"x,y\n")
    assert (tmp_path / "a.csv").read_bytes() == b"x,y\n"
    with pytest.raises(IsADirectoryError, match="is a folder"):
        staging.write_file(tmp_path, b"")

    def broken(*_):
        raise OSError("disk full")

    from starflow_mlx.io import staged_files

    for publishing, overwrite in (("link", False), ("replace", True)):
        with monkeypatch.context() as patch:
            patch.setattr(staged_files.os, publishing, broken)
            with pytest.raises(OSError, match="disk full"):
                staging.write_file(tmp_path / "b.csv", b"x", overwrite)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]  # no temporary left behind


def test_score_never_replaces_a_table_or_heatmap_without_overwrite(digits, tmp_path):
    digits[0][0].save(tmp_path / "a.png")
    for option, name in (("--csv", "s.csv"), ("--json", "s.json"), ("--heatmap", "h.png")):
        (tmp_path / name).write_bytes(b"the user's own file")
        command = ["score", str(tmp_path / "a.png"), "-p", "6", "--model", "demo", option, str(tmp_path / name)]
        res = runner.invoke(app, command)
        assert res.exit_code == 1 and res.output == (f"error: {option} {tmp_path / name} already exists: pass "
                                                     f"--overwrite to replace it, or choose another name\n")
        assert (tmp_path / name).read_bytes() == b"the user's own file"
        res = runner.invoke(app, command + ["--overwrite"])
        assert res.exit_code == 0, res.output
        assert (tmp_path / name).read_bytes() != b"the user's own file"


def test_write_file_does_not_replace_a_file_that_appears_meanwhile(tmp_path):
    from starflow_mlx.io import staging
    from starflow_mlx.io.staged_files import OutputExistsError

    (tmp_path / "a.csv").write_bytes(b"theirs")
    with pytest.raises(OutputExistsError):
        staging.write_file(tmp_path / "a.csv", b"ours")
    assert (tmp_path / "a.csv").read_bytes() == b"theirs" and len(list(tmp_path.iterdir())) == 1
    staging.write_file(tmp_path / "a.csv", b"ours", overwrite=True)
    assert (tmp_path / "a.csv").read_bytes() == b"ours"
