"""Models by Hugging Face repo id, offline against a fake hub cache: converted once, reused; gaps listed at once.

Nothing here reaches the network: HF_HUB_OFFLINE=1 and HF_HUB_CACHE points at a cache
laid out as huggingface_hub lays it out, holding tiny fake repos.
"""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from starflow_mlx.io import hub, resolve
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.convert.flow_checkpoint import ConversionError
from starflow_mlx.io.loading import load_flow

pytest.importorskip("torch")
pytest.importorskip("diffusers")
register(app)
runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def add_to_cache(cache, repo, files):
    """Lay files out the way huggingface_hub caches a snapshot of ``repo``'s main branch."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        shutil.copy(src, snap / name)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    from fixtures_model import make_upstream_sources

    tmp = tmp_path_factory.mktemp("hub")
    src = make_upstream_sources(tmp / "src")
    cache = tmp / "hf-cache"
    add_to_cache(cache, "fake/starflow", {"model.pth": src["checkpoint"], "config.yaml": src["config"]})
    t5_files = sorted(p.name for p in src["text_encoder"].iterdir())
    add_to_cache(cache, "fake/t5", {n: src["text_encoder"] / n for n in t5_files})
    add_to_cache(cache, "fake/vae", {n: src["vae"] / n for n in VAE_FILES})
    registry = {
        "models": {
            "fake/starflow": {"flow": {"repo": "fake/starflow", "checkpoint": "model.pth", "config": "config.yaml"},
                              "text_encoder": "fake/t5", "vae": "fake/vae", "decoder": None, "dtype": "float32"},
            "fake/incomplete": {"flow": {"repo": "fake/starflow", "checkpoint": "model.pth", "config": "missing.yaml"},
                                "text_encoder": "fake/t5", "vae": "fake/absent"},
        },
        "components": {"fake/t5": t5_files, "fake/vae": VAE_FILES, "fake/absent": VAE_FILES},
    }
    (tmp / "registry.json").write_text(json.dumps(registry))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "STARFLOW_MLX_REGISTRY": str(tmp / "registry.json"),
           "STARFLOW_MLX_CACHE": str(tmp / "converted")}
    return tmp, src, env


@pytest.fixture
def offline(fake_hub, monkeypatch):
    tmp, src, env = fake_hub
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return tmp, src


def test_registry_names_real_files_for_apple_starflow():
    entry = hub.load_registry()["models"]["apple/starflow"]
    files = hub.model_files(hub.load_registry(), "apple/starflow")
    assert entry["flow"]["checkpoint"] == "starflow_3B_t2i_256x256.pth"
    assert {f.repo for f in files["text_encoder"]} == {"google/flan-t5-xl"}
    assert {f.filename for f in files["vae"]} == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_converts_once_then_reuses(offline, monkeypatch, tmp_path):
    tmp, src = offline
    folder = resolve.ensure_model("fake/starflow")
    assert folder == tmp / "converted" / "fake--starflow--main"
    manifest = json.loads((folder / "starflow.json").read_text())
    assert manifest["kind"] == "text-to-image"
    assert manifest["source"]["checkpoint"] == f"fake/starflow@{COMMIT}/model.pth"
    assert manifest["source"]["text_encoder"] == f"fake/t5@{COMMIT}"
    # The converted flow holds exactly the checkpoint's weights.
    from fixtures_model import FLOW
    from flow_factory import random_flow

    ours = dict(tree_flatten(load_flow(folder).parameters()))
    assert all(mx.array_equal(ours[k], v) for k, v in tree_flatten(random_flow(0, **FLOW).parameters()))

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr("starflow_mlx.io.resolve.build_model_folder", no_second_conversion)
    assert resolve.ensure_model("fake/starflow") == folder
    res = runner.invoke(app, ["generate", "a cat", "--model", "fake/starflow", "-o", str(tmp_path / "cat.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cat.png").is_file()


def run_cli(env, *args):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "starflow"), *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def check_missing_message(res, why, out):
    """One line saying what is missing and why, one line of commands that fetch it: nothing else."""
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr
    assert lines[0].startswith("error: 3 file(s) of fake/starflow (1), fake/absent (2) missing from the Hugging "
                               "Face cache") and why in lines[0], res.stderr
    assert lines[1] == (f"  {hub.cli_name()} download fake/starflow missing.yaml && "
                        f"{hub.cli_name()} download fake/absent config.json diffusion_pytorch_model.safetensors")
    assert "Traceback" not in res.stderr and "Retrying" not in res.stderr
    assert not out.exists()


def test_missing_files_are_listed_in_one_message(fake_hub, tmp_path):
    tmp, _, env = fake_hub
    out = tmp_path / "c.png"
    res = run_cli(env, "generate", "a cat", "--model", "fake/incomplete", "-o", str(out))
    check_missing_message(res, "offline mode is on", out)
    assert not (tmp / "converted" / "fake--incomplete--main").exists()


def test_registered_model_offline_with_an_empty_cache_is_two_lines(tmp_path):
    """The default model with no network and nothing cached: the error line and the download commands."""
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1",
           "STARFLOW_MLX_CACHE": str(tmp_path / "converted")}
    out = tmp_path / "cat.png"
    res = run_cli(env, "generate", "a cat", "-o", str(out))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 2, res.stderr
    assert lines[0].startswith("error: ") and "offline mode is on" in lines[0] and "apple/starflow" in lines[0]
    assert lines[1].startswith(f"  {hub.cli_name()} download apple/starflow starflow_3B_t2i_256x256.pth")
    assert not out.exists() and not (tmp_path / "converted").exists()


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_hub_fails_at_once_with_the_offline_message(fake_hub, tmp_path):
    tmp, _, env = fake_hub
    url = f"http://127.0.0.1:{closed_port()}"
    online = {**{k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0"}
    out = tmp_path / "c.png"
    # The timeout bounds a hang; the old behaviour was minutes of "Retrying in 8s" per file.
    res = run_cli(online, "generate", "a cat", "--model", "fake/incomplete", "-o", str(out))
    check_missing_message(res, f"{url} cannot be reached", out)
    assert hub.hub_reachable(url) is False


def test_unknown_repo_names_the_known_ones(offline):
    with pytest.raises(hub.HubError, match="known models are apple/starflow, apple/starflow-v, fake/incomplete, fake/starflow"):
        resolve.ensure_model("nobody/nothing")


def test_convert_takes_repo_ids_for_the_components(offline, tmp_path):
    _, src = offline
    res = runner.invoke(app, ["convert", str(src["checkpoint"]), "--config", str(src["config"]), "--text-encoder",
                              "fake/t5", "--vae", "fake/vae", "--dtype", "float32", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "m" / "starflow.json").read_text())
    assert manifest["source"]["text_encoder"] == "fake/t5" and manifest["source"]["finetuned_decoder"] is None


def test_add_components_leaves_nothing_behind_on_failure(offline, tmp_path):
    from fixtures_vae import make_tiny_vae

    from starflow_mlx.convert.full_model import add_components
    from starflow_mlx.convert.flow_checkpoint import convert_checkpoint

    _, src = offline
    folder = tmp_path / "flow"
    convert_checkpoint(src["checkpoint"], src["config"], folder, dtype="float32")
    wrong_vae = make_tiny_vae(tmp_path / "vae2x")  # 2x downsampling; the flow was trained on an 8x VAE
    with pytest.raises(ConversionError, match="wrong VAE"):
        add_components(folder, src["text_encoder"], wrong_vae, dtype="float32")
    from starflow_mlx.io.staging import MARKER

    assert sorted(p.name for p in folder.iterdir() if p.name != MARKER) == ["config.json", "model.safetensors"]
    manifest = add_components(folder, "fake/t5", "fake/vae", dtype="float32")
    assert manifest.kind == "text-to-image" and (folder / "starflow.json").is_file()
    with pytest.raises(ConversionError, match="already has text_encoder"):
        add_components(folder, "fake/t5", "fake/vae")


def test_text_encoder_and_vae_load_from_repo_ids(offline):
    from starflow_mlx.io.text_encoder import load_text_encoder
    from starflow_mlx.io.vae import load_vae

    assert load_text_encoder("fake/t5", dtype="float32").encode(["a cat"], 8).shape[:2] == (1, 8)
    assert load_vae("fake/vae").factor >= 1
    with pytest.raises(hub.HubError, match="not a local folder and the model registry has no file list"):
        load_vae("nobody/vae")
