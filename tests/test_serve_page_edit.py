"""The page's edit form in headless Chromium: an uploaded image, a mask painted with the mouse, POST /v1/images/edits.

For each image model kind the server serves, the test paints a stroke and checks what the server received (the mask's
transparent pixels are exactly the stroke), what it made (every pixel outside the stroke is the uploaded one), and
that Clear and Invert give the server's one-line refusals on the page. On a video model the page edits a clip:
a mask painted on its first frame for every frame (POST /v1/videos/edits), or no mask and a From prompt.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_serve import serving, started
from PIL import Image
from test_serve_page import CHROMIUM, TIMEOUT_MS, browser, kind_models  # noqa: F401 (browser: a fixture)

from starflow_mlx.pipelines.video_io import file_sha256
from starflow_mlx.server.request_types import image_sizes

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; "
                                                         ".ci/run installs it)")
BRUSH = 7  # pixels of the model's size


def stroke_pixels(width: int, height: int, a, b, radius: float) -> np.ndarray:
    """Pixels whose centre is within ``radius`` of the segment a-b (canvas coordinates): what the brush paints."""
    ys, xs = np.mgrid[:height, :width] + 0.5
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((xs - ax) * dx + (ys - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return (xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2 <= radius ** 2


def open_page(chromium, url):
    page = chromium.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    return page, errors


def paint_stroke(page, width: int, height: int) -> np.ndarray:
    """Drag a horizontal stroke over the mask canvas (at whole screen pixels: every point the browser reports lies on
    the segment); the pixels of the canvas's ``width`` x ``height`` it paints."""
    page.fill("#brush", str(BRUSH))
    left, top, shown_w, shown_h = page.eval_on_selector(
        "#editmask", "c => { const r = c.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }")
    x0, x1, y = round(left + 0.2 * shown_w), round(left + 0.6 * shown_w), round(top + 0.4 * shown_h)
    page.mouse.move(x0, y)
    page.mouse.down()
    page.mouse.move(x1, y, steps=12)
    page.mouse.up()
    to_canvas = lambda cx, cy: ((cx - left) * width / shown_w, (cy - top) * height / shown_h)
    stroke = stroke_pixels(width, height, to_canvas(x0, y), to_canvas(x1, y), BRUSH / 2)
    assert 0 < stroke.sum() < stroke.size // 4
    return stroke


def submit_edit(page):
    """Press Edit and wait for the server's answer (the button is disabled until then)."""
    page.click("#edit")
    page.wait_for_function("!document.querySelector('#edit').disabled", timeout=TIMEOUT_MS)


@pytest.mark.parametrize("kind", ["class-to-image", "text-to-image"])
def test_page_edits_the_painted_part_and_keeps_the_rest(tmp_path, browser, kind, monkeypatch):  # noqa: F811
    from starflow_mlx.server import edits

    received = []  # (image, mask) as the endpoint decoded them from the page's upload
    check_mask = edits.regenerate_mask
    monkeypatch.setattr(edits, "regenerate_mask", lambda image, mask: received.append((image, mask)) or
                        check_mask(image, mask))
    model = kind_models()[kind](tmp_path / "model")
    with started(model, tmp_path / "out") as runner, serving(runner, api_key="page-key") as url:
        width, height = map(int, next(iter(image_sizes(runner.pipe))).split("x"))
        source = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
        Image.fromarray(source).save(tmp_path / "source.png")
        page, errors = open_page(browser, url)
        posted = []
        page.on("request", lambda r: posted.append(r) if r.url.endswith("/v1/images/edits") else None)
        page.wait_for_selector("#keybox", state="visible")
        page.fill("#key", "page-key")
        (tmp_path / "notes.png").write_text("not an image")
        page.set_input_files("#editfile", str(tmp_path / "notes.png"))
        page.wait_for_function("document.querySelector('#editerror').textContent !== ''", timeout=TIMEOUT_MS)
        assert page.inner_text("#editerror") == ("notes.png is not an image this browser can read: choose a PNG, "
                                                 "JPEG or WebP")
        assert not page.is_visible("#editarea")
        page.set_input_files("#editfile", str(tmp_path / "source.png"))
        page.wait_for_selector("#editarea", state="visible", timeout=TIMEOUT_MS)
        stroke = paint_stroke(page, width, height)

        classes = runner.pipe.manifest.classes
        page.fill("#editprompt", classes[8] if classes else "a cat")
        page.fill("#editseed", "3")
        submit_edit(page)
        page.wait_for_selector("article.job[data-status=completed] .gallery img", timeout=TIMEOUT_MS)
        assert page.inner_text("#editerror") == "" and page.inner_text("#error") == ""
        page.wait_for_function("document.querySelector('.gallery img').naturalWidth > 0", timeout=TIMEOUT_MS)
        assert page.eval_on_selector(".gallery img", "i => [i.naturalWidth, i.naturalHeight]") == [width, height]

        # (a) What the server received: the image as uploaded, the mask transparent exactly where the stroke went.
        assert len(posted) == 1 and posted[0].headers["authorization"] == "Bearer page-key"
        (image, mask), = received
        assert np.array_equal(np.asarray(image.convert("RGB")), source)
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        assert set(np.unique(alpha)) == {0, 255}
        assert np.array_equal(alpha == 0, stroke)
        job = runner.listing()[0]
        assert job.request.prompt == (classes[8] if classes else "a cat") and job.params["seed"] == 3
        # (b) What it made: every pixel outside the stroke is the uploaded one (as the model's channels read it).
        made = Image.open(runner.path(job, job.files[0]))
        expected = np.asarray(Image.fromarray(source).convert(made.mode))
        assert made.size == (width, height) and job.params["operation"] == "inpaint"
        assert np.array_equal(np.asarray(made)[~stroke], expected[~stroke])

        # (c) Clear empties the mask, Invert of an empty mask marks every pixel: the server's refusals, on the page.
        page.click("#clearmask")
        submit_edit(page)
        assert page.inner_text("#editerror") == "request: the mask has no transparent pixels: nothing to edit"
        assert np.asarray(received[-1][1].convert("RGBA"))[..., 3].min() == 255
        page.click("#invertmask")
        submit_edit(page)
        assert page.inner_text("#editerror").startswith("request: the mask is transparent everywhere")
        assert len(runner.listing()) == 1 and not errors


