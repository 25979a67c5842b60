"""The image pipeline on tiny complete models: text prep and sizes as upstream, sampling, denoising, scoring."""

import dataclasses
import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.config import FlowConfig
from starflow_mlx.io import memory
from starflow_mlx.io.memory import InsufficientMemoryError
from starflow_mlx.pipelines.image import Pipeline
from starflow_mlx.pipelines.prompts import ASPECT_RATIOS, latent_size, nearest_aspect_ratio, prepare_prompt
from starflow_mlx.sampling.denoise import score_denoise

pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fixtures_model import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(model):
    return Pipeline.from_pretrained(model)


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    from fixtures_model import make_class_model_folder

    return make_class_model_folder(tmp_path_factory.mktemp("classes") / "model")


def config(**fields):
    return FlowConfig(in_channels=4, channels=64, layers_per_block=[1], latent_size=32, head_dim=32, **fields)


def test_prompt_templates_only_when_the_config_asks():
    assert prepare_prompt("a cat", config(), "16:9") == "a cat"
    assert prepare_prompt("a cat", config(fps_cond=True), None) == "An image:\na cat\n"
    assert prepare_prompt("a cat", config(fps_cond=True), None, fps=16) == "A video with 16 fps:\na cat\n"
    assert prepare_prompt("a cat", config(mix_aspect=True), "16:9") == "a cat\n in a 16:9 aspect ratio.\n"
    every = config(fps_cond=True, cond_noise_level=True, mix_aspect=True, noise_std=0.3)
    assert prepare_prompt("", every, "1:1") == "Noise Level 300:\nAn image:\n\n\n in a 1:1 aspect ratio.\n"


def test_aspect_ratio_sizes_follow_upstream():
    cfg = config(mix_aspect=True)  # 256 pixels through an 8x VAE, patch 1: sizes are multiples of 8 pixels
    for ratio in ASPECT_RATIOS:
        rw, rh = map(int, ratio.split(":"))
        h, w = latent_size(cfg, ratio)
        assert h == round(math.sqrt(256**2 * rh / rw) / 8) and w == round(math.sqrt(256**2 * rw / rh) / 8)
    assert latent_size(cfg, "1:1") == (32, 32) and latent_size(cfg, "16:9") == (24, 43)
    assert nearest_aspect_ratio(cfg, 344, 192) == "16:9" and nearest_aspect_ratio(config(), 344, 192) == "1:1"
    with pytest.raises(ValueError, match="unknown aspect ratio '7:5': use one of 1:1, 2:3"):
        latent_size(cfg, "7:5")
    assert latent_size(config(), "1:1") == (32, 32)
    with pytest.raises(ValueError, match="trained on square images only"):
        latent_size(config(), "16:9")


def test_generate_is_deterministic_per_seed(pipe):
    a = pipe.generate("a red bicycle", seed=7, num_images=2, jacobi_block_size=4)
    b = pipe.generate("a red bicycle", seed=7, num_images=2, jacobi_block_size=4)
    c = pipe.generate("a red bicycle", seed=8, num_images=2, jacobi_block_size=4)
    assert [img.size for img in a] == [(32, 32)] * 2 and a[0].mode == "RGB"
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.array(a[0]), np.array(c[0]))
    assert not np.array_equal(np.array(a[0]), np.array(a[1]))


def test_aspect_ratio_changes_the_canvas(pipe):
    (wide,) = pipe.generate("a beach", aspect_ratio="16:9")
    assert wide.size == (40, 24)  # 32x32 pixels of area at 16:9, in multiples of 8


def test_samples_are_denoised_by_one_score_step(model, pipe):
    z = mx.random.normal(pipe.noise_shape(1, "1:1"), key=mx.random.key(3))
    y, y_u = pipe.conditioning("a dog", 1, "1:1")
    raw = pipe.flow.reverse(z, y, y_uncond=y_u, cfg=2.0)
    sampled = pipe.sample("a dog", seed=3, jacobi=False)
    assert mx.allclose(sampled, score_denoise(pipe.flow, raw, y, pipe.config.noise_std), atol=1e-5)
    manifest = dataclasses.replace(pipe.manifest, source={"finetuned_decoder": "decoder.safetensors"})
    tuned = Pipeline(model, pipe.flow, manifest, pipe.text_encoder, pipe.vae)
    assert mx.allclose(tuned.sample("a dog", seed=3, jacobi=False), raw, atol=1e-5)  # the decoder expects noisy latents


