"""SD-VAE in MLX against diffusers' AutoencoderKL: conversion, parity, decoder replacement, refusals."""

import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from fixtures_vae import FACTOR8, make_tiny_vae, randomize, tiny_autoencoder  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from starflow_mlx.convert.vae_weights import VAEConversionError, convert_vae  # noqa: E402
from starflow_mlx.io.loading import ModelLoadError  # noqa: E402
from starflow_mlx.models.sd_vae import VAEConfig  # noqa: E402
from starflow_mlx.io.vae import load_vae  # noqa: E402

FP16_TOL = 5e-3  # float16 weights and activations against float32 diffusers, relative to the output's peak


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def ref_encode(model, x):
    """diffusers' posterior mean, channels-last and unscaled."""
    with torch.no_grad():
        mean = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
    return mean.permute(0, 2, 3, 1).numpy()


def ref_decode(model, z):
    with torch.no_grad():
        out = model.decode(torch.from_numpy(np.ascontiguousarray(z)).permute(0, 3, 1, 2)).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, its folder, converted float32 VAE)."""
    root = tmp_path_factory.mktemp("tiny")
    src = make_tiny_vae(root / "diffusers")
    convert_vae(src, root / "mlx", dtype="float32")
    return tiny_autoencoder(), src, load_vae(root / "mlx")


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 32, 48, 3)])
def test_encode_decode_match_diffusers(tiny, shape):
    model, _, vae = tiny
    x = images(shape)
    mean = ref_encode(model, x)
    latents = np.array(vae.encode(x))
    assert latents.shape == mean.shape == (shape[0], shape[1] // vae.factor, shape[2] // vae.factor, 4)
    assert rel_err(latents, mean * 0.18215) < 1e-4
    z = np.random.default_rng(1).normal(size=mean.shape).astype(np.float32)
    out = np.array(vae.decode(z))
    assert out.shape == shape and out.dtype == np.float32
    assert rel_err(out, ref_decode(model, z / 0.18215)) < 1e-4


def test_factor8_shift_and_scale(tmp_path):
    """SD's 8x depth, with a shift factor and no quant convs: latents = (mean - shift) * scale."""
    opts = dict(FACTOR8, scaling_factor=0.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False)
    config = convert_vae(make_tiny_vae(tmp_path / "src", seed=3, **opts), tmp_path / "mlx", dtype="float32")
    assert (config.scaling_factor, config.shift_factor, config.factor) == (0.5, 0.1, 8)
    model, vae = tiny_autoencoder(3, **opts), load_vae(tmp_path / "mlx")
    x = images((1, 32, 48, 3), seed=2)
    latents = np.array(vae.encode(x))
    assert latents.shape == (1, 4, 6, 4)
    assert rel_err(latents, (ref_encode(model, x) - 0.1) * 0.5) < 1e-4
    assert rel_err(np.array(vae.decode(latents)), ref_decode(model, latents / 0.5 + 0.1)) < 1e-4


def test_config_round_trip(tmp_path, tiny):
    _, src, _ = tiny
    config = VAEConfig.from_diffusers_dict(json.loads((src / "config.json").read_text()))
    assert config.block_out_channels == [32, 64] and config.norm_num_groups == 8 and config.shift_factor is None
    config.save(tmp_path / "config.json")
    assert VAEConfig.load(tmp_path / "config.json") == config
    # An old diffusers config omits most keys: diffusers' defaults apply.
    old = VAEConfig.from_diffusers_dict({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
                                         "layers_per_block": 2, "sample_size": 256})
    assert (old.scaling_factor, old.latent_channels, old.norm_num_groups, old.factor) == (0.18215, 4, 32, 8)


