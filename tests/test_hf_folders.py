"""Hugging Face folders load directly (converted in memory), and tokenizers never run code from a folder."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.io.loading import ModelLoadError
from starflow_mlx.io.text_encoder import load_text_encoder
from starflow_mlx.io.vae import load_vae

pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from fixtures_t5 import make_tiny_mlx_t5

    root = tmp_path_factory.mktemp("t5")
    return root / "hf", make_tiny_mlx_t5(root)


def test_transformers_t5_folder_loads_like_its_converted_folder(t5):
    hf, converted = t5
    prompts = ["a photo of a cat", "a horse on the moon"]
    direct = load_text_encoder(hf, dtype="float32").encode(prompts, 12)
    fast = load_text_encoder(converted, dtype="float32").encode(prompts, 12)
    assert np.allclose(np.array(direct), np.array(fast), atol=1e-6)
    assert load_text_encoder(hf).model.encoder.embed_tokens.weight.dtype == mx.float16  # convert_t5's default


def test_diffusers_vae_folder_loads_like_its_converted_folder(tmp_path):
    from fixtures_vae import make_tiny_mlx_vae

    converted = make_tiny_mlx_vae(tmp_path)
    images = mx.random.uniform(-1, 1, (1, 16, 16, 3), key=mx.random.key(0))
    direct, fast = load_vae(tmp_path / "diffusers", dtype="float32"), load_vae(converted, dtype="float32")
    assert np.allclose(np.array(direct.encode(images)), np.array(fast.encode(images)), atol=1e-5)
    assert np.allclose(np.array(direct.decode(fast.encode(images))), np.array(fast.decode(fast.encode(images))),
                       atol=1e-5)


@pytest.mark.parametrize("load", [load_text_encoder, load_vae])
def test_errors_name_no_python_function(load, tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(ModelLoadError) as err:
            load(path)
        assert "convert_" not in str(err.value) and "()" not in str(err.value), err.value


def test_tokenizer_auto_map_code_is_never_run_nor_asked_about(t5, tmp_path):
    hf, _ = t5
    folder = tmp_path / "hostile"
    shutil.copytree(hf, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import T5TokenizerFast as EvilTokenizer\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # stdin closed: a prompt for trust_remote_code would fail (or hang until the timeout) instead of passing.
    script = ("import sys; from starflow_mlx.io.text_encoder import load_text_encoder\n"
              "try:\n    load_text_encoder(sys.argv[1])\n    print('loaded')\n"
              "except Exception as exc:\n    print('refused:', exc)\n")
    res = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), "code from the model folder ran"
    assert res.stdout.startswith("loaded"), res.stdout  # with transformers' own T5 tokenizer class