def test_score_is_the_flows_likelihood_in_bits_per_dim(pipe, tmp_path):
    (image,) = pipe.generate("a dog", seed=1)
    image.save(tmp_path / "dog.png")
    x, y = pipe.prepare_score(image, "a dog")
    assert x.shape == (1, 4, 4, 4)
    expected = -pipe.flow.log_prob(x, y)[0].item() / (x.size * math.log(2))
    assert pipe.score(tmp_path / "dog.png", "a dog") == pytest.approx(expected, rel=1e-5)
    # Any other size is scored at the generation size of the nearest aspect ratio.
    x_wide, _ = pipe.prepare_score(image.resize((90, 50)), "a dog")
    assert x_wide.shape == (1, 3, 5, 4)
    with pytest.raises(ValueError, match="cannot read image"):
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        pipe.score(tmp_path / "broken.png", "a dog")


def test_long_prompt_is_truncated_with_a_warning(pipe):
    prompt = "a very long prompt about many things " * 8
    with pytest.warns(UserWarning, match="the rest is cut off") as caught:
        pipe.generate(prompt)
    # The count the user can act on is their own prompt's; the template's share is named as such.
    own = pipe.text_encoder.count_tokens(prompt)
    templated = pipe.text_encoder.count_tokens(prepare_prompt(prompt, pipe.config, "1:1"))
    assert f"the prompt is {own} tokens, {templated} with the model's prompt template" in str(caught[0].message)


def test_score_warns_of_a_shape_change_only_when_the_aspect_ratio_changes(pipe):
    (image,) = pipe.generate("a dog", seed=1)
    with pytest.warns(UserWarning, match="resized before scoring") as square:
        pipe.prepare_score(image.resize((64, 64)), "a dog")
    assert "shape changed" not in str(square[0].message)
    with pytest.warns(UserWarning, match=r"resized \(and its shape changed\) before scoring"):
        pipe.prepare_score(image.resize((90, 50)), "a dog")


def test_bad_options_are_refused(pipe):
    for options, words in (({"seed": -1}, "seed"), ({"cfg": -1.0}, "cfg"), ({"num_images": 0}, "num_images"),
                           ({"jacobi_block_size": 0}, "jacobi_block_size")):
        with pytest.raises(ValueError, match=words):
            pipe.generate("x", **options)


def test_class_models_take_class_names(class_model):
    pipe = Pipeline.from_pretrained(class_model)
    images = pipe.generate("1", seed=2, num_images=2)
    assert [(img.size, img.mode) for img in images] == [((64, 64), "L")] * 2  # 8x8 digits, enlarged to be seen
    assert pipe.generate("", seed=2)[0].size == (64, 64)  # the empty prompt is the unconditional class
    y, y_u = pipe.conditioning("2", 1, None)
    assert y.tolist() == [[[0, 0, 1, 0]]] and y_u.tolist() == [[[0, 0, 0, 1]]]
    with pytest.raises(ValueError, match="unknown class '9': this model generates 0, 1, 2"):
        pipe.generate("9")
    x, _ = pipe.prepare_score(images[0], "1")
    assert np.allclose(np.array(x)[0, ..., 0], np.array(images[0])[::8, ::8] / 127.5 - 1.0, atol=1e-6)
    assert math.isfinite(pipe.score(images[0], "1"))


def test_not_enough_memory_is_one_line_with_the_numbers(model, monkeypatch):
    monkeypatch.setattr(memory, "physical_memory", lambda: 2**20)
    with pytest.raises(InsufficientMemoryError) as err:
        Pipeline.from_pretrained(model)
    message = str(err.value)
    assert "\n" not in message and "GB of memory but the machine has 0.0 GB" in message
    assert "starflow quantize" in message


def test_video_folders_go_to_the_video_pipeline(class_model, tmp_path):
    """load_pipeline hands a folder that says text-to-video to VideoPipeline, which names what this one lacks;
    each pipeline class refuses the other kind and names the right one."""
    from starflow_mlx import load_pipeline
    from starflow_mlx.pipelines.video import VideoPipeline

    folder = tmp_path / "video"
    shutil.copytree(class_model, folder)
    manifest = json.loads((folder / "starflow.json").read_text())
    (folder / "starflow.json").write_text(json.dumps({**manifest, "kind": "text-to-video"}))
    with pytest.raises(ValueError, match="lacks its text encoder"):
        load_pipeline(folder)
    with pytest.raises(ValueError, match="text-to-video model: use starflow_mlx.VideoPipeline"):
        Pipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="class-to-image model: use starflow_mlx.Pipeline"):
        VideoPipeline.from_pretrained(class_model)
    assert type(load_pipeline(class_model)) is Pipeline