def test_float16_conversion(tmp_path, tiny):
    model, src, _ = tiny
    convert_vae(src, tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    assert all(v.dtype == mx.float16 for v in mx.load(str(tmp_path / "fp16" / "model.safetensors")).values())
    vae = load_vae(tmp_path / "fp16")
    x = images((1, 32, 48, 3))
    assert rel_err(vae.encode(x), ref_encode(model, x) * 0.18215) < FP16_TOL
    z = np.random.default_rng(1).normal(size=(1, 16, 24, 4)).astype(np.float32)
    assert rel_err(vae.decode(z), ref_decode(model, z / 0.18215)) < FP16_TOL
    # Casting back up on load gives float32 compute on the rounded weights.
    assert load_vae(tmp_path / "fp16", dtype="float32").dtype == mx.float32


def finetuned(model):
    """A copy of ``model`` with a different decoder and post_quant_conv, as noisy-latent fine-tuning leaves it."""
    tuned = tiny_autoencoder()
    tuned.load_state_dict(model.state_dict())
    randomize(tuned.decoder, 7)
    randomize(tuned.post_quant_conv, 8)
    return tuned


def old_attention_names(state):
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for name, value in state.items():
        for a, b in new.items():
            name = name.replace(f".attentions.0.{a}.", f".attentions.0.{b}.")
        out[name] = value
    return out


@pytest.mark.parametrize("form", ["autoencoder", "decoder-only", "bare-decoder-old-names", "diffusers-folder"])
def test_decoder_replacement(tmp_path, tiny, form):
    model, src, base = tiny
    tuned = finetuned(model)
    full = {k: v.contiguous() for k, v in tuned.state_dict().items()}
    if form == "autoencoder":
        dec_src = tmp_path / "tuned.safetensors"
        save_file(full, dec_src)
    elif form == "decoder-only":
        dec_src = tmp_path / "tuned.safetensors"
        save_file({k: v for k, v in full.items() if k.startswith(("decoder.", "post_quant_conv."))}, dec_src)
    elif form == "bare-decoder-old-names":
        # A bare Decoder state dict carries no post_quant_conv: the base VAE's is kept.
        dec_src = tmp_path / "decoder.safetensors"
        save_file(old_attention_names({k[8:]: v for k, v in full.items() if k.startswith("decoder.")}), dec_src)
        tuned.post_quant_conv.load_state_dict(model.post_quant_conv.state_dict())
    else:
        dec_src = tmp_path / "tuned"
        tuned.save_pretrained(dec_src)
    convert_vae(src, tmp_path / "mlx", dtype="float32", decoder_src=dec_src)
    vae = load_vae(tmp_path / "mlx")
    x = images((1, 32, 32, 3))
    assert np.array_equal(np.array(vae.encode(x)), np.array(base.encode(x)))  # encoder untouched
    z = np.random.default_rng(1).normal(size=(1, 16, 16, 4)).astype(np.float32)
    out = np.array(vae.decode(z))
    assert rel_err(out, ref_decode(tuned, z / 0.18215)) < 1e-4
    assert rel_err(out, ref_decode(model, z / 0.18215)) > 1e-2


def test_starflow_pth_decoder(tmp_path, tiny):
    """STARFlow's released decoder: a pickle with the VAE as nn.Sequential halves (encoder.0, decoder.1, ...)."""
    pytest.importorskip("starflow_mlx.convert.torch_pickle")
    model, src, _ = tiny
    tuned = finetuned(model)
    halves = {"encoder.": "encoder.0.", "quant_conv.": "encoder.1.", "post_quant_conv.": "decoder.0.",
              "decoder.": "decoder.1."}
    state = {}
    for name, value in old_attention_names(tuned.state_dict()).items():
        prefix = next(p for p in halves if name.startswith(p))
        state[halves[prefix] + name[len(prefix):]] = value.to(torch.bfloat16)
    torch.save(state, tmp_path / "pytorch_model.bin")
    convert_vae(src, tmp_path / "mlx", dtype="float32", decoder_src=tmp_path / "pytorch_model.bin")
    z = np.random.default_rng(1).normal(size=(1, 16, 16, 4)).astype(np.float32)
    tuned.decoder.to(torch.bfloat16).float()
    tuned.post_quant_conv.to(torch.bfloat16).float()
    assert rel_err(load_vae(tmp_path / "mlx").decode(z), ref_decode(tuned, z / 0.18215)) < 1e-4


def test_pickled_diffusers_folder(tmp_path):
    pytest.importorskip("starflow_mlx.convert.torch_pickle")
    src = make_tiny_vae(tmp_path / "src", seed=5, safe_serialization=False)
    convert_vae(src, tmp_path / "mlx", dtype="float32")
    x = images((1, 32, 32, 3))
    assert rel_err(load_vae(tmp_path / "mlx").encode(x), ref_encode(tiny_autoencoder(5), x) * 0.18215) < 1e-4


def one_line(excinfo, *words):
    text = str(excinfo.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, text


def test_conversion_refusals(tmp_path, tiny):
    _, src, _ = tiny
    with pytest.raises(VAEConversionError) as e:
        convert_vae(tmp_path / "nowhere", tmp_path / "a")
    one_line(e, "not found")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEConversionError) as e:
        convert_vae(tmp_path / "empty", tmp_path / "a")
    one_line(e, "no config.json")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(VAEConversionError) as e:
        convert_vae(tmp_path / "noweights", tmp_path / "a")
    one_line(e, "diffusion_pytorch_model.safetensors")
    with pytest.raises(VAEConversionError) as e:
        convert_vae(src, tmp_path / "a", dtype="int8")
    one_line(e, "dtype")
    with pytest.raises(VAEConversionError) as e:
        convert_vae(src, tmp_path / "noweights")
    one_line(e, "not empty")

    state = mx.load(str(src / "diffusion_pytorch_model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "up_block_types": ["AttnUpDecoderBlock2D"] * 2}))
    mx.save_safetensors(str(bad / "diffusion_pytorch_model.safetensors"), state)
    with pytest.raises(VAEConversionError) as e:
        convert_vae(bad, tmp_path / "a")
    one_line(e, "up_block_types")
    (bad / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(bad / "diffusion_pytorch_model.safetensors"),
                        {k: v for k, v in state.items() if k != "encoder.conv_in.bias"})
    with pytest.raises(VAEConversionError) as e:
        convert_vae(bad, tmp_path / "a")
    one_line(e, "lacks encoder.conv_in.bias")
    mx.save_safetensors(str(bad / "diffusion_pytorch_model.safetensors"), {**state, "encoder.extra": mx.zeros(1)})
    with pytest.raises(VAEConversionError) as e:
        convert_vae(bad, tmp_path / "a")
    one_line(e, "unexpected tensor encoder.extra")
    mx.save_safetensors(str(bad / "diffusion_pytorch_model.safetensors"),
                        {**state, "decoder.conv_in.weight": mx.zeros((64, 3, 3, 3))})
    with pytest.raises(VAEConversionError) as e:
        convert_vae(bad, tmp_path / "a")
    one_line(e, "decoder.conv_in.weight has shape")

    partial = tmp_path / "partial.safetensors"
    mx.save_safetensors(str(partial), {k: v for k, v in state.items()
                                       if k.startswith("decoder.") and k != "decoder.conv_out.weight"})
    with pytest.raises(VAEConversionError) as e:
        convert_vae(src, tmp_path / "a", decoder_src=partial)
    one_line(e, "lacks decoder.conv_out.weight")
    with pytest.raises(VAEConversionError) as e:
        convert_vae(src, tmp_path / "a", decoder_src=tmp_path / "missing.pth")
    one_line(e, "not found")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))


def test_load_refusals(tmp_path, tiny):
    _, src, _ = tiny
    with pytest.raises(ModelLoadError) as e:
        load_vae(tmp_path / "nowhere")
    one_line(e, "not found")
    load_vae(src)  # a diffusers folder loads directly (tests/test_hf_folders.py)
    convert_vae(src, tmp_path / "mlx", dtype="float32")
    (tmp_path / "mlx" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_vae(tmp_path / "mlx")
    one_line(e, "model.safetensors")
    (tmp_path / "mlx" / "config.json").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_vae(tmp_path / "mlx")
    one_line(e, "no config.json")


def test_input_checks(tiny):
    _, _, vae = tiny
    with pytest.raises(ValueError) as e:
        vae.encode(np.zeros((1, 3, 32, 32), np.float32))
    one_line(e, "channels-last")
    with pytest.raises(ValueError) as e:
        vae.encode(np.zeros((1, 33, 32, 3), np.float32))
    one_line(e, "multiples of 2")
    with pytest.raises(ValueError) as e:
        vae.decode(np.zeros((1, 4, 4, 3), np.float32))
    one_line(e, "(B, H, W, 4)")
