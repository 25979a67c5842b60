"""The Wan2.2 video VAE: parity with upstream, causality and streaming, loading, hostile files, dtypes.

tests/golden/wan_vae.safetensors holds a reduced-width Wan2.2 VAE (real topology) and
what upstream misc/wan_vae2.py computed with it (recipe in tests/golden/README.md).
"""

import json
import os
import pickle
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from fixtures_wan_vae import make_tiny_wan_vae, random_state, wan_vae_shapes
from starflow_mlx import load_video_vae
from starflow_mlx.convert.wan_vae_weights import WanVAEConversionError, convert_wan_vae, mlx_layout
from starflow_mlx.io.loading import ModelLoadError
from starflow_mlx.models.wan_vae import WanVAE, WanVAEConfig
from starflow_mlx.io.video_vae import VideoVAE

GOLDEN = Path(__file__).parent / "golden" / "wan_vae.safetensors"
TOL = 1e-4
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), "np") as f:
        meta = json.loads(f.metadata()["config"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    config = WanVAEConfig(**{k: meta[k] for k in ("dim", "dec_dim", "z_dim", "dim_mult", "num_res_blocks",
                                                  "temperal_downsample")})
    model = WanVAE(config)
    model.load_weights([(k[8:], mx.array(mlx_layout(k[8:], v.astype(np.float32))))
                        for k, v in arrays.items() if k.startswith("weights.")], strict=True)
    return VideoVAE(model), arrays


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    return make_tiny_wan_vae(tmp_path_factory.mktemp("wan") / "src")


def latents(shape=(1, 3, 2, 3, 48), seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


def test_real_size_has_upstream_tensor_count_and_parameters():
    shapes = wan_vae_shapes(WanVAEConfig())
    assert len(shapes) == 196
    assert sum(int(np.prod(s)) for s in shapes.values()) == 704_688_668
    assert shapes["decoder.upsamples.0.upsamples.3.time_conv.weight"] == (2048, 1024, 3, 1, 1)
    assert shapes["decoder.middle.1.to_qkv.weight"] == (3072, 1024, 1, 1)
    assert shapes["encoder.middle.1.norm.gamma"] == (640, 1, 1)


def test_encode_matches_upstream(golden):
    vae, g = golden
    z = vae.encode(g["in.video"].astype(np.float32))
    assert z.shape == (1, 3, 1, 3, 48) and z.dtype == mx.float32
    assert rel_err(z, g["out.encode"]) <= TOL


def test_decode_matches_upstream(golden):
    vae, g = golden
    x = vae.decode(g["in.latents"].astype(np.float32))
    assert x.shape == (1, 9, 32, 16, 3) and x.dtype == mx.float32
    assert rel_err(x, g["out.decode"]) <= TOL


def test_image_encode_is_the_first_latent_of_the_clip(golden):
    vae, g = golden
    video = g["in.video"].astype(np.float32)
    image = vae.encode(video[:, :1])
    assert image.shape == (1, 1, 1, 3, 48)
    assert rel_err(image, g["out.encode"][:, :1]) <= TOL
    # Frames past the last whole 4-frame chunk are dropped, as upstream does: 7 frames -> 2 latents.
    assert vae.encode(video[:, :7]).shape[1] == 2


def test_streamed_decode_is_the_whole_decode_and_causal(golden):
    vae, g = golden
    z = mx.array(g["in.latents"].astype(np.float32))
    chunks = list(vae.decode_frames(z))
    assert [c.shape[1] for c in chunks] == [1, 4, 4] and all(c.dtype == mx.float32 for c in chunks)
    assert rel_err(mx.concatenate(chunks, axis=1), g["out.decode"]) <= TOL
    head = vae.decode(z[:, :2])
    assert head.shape[1] == 5
    assert rel_err(head, g["out.decode"][:, :5]) <= TOL


def test_streaming_keeps_one_fixed_cache_and_compiles_later_chunks(golden):
    vae, _ = golden
    z = latents((1, 5, 1, 2, 48))
    x = vae.model.decoder_input(z)
    _, first = vae.model.decode_first(x[:, :1])
    out, *second = vae.model.decode_chunk(x[:, 1:2], *first)
    _, *third = vae.model.decode_chunk(x[:, 2:3], *second)
    assert [e.shape for e in first] == [e.shape for e in second] == [e.shape for e in third]
    compiled = mx.concatenate(list(vae.decode_frames(z)), axis=1)
    eager = mx.concatenate([vae.model.decode_first(x[:, :1])[0], out], axis=1)
    assert rel_err(compiled[:, :5], eager) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 5, 24, 32, 3), (1, 5, 32, 40, 3), (1, 5, 32, 32, 4), (5, 32, 32, 3)])
