"""The page at ``/`` in a real browser: Debian's headless Chromium driven by Playwright (no browser download).

``.ci/run`` installs chromium; elsewhere these tests skip, saying why. With
``STARFLOW_SCREENSHOT=docs/serve.png`` the image test also saves what the page showed.
"""

from __future__ import annotations

import os
import shutil

import pytest

from fixtures_serve import serving, started
from starflow_mlx.server.request_types import image_sizes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; "
                                                         ".ci/run installs it)")
TIMEOUT_MS = 600_000  # a loaded 2-core machine takes minutes for what an idle one does in seconds


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_page_makes_demo_images_with_live_progress(tmp_path, browser):
    with started("demo", tmp_path / "out") as runner, serving(runner, api_key="page-key") as url:
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector("#keybox", state="visible")  # asked for the key: every API call needs it
        page.fill("#key", "page-key")
        page.fill("#prompt", "7")
        page.fill("#n", "8")
        page.fill("#seed", "0")
        page.click("#generate")
        # The card shows the job while it runs (progress events), then its images.
        page.wait_for_selector("article.job[data-status]", timeout=TIMEOUT_MS)
        page.wait_for_selector("article.job[data-status=completed] .gallery img:nth-child(8)", timeout=TIMEOUT_MS)
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth === 64)",
                               timeout=TIMEOUT_MS)
        assert page.eval_on_selector("article.job progress", "p => p.value") == 100
        assert "seed 0" in page.inner_text("article.job .meta")
        assert page.inner_text("#model") == "demo · class-to-image"
        # The key lives as long as the tab: nothing later, or another page of this origin, finds it on disk.
        assert page.evaluate("[localStorage.length, sessionStorage.getItem('starflow-key')]") == [0, "page-key"]
        # A second job, then the first list again after a reload: the page reads the server's jobs.
        page.fill("#prompt", "3")
        page.fill("#n", "8")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('article.job[data-status=completed]').length === 2",
                               timeout=TIMEOUT_MS)
        page.reload()
        page.wait_for_function("document.querySelectorAll('.gallery img').length === 16", timeout=TIMEOUT_MS)
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth === 64)",
                               timeout=TIMEOUT_MS)
        if os.environ.get("STARFLOW_SCREENSHOT"):
            page.screenshot(path=os.environ["STARFLOW_SCREENSHOT"], full_page=True)
        assert not errors


def kind_models():
    """A model of each kind the server serves: the built-in demos, and tiny converted ones (torch builds them)."""
    def text_to_image(folder):
        pytest.importorskip("diffusers")
        from fixtures_model import make_model_folder

        return make_model_folder(folder)

    def text_to_video(folder):
        pytest.importorskip("torch")
        from fixtures_video import make_video_model

        return make_video_model(folder)

    return {"class-to-image": lambda folder: "demo", "class-to-video": lambda folder: "demo-video",
            "text-to-image": text_to_image, "text-to-video": text_to_video}


def test_the_page_tests_cover_every_kind_of_model():
    from starflow_mlx.io.model_folder import KINDS

    assert sorted(kind_models()) == sorted(KINDS)


@pytest.mark.parametrize("kind", sorted(kind_models()))
def test_page_makes_what_each_kind_of_model_makes(tmp_path, browser, kind):
    from starflow_mlx.io.model_folder import VIDEO_KINDS

    model = kind_models()[kind](tmp_path / "model")
    video = kind in VIDEO_KINDS
    with started(model, tmp_path / "out") as runner, serving(runner) as url:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_function("document.querySelector('#model').textContent.includes('·')", timeout=TIMEOUT_MS)
        assert page.inner_text("#model").endswith(kind)
        # The form follows what the model makes: frames and fps for a video, an image count for images.
        assert page.is_visible("#frames") == video and page.is_visible("#n") == (not video)
        classes = runner.pipe.manifest.classes
        page.fill("#prompt", classes[min(7, len(classes) - 1)] if classes else "a cat")
        page.fill("#seed", "1")
        page.fill("#frames" if video else "#n", "5" if video else "1")
        page.click("#generate")
        media = "video" if video else ".gallery img"
        page.wait_for_selector(f"article.job[data-status=completed] {media}", timeout=TIMEOUT_MS)
        assert page.inner_text("#error") == ""
        if video:  # Chromium decoded the mp4 (H.264): 5 frames at 16 fps
            page.wait_for_function("document.querySelector('video').readyState >= 1", timeout=TIMEOUT_MS)
            assert page.eval_on_selector("video", "v => v.duration") == pytest.approx(5 / 16, abs=0.02)
            assert page.eval_on_selector("video", "v => v.videoWidth") > 0
        else:
            page.wait_for_function("document.querySelector('.gallery img').complete", timeout=TIMEOUT_MS)
            width = page.eval_on_selector(".gallery img", "i => i.naturalWidth")
            assert f"{width}x" in " ".join(image_sizes(runner.pipe))
        assert not errors


def test_scores_page_ranks_files_least_likely_first(tmp_path, browser):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), np.uint8)).save(tmp_path / "noise.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "blank.png")
    with started("demo", tmp_path / "out") as runner, serving(runner, api_key="page-key") as url:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/static/scores.html")
        page.fill("#key", "page-key")
        page.fill("#prompt", "3")
        page.set_input_files("#files", [str(tmp_path / "blank.png"), str(tmp_path / "noise.png")])
        page.click("#score")
        page.wait_for_selector("#ranked tbody tr:nth-child(2)", timeout=TIMEOUT_MS)
        names = page.eval_on_selector_all("#ranked tbody tr td:nth-child(2)", "cells => cells.map(c => c.textContent)")
        assert names == ["noise.png", "blank.png"] and not errors
