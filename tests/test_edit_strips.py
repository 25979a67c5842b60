"""The picture strips of docs/editing.md and the README show what their labels say, and are what the command makes now."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from starflow_mlx.benchmarks import edit_strips

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("strips")
    return out, edit_strips.write_strips(out)


def real_digit(label: int) -> np.ndarray:
    """The first real test digit of ``label`` as the demo writes it: 8-bit, each pixel an 8x8 block."""
    from starflow_mlx.training.data import load_digits_split

    test = load_digits_split()[1]
    small = np.round((test.images[np.flatnonzero(test.labels == label)[0], ..., 0] + 1) * 127.5).astype(np.uint8)
    return np.kron(small, np.ones((8, 8), np.uint8))


def test_inpainting_panels_show_the_mask_used_and_keep_every_known_pixel(made):
    rows = made[1]["inpaint_strip"]
    side = 64
    expected = {"bottom half": np.arange(side)[:, None] >= side // 2, "left half": np.arange(side)[None] < side // 2}
    for row, digit in zip(rows, (2, 5, 9)):
        (label, source), (what, mask), (_, masked), (_, filled) = row
        assert label == f"real test {digit}" and np.array_equal(source, real_digit(digit))
        hole = mask == 255
        assert set(np.unique(mask)) == {0, 255}
        if what[6:] in expected:
            assert np.array_equal(hole, np.broadcast_to(expected[what[6:]], hole.shape))
        else:  # a 3x3 patch of the 8x8 digit's pixels
            assert hole.sum() == 9 * 64 and np.array_equal(hole, np.kron(hole[::8, ::8], np.ones((8, 8), bool)))
        assert np.array_equal(masked, np.where(hole, 128, source))
        assert np.array_equal(filled[~hole], source[~hole])  # the known region, exactly
        assert not np.array_equal(filled[hole], source[hole])  # the hole is drawn anew


def test_outpainting_keeps_what_was_on_the_canvas_and_draws_the_new_columns(made):
    [[(_, cut), (_, mask), (_, masked), (_, filled), (_, original)]] = made[1]["outpaint_strip"]
    lost = edit_strips.CUT * 8
    assert np.array_equal(original, real_digit(4))
    assert np.array_equal(cut[:, lost:], original[:, :-lost]) and not cut[:, :lost].any()
    assert np.array_equal(mask > 0, np.broadcast_to(np.arange(64)[None] >= 64 - lost, mask.shape))
    assert np.array_equal(masked[:, :-lost], cut[:, lost:]) and (masked[:, -lost:] == 128).all()
    assert np.array_equal(filled[:, :-lost], cut[:, lost:])


def test_edit_panels_start_from_the_real_digit_and_strength_one_is_a_fresh_sample(made):
    from starflow_mlx.pipelines.load import load_pipeline

    pipe = load_pipeline("demo")
    for (a, b), row in zip(edit_strips.EDITS, made[1]["edit_strip"]):
        assert np.array_equal(row[0][1], real_digit(a))
        assert [label for label, _ in row[1:]] == [f"-> {b}, strength {s:g}" for s in edit_strips.STRENGTHS]
        fresh = np.asarray(pipe.generate(str(b), seed=edit_strips.SEED, jacobi=False)[0])
        assert np.array_equal(row[-1][1], fresh)
        assert not np.array_equal(row[1][1], fresh)  # strength 0 keeps the source's noise


def test_the_video_strip_masks_each_frame_on_its_own_and_keeps_the_rest(made):
    source, edited, masks, filled = ([p for _, p in row] for row in made[1]["video_strip"])
    assert len({m.tobytes() for m in masks}) > 1  # the mask moves with the digit
    for s, e, m, f in zip(source, edited, masks, filled):
        hole = m == 255
        assert hole.any() and not hole.all()
        assert np.array_equal(f[~hole], s[~hole])
        assert not np.array_equal(e, s)


def test_every_panel_is_drawn_where_the_layout_puts_it(made):
    out, strips = made
    for name, rows in strips.items():
        sheet = np.asarray(Image.open(out / f"{name}.png"))
        zoom = edit_strips.ZOOM[name]
        for row, corners in zip(rows, edit_strips.panel_boxes(rows, zoom)):
            for (_, pixels), (left, top) in zip(row, corners):
                shown = sheet[top: top + pixels.shape[0] * zoom, left: left + pixels.shape[1] * zoom]
                assert np.array_equal(shown, edit_strips.enlarge(pixels, zoom)), name


def test_the_committed_strips_are_what_the_command_makes_now(made):
    out, strips = made
    for name in strips:
        committed = IMG / f"{name}.png"
        assert committed.stat().st_size < 8000, f"{committed} should stay a few KB"
        # Made on Linux's CPU backend, where a fresh run is pixel-identical. Another backend (a Mac's GPU) rounds
        # float32 differently, which moves a sampled pixel by a grey level or two; a stale strip (another seed,
        # mask, label or layout) differs by tens of levels over whole panels.
        old = np.asarray(Image.open(committed)).astype(np.int16)
        new = np.asarray(Image.open(out / f"{name}.png")).astype(np.int16)
        stale = f"{committed} is stale: python -m starflow_mlx.benchmarks.edit_strips --out docs/img --overwrite"
        assert old.shape == new.shape, stale
        assert np.mean(np.abs(old - new) > 2) < 1e-4, stale  # a label changed by one word moves more pixels


def test_strips_already_there_are_refused_before_any_work(tmp_path):
    (tmp_path / "video_strip.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        edit_strips.write_strips(tmp_path)
    assert (tmp_path / "video_strip.png").read_bytes() == b"mine" and len(list(tmp_path.iterdir())) == 1