def test_bad_video_shapes_are_one_clear_error(golden, shape):
    vae, _ = golden
    with pytest.raises(ValueError, match="multiples of 16|channels-last"):
        vae.encode(np.zeros(shape, np.float32))


def test_bad_latent_shapes_are_one_clear_error(golden):
    vae, _ = golden
    with pytest.raises(ValueError, match=r"\(B, T_lat, h, w, 48\)"):
        vae.decode(np.zeros((1, 2, 2, 2, 16), np.float32))


def test_properties(golden):
    vae, _ = golden
    assert (vae.factor, vae.temporal_factor, vae.latent_channels, vae.has_encoder) == (16, 4, 48, True)
    assert vae.dtype == mx.float32


def test_pth_folder_converted_folder_and_hub_load_the_same_model(tiny_pth, tmp_path, monkeypatch):
    z = latents()
    want = load_video_vae(tiny_pth).decode(z)
    assert want.shape == (1, 9, 32, 48, 3)
    assert mx.array_equal(load_video_vae(tiny_pth.parent).decode(z), want)
    config = convert_wan_vae(tiny_pth, tmp_path / "converted")
    assert (config.dim, config.dec_dim, config.dim_mult, config.temperal_downsample) == (4, 4, [1, 2, 4, 4],
                                                                                        [False, True, True])
    # (plus the project's own-folder marker, which lets --force replace it later)
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == [".starflow-mlx", "config.json",
                                                                          "model.safetensors"]
    assert mx.array_equal(load_video_vae(tmp_path / "converted").decode(z), want)

    snap = tmp_path / "hf" / "models--Wan-AI--Wan2.2-TI2V-5B" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    os.symlink(tiny_pth, snap / "Wan2.2_VAE.pth")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert mx.array_equal(load_video_vae("Wan-AI/Wan2.2-TI2V-5B").decode(z), want)


def test_missing_hub_file_and_missing_paths_are_named(tmp_path, monkeypatch):
    from starflow_mlx.io.hub import HubError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="Wan2.2_VAE.pth") as err:
        load_video_vae("Wan-AI/Wan2.2-TI2V-5B")
    assert "download Wan-AI/Wan2.2-TI2V-5B Wan2.2_VAE.pth" in str(err.value)  # the hub's fetch instructions
    with pytest.raises(ModelLoadError, match="not found"):
        load_video_vae(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="holds neither"):
        load_video_vae(tmp_path)


def test_decoder_only_conversion_and_dtypes(tiny_pth, tmp_path):
    config = convert_wan_vae(tiny_pth, tmp_path / "dec", dtype="bfloat16", include_encoder=False)
    assert not config.has_encoder and config.dtype == "bfloat16"
    with safe_open(str(tmp_path / "dec" / "model.safetensors"), "np") as f:
        assert not any(k.startswith(("encoder.", "conv1.")) for k in f.keys())
    vae = load_video_vae(tmp_path / "dec")
    assert vae.dtype == mx.bfloat16 and not vae.has_encoder
    with pytest.raises(ValueError, match="without its encoder"):
        vae.encode(np.zeros((1, 1, 16, 16, 3), np.float32))
    z = latents((1, 2, 1, 2, 48))
    want = load_video_vae(tiny_pth).decode(z)
    half = load_video_vae(tiny_pth, dtype="float16")
    assert half.dtype == mx.float16
    got = half.decode(z)
    # Error model: a dtype's relative rounding (2^-11 float16, 2^-8 bfloat16) times what this decoder's depth
    # amplifies it by, about 12 (float16's measured 6.0e-3 / 2^-11), with a 1.5x margin: float16 < 8.8e-3,
    # bfloat16 < 7.0e-2 (measured 3.1e-2). bfloat16 must also be the less precise, or it did not run in bfloat16.
    amplification = 1.5 * 12
    assert got.dtype == mx.float32 and rel_err(got, want) < amplification * 2**-11
    assert rel_err(got, want) < rel_err(vae.decode(z), want) < amplification * 2**-8
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_video_vae(tiny_pth, dtype="float64")
    with pytest.raises(WanVAEConversionError, match="dtype must be one of"):
        convert_wan_vae(tiny_pth, tmp_path / "bad", dtype="int8")
    with pytest.raises(WanVAEConversionError, match="already exists"):
        convert_wan_vae(tiny_pth, tmp_path / "dec")


