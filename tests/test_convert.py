"""`starflow convert`: upstream .pth + YAML -> MLX folder, and every way it must refuse."""

import pickle
import re
import zipfile

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from flow_factory import IMAGE, random_flow
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.io.loading import load_flow

torch = pytest.importorskip("torch")
register(app)
runner = CliRunner()

ARGS = [{"img_size": 32}, {"vae": "stabilityai/sd-vae-ft-ema"}, {"text": "google/flan-t5-xl"}, {"txt_size": 6},
        {"channel_size": 4}, {"patch_size": 1}, {"channels": 64}, {"head_dim": 32}, {"blocks": 4},
        {"layers_per_block": "1 0 1 2"}, {"noise_std": 0.3}, {"rope": 1}, {"sos": 1}, {"seq_order": "L2R"},
        {"use_softplus": 1}, {"cond_top_only": 1}, {"use_final_norm": 1}, {"cfg": 2.5}, {"soft_clip": 4}]


def upstream_state(flow, prefix="module."):
    """The flow's weights under upstream names, wrapped like a DDP checkpoint, with deprecated buffers."""
    state = {prefix + k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(flow.parameters())}
    state[prefix + "var"] = torch.ones(16, 4)
    state[prefix + "feat_rope.freqs_cos"] = torch.zeros(22, 32)
    state[prefix + "blocks.3.attn_mask"] = torch.ones(22, 22)
    return state


@pytest.fixture
def upstream(tmp_path):
    flow = random_flow(**IMAGE)
    torch.save(upstream_state(flow), tmp_path / "ckpt.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    return flow, tmp_path / "ckpt.pth", tmp_path / "config.yaml"


def convert(ckpt, config, out, *extra):
    return runner.invoke(app, ["convert", str(ckpt), "--config", str(config), "--output", str(out), *extra])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_convert_round_trip(upstream, tmp_path, dtype):
    flow, ckpt, config = upstream
    res = convert(ckpt, config, tmp_path / "out", "--dtype", dtype)
    assert res.exit_code == 0, res.output
    loaded = load_flow(tmp_path / "out")
    cfg = loaded.config
    assert (cfg.latent_size, cfg.txt_dim, cfg.vae_factor, cfg.cfg, cfg.noise_std) == (4, 24, 8, 2.5, 0.3)
    assert cfg.text_encoder == "google/flan-t5-xl" and cfg.vae == "stabilityai/sd-vae-ft-ema"
    ours = dict(tree_flatten(loaded.parameters()))
    for name, value in tree_flatten(flow.parameters()):
        assert ours[name].dtype == getattr(mx, dtype)
        tol = 0 if dtype == "float32" else (1e-3 if dtype == "float16" else 1e-2)
        assert np.allclose(np.array(ours[name].astype(mx.float32)), np.array(value), atol=tol, rtol=tol), name
    x, y = mx.random.normal((1, 4, 4, 4)), mx.random.normal((1, 6, 24))
    if dtype == "float32":
        assert mx.allclose(loaded.forward(x, y)[0], flow.forward(x, y)[0])


def test_fsdp_and_compile_prefixes_are_stripped(tmp_path):
    flow = random_flow(**IMAGE)
    state = {re.sub(r"^blocks\.", "_orig_mod.blocks.", k).replace(".attn_blocks.", "._fsdp_wrapped_module.attn_blocks."): v
             for k, v in upstream_state(flow, prefix="").items()}
    assert any("_fsdp_wrapped_module" in k for k in state)
    torch.save(state, tmp_path / "c.pth")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"arguments": ARGS}))
    res = convert(tmp_path / "c.pth", tmp_path / "c.yaml", tmp_path / "out")
    assert res.exit_code == 0, res.output


def refuses(res, out, *words):
    assert res.exit_code != 0
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_unknown_and_misshapen_keys(upstream, tmp_path):
    flow, ckpt, config = upstream
    state = torch.load(ckpt)
    del state["module.blocks.3.proj_txt.bias"]
    torch.save(state, tmp_path / "missing.pth")
    refuses(convert(tmp_path / "missing.pth", config, tmp_path / "o1"), tmp_path / "o1", "blocks.3.proj_txt.bias")
    state = torch.load(ckpt)
    state["module.blocks.0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    refuses(convert(tmp_path / "extra.pth", config, tmp_path / "o2"), tmp_path / "o2", "blocks.0.extra.weight")
    other = yaml.safe_dump({"arguments": ARGS + [{"channels": 128}]})
    (tmp_path / "other.yaml").write_text(other)
    refuses(convert(ckpt, tmp_path / "other.yaml", tmp_path / "o3"), tmp_path / "o3")


def test_broken_and_hostile_files(upstream, tmp_path):
    _, ckpt, config = upstream
    data = ckpt.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    refuses(convert(tmp_path / "trunc.pth", config, tmp_path / "o1"), tmp_path / "o1")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    refuses(convert(tmp_path / "junk.pth", config, tmp_path / "o2"), tmp_path / "o2")
    refuses(convert(tmp_path / "none.pth", config, tmp_path / "o3"), tmp_path / "o3", "none.pth")
    refuses(convert(ckpt, tmp_path / "none.yaml", tmp_path / "o4"), tmp_path / "o4", "none.yaml")
    (tmp_path / "bad.yaml").write_text("arguments: [unclosed")
    refuses(convert(ckpt, tmp_path / "bad.yaml", tmp_path / "o5"), tmp_path / "o5", "YAML")

    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return os.system, (f"touch {sentinel}",)

    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"blocks.0.proj_in.weight": Exploit()}, protocol=2))
        zf.writestr("archive/version", "3\n")
    refuses(convert(tmp_path / "evil.pth", config, tmp_path / "o6"), tmp_path / "o6", "system")
    assert not sentinel.exists()


def test_existing_output_is_not_overwritten(upstream, tmp_path):
    _, ckpt, config = upstream
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = convert(ckpt, config, out)
    assert res.exit_code != 0 and "already exists" in res.output
    assert (out / "keep.txt").read_text() == "mine"