def test_page_edits_a_clip_on_a_video_model(tmp_path, browser, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from starflow_mlx.apps.cli import app as cli
    from starflow_mlx.apps.commands import register
    from starflow_mlx.pipelines.video_io import read_video, write_mp4
    from starflow_mlx.server import video_edits

    register(cli)
    made_path, source_path = tmp_path / "made.mp4", tmp_path / "three.mp4"  # before the server runs: MLX on one
    res = CliRunner().invoke(cli, ["generate", "3 moving right", "-m", "demo-video", "--seed", "2", "-o",  # thread
                                   str(made_path)])
    assert res.exit_code == 0, res.output
    # Wider than the model's frames: the page must show (and mask) the clip at its own size, which the edit keeps.
    write_mp4(source_path, np.pad(read_video(made_path)[0], ((0, 0), (0, 0), (0, 16), (0, 0))), 16)
    source = read_video(source_path)[0]
    height, width = source.shape[1:3]
    received = []  # the mask as the endpoint saved it from the page's upload
    check = video_edits.check_uploads
    monkeypatch.setattr(video_edits, "check_uploads", lambda pipe, req: received.append(
        req.mask_file and Image.open(req.mask_file).copy()) or check(pipe, req))
    with started("demo-video", tmp_path / "out") as runner, serving(runner) as url:
        page, errors = open_page(browser, url)
        page.wait_for_function("document.querySelector('#model').textContent.includes('·')", timeout=TIMEOUT_MS)
        assert page.is_visible("#editform") and page.is_visible("#editfrom")
        page.set_input_files("#editfile", str(source_path))
        page.wait_for_selector("#editarea", state="visible", timeout=TIMEOUT_MS)
        assert page.eval_on_selector("#editimage", "c => [c.width, c.height]") == [width, height]  # the clip's size
        stroke = paint_stroke(page, width, height)
        page.fill("#editprompt", "8 moving right")
        page.fill("#editseed", "3")
        submit_edit(page)
        assert page.inner_text("#editerror") == ""
        page.wait_for_selector("article.job[data-status=completed] video", timeout=TIMEOUT_MS)
        # The mask sent: white exactly where the stroke went, on every frame; the rest of every frame kept (up to
        # H.264, the clip having been decoded and encoded once more).
        mask = np.asarray(received[-1].convert("L"))
        assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask == 255, stroke)
        job = runner.listing()[0]
        assert job.params["operation"] == "inpaint" and job.params["source_sha256"] == file_sha256(source_path)
        made = read_video(runner.path(job, job.files[0]))[0]
        assert made.shape == source.shape
        assert np.abs(made[:, ~stroke].astype(int) - source[:, ~stroke]).mean() < 3
        # No mask: the clip remade from what From says it shows; neither: the server's one line under the form.
        page.click("#clearmask")
        page.fill("#editfrom", "3 moving right")
        submit_edit(page)
        assert page.inner_text("#editerror") == ""
        page.wait_for_function("document.querySelectorAll('article.job[data-status=completed]').length == 2",
                               timeout=TIMEOUT_MS)
        assert received[-1] is None and runner.listing()[0].params["operation"] == "edit"
        page.fill("#editfrom", "")
        submit_edit(page)
        assert page.inner_text("#editerror").startswith("request: send from_prompt")
        assert len(runner.listing()) == 2 and not errors
