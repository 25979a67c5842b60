"""Inversion on a latent text-to-image model (tiny T5 and SD-VAE): exact in the VAE's latent space, and the
noise file keeps the latents."""

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
from starflow_mlx.apps.cli import app  # noqa: E402
from starflow_mlx.apps.commands import register  # noqa: E402

register(app)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fixtures_model import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("inv-latent"))


def test_latents_come_back_from_their_noise_and_the_noise_file_keeps_them(model, tmp_path):
    from starflow_mlx import Pipeline
    from starflow_mlx.pipelines.noise_file import load_noise

    pipe = Pipeline.from_pretrained(model)
    image = pipe.generate("a red cube", seed=2, aspect_ratio="1:1")[0]
    inverted = pipe.invert(image, "a red cube")
    assert inverted.aspect_ratio == "1:1" and inverted.noise.shape == inverted.data.shape
    y, y_u = pipe.conditioning("a red cube", 1, "1:1")
    back = pipe.flow.reverse(inverted.noise, y, y_uncond=y_u, cfg=inverted.cfg, jacobi=False)
    assert float(mx.abs(back - inverted.data).max()) < 1e-4
    assert pipe.from_noise(inverted).size == image.size
    image.save(tmp_path / "cube.png")
    res = CliRunner().invoke(app, ["encode", str(tmp_path / "cube.png"), "-p", "a red cube", "-m", str(model),
                                   "-o", str(tmp_path / "cube.safetensors")])
    assert res.exit_code == 0, res.output
    arrays, meta = load_noise(tmp_path / "cube.safetensors")
    assert np.abs(np.array(arrays["latents"]) - np.array(inverted.data)).max() < 1e-5
    assert meta["aspect_ratio"] == "1:1" and meta["prompt"] == "a red cube"
