"""Inversion through the pipelines: an input to its noise and back exactly, edits, inpainting (tiny random models)."""

import numpy as np
import pytest
from PIL import Image

from fixtures_inversion import make_class_video_folder
from fixtures_model import make_class_model_folder


@pytest.fixture(scope="module")
def image_pipe(tmp_path_factory):
    from starflow_mlx import Pipeline

    return Pipeline.from_pretrained(make_class_model_folder(tmp_path_factory.mktemp("inv-image") / "m"))


@pytest.fixture(scope="module")
def video_pipe(tmp_path_factory):
    from starflow_mlx import Pipeline

    return Pipeline.from_pretrained(make_class_video_folder(tmp_path_factory.mktemp("inv-video") / "m"))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_an_image_comes_back_from_its_noise(image_pipe, cfg):
    image = image_pipe.generate("1", seed=3, cfg=cfg)[0]
    inverted = image_pipe.invert(image, "1", cfg=cfg)
    data = np.array(inverted.data)
    again, _ = image_pipe.to_model_input(image_pipe.from_noise(inverted))
    assert np.abs(np.array(again) - data).max() < 1e-5  # the flow's data back to float32 rounding...
    assert np.array_equal(pixels(image_pipe.from_noise(inverted)), pixels(image))  # ...so every pixel is the same


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_a_clip_comes_back_from_its_noise(video_pipe, cfg):
    clip = video_pipe.generate("8 moving left", seed=1, cfg=cfg)[0]
    inverted = video_pipe.invert(clip, "8 moving left", cfg=cfg)
    assert inverted.noise.shape == (1, 3, 8, 8, 1)
    assert np.array_equal(video_pipe.from_noise(inverted), clip)


def test_noise_decoded_with_another_guidance_weight_is_refused(image_pipe):
    inverted = image_pipe.invert(image_pipe.generate("0")[0], "0", cfg=1.5)
    with pytest.raises(ValueError, match="inverted with cfg 1.5"):
        image_pipe.from_noise(inverted, cfg=2.0)
