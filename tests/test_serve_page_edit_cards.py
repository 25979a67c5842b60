"""The page's job cards in headless Chromium: an edit's card says it is an edit (a generation's does not), live as it
is followed and read back on a reload, for an image model and a video model."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from fixtures_serve import serving, started
from PIL import Image
from test_serve_page import CHROMIUM, TIMEOUT_MS, browser  # noqa: F401 (browser: a fixture)
from test_serve_page_edit import open_page, paint_stroke, submit_edit

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; "
                                                         ".ci/run installs it)")
LABELS = "[...document.querySelectorAll('article.job')].map(c => [c.dataset.operation, " \
         "c.querySelector('.operation').textContent, c.querySelector('.prompt').textContent])"


def labels(page) -> list[list[str]]:
    """Each card's operation, its label and its prompt line, newest first."""
    return page.evaluate(LABELS)


def test_an_image_edit_card_says_edit(tmp_path, browser):  # noqa: F811
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(tmp_path / "source.png")
    with started("demo", tmp_path / "out") as runner, serving(runner) as url:
        page, errors = open_page(browser, url)
        page.wait_for_function("document.querySelector('#model').textContent.includes('·')", timeout=TIMEOUT_MS)
        page.fill("#prompt", "7")
        page.fill("#n", "1")
        page.click("#generate")
        page.wait_for_selector("article.job[data-status=completed]", timeout=TIMEOUT_MS)
        page.set_input_files("#editfile", str(tmp_path / "source.png"))
        page.wait_for_selector("#editarea", state="visible", timeout=TIMEOUT_MS)
        paint_stroke(page, 64, 64)
        page.fill("#editprompt", "8")
        submit_edit(page)
        page.wait_for_function("document.querySelectorAll('article.job[data-status=completed]').length === 2",
                               timeout=TIMEOUT_MS)
        assert page.inner_text("#editerror") == "" and page.inner_text("#error") == ""
        # Followed from its start, the edit's card says so; the generation's card shows its prompt alone.
        expected = [["inpaint", "edit", "8"], ["generate", "", "7"]]
        assert labels(page) == expected
        assert page.is_visible("article.job[data-operation=inpaint] .operation")
        page.reload()  # the cards again, from the server's list
        page.wait_for_function("document.querySelectorAll('article.job').length === 2", timeout=TIMEOUT_MS)
        assert labels(page) == expected and not errors


def test_video_edit_cards_say_edit(tmp_path, browser):  # noqa: F811
    from typer.testing import CliRunner

    from starflow_mlx.apps.cli import app as cli
    from starflow_mlx.apps.commands import register

    register(cli)
    source = tmp_path / "three.mp4"  # before the server runs: MLX on one thread at a time
    res = CliRunner().invoke(cli, ["generate", "3 moving right", "-m", "demo-video", "--seed", "2", "-o", str(source)])
    assert res.exit_code == 0, res.output
    mask = Image.new("L", (132, 132))
    mask.paste(255, (0, 66, 132, 132))
    mask.save(tmp_path / "mask.png")
    video = ("three.mp4", source.read_bytes(), "video/mp4")
    with started("demo-video", tmp_path / "out") as runner, serving(runner) as url:
        made = httpx.post(f"{url}/v1/videos", json={"prompt": "7 moving right", "frames": 5}).json()
        edit = httpx.post(f"{url}/v1/videos/edits", files={"video": video}, data={
            "prompt": "8 moving right", "from_prompt": "3 moving right"}).json()
        inpaint = httpx.post(f"{url}/v1/videos/edits", files={"video": video, "mask": (
            "mask.png", (tmp_path / "mask.png").read_bytes())}, data={"prompt": "8 moving right"}).json()
        page, errors = open_page(browser, url)
        # The cards as the server lists the jobs (queued, running or done), labelled as they are made.
        page.wait_for_function("document.querySelectorAll('article.job').length === 3", timeout=TIMEOUT_MS)
        expected = [["inpaint", "edit", "8 moving right"], ["edit", "edit", "3 moving right → 8 moving right"],
                    ["generate", "", "7 moving right"]]
        assert labels(page) == expected
        page.wait_for_function("document.querySelectorAll('article.job[data-status=completed] video').length === 3",
                               timeout=TIMEOUT_MS)
        assert all(runner.get(job["id"]).status == "completed" for job in (made, edit, inpaint))
        assert labels(page) == expected and not errors
