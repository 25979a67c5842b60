"""The Hugging Face path, offline: a fake hub cache, converted once, reused; missing files listed in one message."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fixtures_model import make_upstream_sources

torch = pytest.importorskip("torch")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLI = [sys.executable, "-c", "from starflow_mlx.apps.cli import main; main()"]


def add_to_cache(cache, repo, files):
    """Lay files out the way huggingface_hub caches a repo snapshot."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        shutil.copy(src, snap / name)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    src = make_upstream_sources(tmp / "src")
    cache = tmp / "hf-cache"
    add_to_cache(cache, "fake/starflow", {"model.pth": src["checkpoint"], "config.yaml": src["config"]})
    t5_files = sorted(p.name for p in src["text_encoder"].iterdir())
    add_to_cache(cache, "fake/t5", {n: src["text_encoder"] / n for n in t5_files})
    add_to_cache(cache, "fake/vae", {n: src["vae"] / n for n in ("config.json", "diffusion_pytorch_model.safetensors")})
    registry = {
        "models": {"fake/starflow": {"flow": {"repo": "fake/starflow", "checkpoint": "model.pth", "config": "config.yaml"},
                                     "text_encoder": "fake/t5", "vae": "fake/vae", "decoder": None, "dtype": "float32"},
                   "fake/incomplete": {"flow": {"repo": "fake/starflow", "checkpoint": "model.pth",
                                                "config": "missing.yaml"},
                                       "text_encoder": "fake/t5", "vae": "fake/absent", "decoder": None}},
        "components": {"fake/t5": t5_files, "fake/vae": ["config.json", "diffusion_pytorch_model.safetensors"],
                       "fake/absent": ["config.json"]},
    }
    (tmp / "registry.json").write_text(json.dumps(registry))
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", STARFLOW_MLX_REGISTRY=str(tmp / "registry.json"),
               STARFLOW_MLX_CACHE=str(tmp / "converted"))
    return tmp, env


def run(env, *args):
    return subprocess.run([*CLI, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def test_offline_download_converts_once_then_reuses(hub):
    tmp, env = hub
    first = run(env, "generate", "a cat", "--model", "fake/starflow", "-o", tmp / "a.png")
    assert first.returncode == 0, first.stderr
    folder = tmp / "converted" / "fake--starflow"
    assert (folder / "starflow.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    second = run(env, "generate", "a cat", "--model", "fake/starflow", "-o", tmp / "b.png")
    assert second.returncode == 0, second.stderr
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again
    assert (tmp / "a.png").read_bytes() == (tmp / "b.png").read_bytes()


def test_offline_missing_files_are_listed_in_one_message(hub):
    tmp, env = hub
    res = run(env, "generate", "a cat", "--model", "fake/incomplete", "-o", tmp / "c.png")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "fake/starflow/missing.yaml" in lines[0] and "fake/absent/config.json" in lines[0]
    assert "huggingface-cli download" in lines[0] and "offline" in lines[0]
    assert not (tmp / "c.png").exists() and not (tmp / "converted" / "fake--incomplete").exists()


def test_unknown_repo_names_the_known_ones(hub):
    tmp, env = hub
    res = run(env, "generate", "a cat", "--model", "nobody/nothing", "-o", tmp / "d.png")
    assert res.returncode == 1 and "known models are fake/incomplete, fake/starflow" in res.stderr