def _save_state(tmp_path, edit):
    import torch

    state = random_state(WanVAEConfig(dim=2, dec_dim=2))
    edit(state, torch)
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s, t: s.pop("decoder.upsamples.1.upsamples.2.residual.6.bias"),
     "lacks decoder.upsamples.1.upsamples.2.residual.6.bias"),
    (lambda s, t: s.update({"decoder.extra.weight": t.zeros(2)}), "unexpected tensor decoder.extra.weight"),
    (lambda s, t: s.update({"decoder.middle.1.proj.weight": t.zeros(8, 8, 3, 3)}),
     "decoder.middle.1.proj.weight has shape"),
    (lambda s, t: s.pop("encoder.conv1.weight"), "lacks encoder.conv1.weight"),
])
def test_broken_checkpoints_name_the_tensor(tmp_path, edit, message):
    path = _save_state(tmp_path, edit)
    for load in (lambda: load_video_vae(path), lambda: convert_wan_vae(path, tmp_path / "out")):
        with pytest.raises((ModelLoadError, WanVAEConversionError), match=message) as err:
            load()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


class _Hostile:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_hostile_pickle_is_refused_and_never_run(tmp_path):
    import torch

    sentinel = tmp_path / "pwned"
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save({"conv2.weight": torch.zeros(48, 48, 1, 1, 1), "payload": _Hostile(sentinel)}, path)
    with pytest.raises(ModelLoadError, match="system"):
        load_video_vae(path)
    with pytest.raises(WanVAEConversionError, match="system"):
        convert_wan_vae(path, tmp_path / "out")
    (tmp_path / "garbage.pth").write_bytes(pickle.dumps([1, 2]) + b"junk")
    with pytest.raises(ModelLoadError):
        load_video_vae(tmp_path / "garbage.pth")
    assert not sentinel.exists()


def test_broken_converted_config_is_one_line(tiny_pth, tmp_path):
    convert_wan_vae(tiny_pth, tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**data, "z_dim": 16}))
    with pytest.raises(ModelLoadError, match="z_dim must be 48"):
        load_video_vae(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({**data, "dim_mult": [1, 2, 4]}))
    with pytest.raises(ModelLoadError, match="temperal_downsample"):
        load_video_vae(tmp_path / "c")


def test_spatial_tiling_is_off_by_default_and_blends_tiles(tiny_pth):
    vae = load_video_vae(tiny_pth)
    assert vae.tile is None
    z = latents((1, 2, 5, 7, 48), seed=1)
    whole = vae.decode(z)
    vae.tile = 8  # one tile covers the grid: nothing changes
    assert mx.array_equal(vae.decode(z), whole)
    vae.tile = 4  # tiles (0,4),(1,5) down and (0,4),(3,7) across
    tiled = vae.decode(z)
    assert tiled.shape == whole.shape and bool(mx.isfinite(tiled).all())
    # Cells covered by one tile only (row 0, columns 0-2) are that tile's own decode.
    alone = load_video_vae(tiny_pth).decode(z[:, :, 0:4, 0:4])
    assert rel_err(tiled[:, :, :16, :48], alone[:, :, :16, :48]) <= 1e-5
    assert rel_err(tiled, whole) > 1e-3  # tiling changes pixels: why it is off by default
    vae.tile = 1
    with pytest.raises(ValueError, match="at least 2"):
        vae.decode(z)


def test_tiled_decode_is_each_tiles_own_decode_blended_by_linear_ramps(tiny_pth):
    """Ground truth for the seams: every tile decoded on its own (its own causal past), weighted by a ramp that
    rises linearly over a quarter tile from each side it shares with another tile (1 elsewhere inside it, 0
    outside), and normalised by the sum of the weights. Written here in numpy from that rule alone."""
    z = latents((1, 2, 5, 7, 48), seed=1)
    vae = load_video_vae(tiny_pth)
    vae.tile = 4
    tiled = np.array(vae.decode(z), np.float64)
    f, ramp = vae.factor, max(1, 4 // 4) * vae.factor

    def axis_weight(lo, hi, size):
        p = np.arange(size * f) + 0.5  # pixel centres
        left = (p - lo * f) / ramp if lo > 0 else np.ones_like(p)
        right = (hi * f - p) / ramp if hi < size else np.ones_like(p)
        return np.where((p > lo * f) & (p < hi * f), np.clip(np.minimum(left, right), 0, 1), 0)

    total = np.zeros(tiled.shape[2:4])
    blended = np.zeros_like(tiled)
    for y0, y1 in [(0, 4), (1, 5)]:
        for x0, x1 in [(0, 4), (3, 7)]:
            own = np.array(load_video_vae(tiny_pth).decode(z[:, :, y0:y1, x0:x1]), np.float64)
            weight = np.outer(axis_weight(y0, y1, 5), axis_weight(x0, x1, 7))
            blended[:, :, y0 * f:y1 * f, x0 * f:x1 * f] += own * weight[y0 * f:y1 * f, x0 * f:x1 * f, None]
            total += weight
    expected = blended / total[..., None]
    assert (total > 0).all()
    # float32 decodes and blends of values below 2: 1e-5 of the peak covers their rounding.
    assert rel_err(tiled, expected) < 1e-5
