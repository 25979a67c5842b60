"""Inversion through the pipelines: an input to its noise and back exactly, edits, inpainting (tiny random models)."""

import numpy as np
import pytest
from PIL import Image

from fixtures_inversion import make_class_video_folder
from fixtures_model import make_class_model_folder


@pytest.fixture(scope="module")
def image_pipe(tmp_path_factory):
    from starflow_mlx import load_pipeline

    return load_pipeline(make_class_model_folder(tmp_path_factory.mktemp("inv-image") / "m"))


@pytest.fixture(scope="module")
def video_pipe(tmp_path_factory):
    from starflow_mlx import load_pipeline

    return load_pipeline(make_class_video_folder(tmp_path_factory.mktemp("inv-video") / "m"))


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


def test_an_edit_at_full_strength_is_the_seeds_fresh_sample(image_pipe):
    source = image_pipe.generate("0", seed=2)[0]
    fresh = image_pipe.generate("2", seed=7, jacobi=False)[0]
    assert np.array_equal(pixels(image_pipe.edit(source, "0", "2", strength=1.0, seed=7)), pixels(fresh))
    kept = image_pipe.edit(source, "0", "2", strength=0.0, seed=7)
    assert np.array_equal(pixels(kept), pixels(image_pipe.edit(source, "0", "2", strength=0.0, seed=99)))
    assert not np.array_equal(pixels(kept), pixels(fresh))


def test_a_clip_edit_keeps_its_size(video_pipe):
    clip = video_pipe.generate("3 moving right", seed=1)[0]
    edited = video_pipe.edit(clip, "3 moving right", "8 moving right", strength=0.3)
    assert edited.shape == clip.shape and not np.array_equal(edited, clip)


def half_mask(size, fill=255) -> Image.Image:
    mask = np.zeros(size[::-1], np.uint8)
    mask[size[1] // 2:] = fill
    return Image.fromarray(mask)


@pytest.mark.parametrize("method", ["replace", "resample"])
def test_inpainting_keeps_every_known_pixel(image_pipe, method):
    source = image_pipe.generate("1", seed=5)[0]
    out = image_pipe.inpaint(source, half_mask(source.size), "2", method=method, rounds=2, seed=1)
    top = source.height // 2
    assert out.size == source.size
    assert np.array_equal(pixels(out)[:top], pixels(source)[:top])
    assert not np.array_equal(pixels(out)[top:], pixels(source)[top:])


@pytest.mark.parametrize("method", ["replace", "resample"])
def test_clip_inpainting_keeps_known_pixels_and_unmasked_frames(video_pipe, method):
    clip = video_pipe.generate("3 moving left", seed=1)[0]
    mask = half_mask((clip.shape[2], clip.shape[1]))
    out = video_pipe.inpaint(clip, mask, "8 moving left", method=method, mask_frames=[1])
    half = clip.shape[1] // 2
    assert np.array_equal(out[[0, 2]], clip[[0, 2]])
    assert np.array_equal(out[1, :half], clip[1, :half]) and not np.array_equal(out[1, half:], clip[1, half:])


def test_known_tokens_are_held_by_the_replace_method(image_pipe, monkeypatch):
    """Before the pixels are pasted back, the known part already matches the input (up to the denoising step)."""
    from starflow_mlx.pipelines import inversion

    source = image_pipe.generate("1", seed=5)[0]
    monkeypatch.setattr(inversion, "_paste", lambda pixels, made, hole, video: made)
    raw = pixels(image_pipe.inpaint(source, half_mask(source.size), "2", method="replace"))
    top = source.height // 2
    assert np.abs(raw[:top] - pixels(source)[:top]).mean() < np.abs(raw[top:] - pixels(source)[top:]).mean()


@pytest.mark.parametrize("mask, message", [(Image.new("L", (10, 10), 255), "mask is 10x10"),
                                           (Image.new("L", (64, 64), 0), "no white pixels"),
                                           (Image.new("L", (64, 64), 255), "all white")])
def test_bad_masks_are_refused(image_pipe, mask, message):
    source = image_pipe.generate("1")[0]
    with pytest.raises(ValueError, match=message):
        image_pipe.inpaint(source, mask, "2")
