"""T5 encoder, its converter and TextEncoder against transformers on tiny random models built offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from fixtures_t5 import TINY, make_tiny_t5, tiny_t5
from starflow_mlx.config import ConfigError
from starflow_mlx.convert.t5_weights import T5ConversionError, convert_t5
from starflow_mlx.io.loading import ModelLoadError
from starflow_mlx.models.t5 import T5Config, T5Encoder, relative_position_bucket
from starflow_mlx.io.text_encoder import load_text_encoder

PROMPTS = ["a photo of a cat sitting on a red chair, the quick brown fox jumps over the lazy dog",
           "an astronaut", "zebra xylophone!"]
MAX_LENGTH = 24  # past relative distance 8, so the logarithmic buckets are exercised


def rel_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("t5") / "hf")


@pytest.fixture(scope="module")
def converted(hf_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("t5_mlx") / "mlx"
    convert_t5(hf_folder, out, dtype="float32")
    return out


@pytest.fixture(scope="module")
def reference(hf_folder):
    """Hidden states from transformers, and the token ids and mask they came from."""
    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder), local_files_only=True)
    batch = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    model = T5EncoderModel.from_pretrained(str(hf_folder)).eval()
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return hidden.numpy(), batch.input_ids.numpy(), batch.attention_mask.numpy()


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 16), (32, 20)])
def test_relative_position_buckets_match_transformers(buckets, distance):
    rel = np.arange(-300, 301)
    ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), True, buckets, distance).numpy()
    ours = relative_position_bucket(mx.array(rel), buckets, distance)
    np.testing.assert_array_equal(np.array(ours), ref)


def test_hidden_states_match_transformers_with_padding(converted, reference):
    hidden, ids, mask = reference
    assert mask.min() == 0, "the prompts must produce padding"
    model = load_text_encoder(converted).model
    ours = model(mx.array(ids), mx.array(mask))
    assert ours.dtype == mx.float32
    assert rel_error(ours, hidden) < 1e-4


def test_text_encoder_zeroes_padding_and_matches(converted, reference):
    hidden, ids, mask = reference
    encoder = load_text_encoder(converted)
    ids_ours, mask_ours = encoder.tokenize(PROMPTS, MAX_LENGTH)
    np.testing.assert_array_equal(np.array(ids_ours), ids)
    features = encoder.encode(PROMPTS, MAX_LENGTH)
    assert features.shape == (len(PROMPTS), MAX_LENGTH, 32) and features.dtype == mx.float32
    features = np.array(features)
    assert np.all(features[mask == 0] == 0)
    assert rel_error(features, hidden * mask[..., None]) < 1e-4


def test_truncation_at_max_length(converted, hf_folder):
    encoder = load_text_encoder(converted)
    prompt = PROMPTS[0]
    needed = encoder.count_tokens(prompt)
    assert needed > 8
    ids, mask = encoder.tokenize([prompt], 8)
    assert np.array(mask).all() and int(ids[0, -1]) == encoder.tokenizer.eos_token_id
    model = T5EncoderModel.from_pretrained(str(hf_folder)).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(np.array(ids)).long()).last_hidden_state.numpy()
    features = encoder.encode(prompt, 8)
    assert features.shape == (1, 8, 32)
    assert rel_error(features, ref) < 1e-4
    assert encoder.count_tokens("an astronaut") == len(encoder.tokenizer("an astronaut").input_ids)


@pytest.mark.parametrize("dtype,tolerance", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_conversion(hf_folder, reference, tmp_path, dtype, tolerance):
    hidden, _, mask = reference
    out = tmp_path / dtype
    assert convert_t5(hf_folder, out, dtype=dtype).dtype == dtype
    stored = mx.load(str(out / "model.safetensors"))
    assert stored["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == getattr(mx, dtype)
    assert stored["encoder.final_layer_norm.weight"].dtype == mx.float32
    features = load_text_encoder(out).encode(PROMPTS, MAX_LENGTH)
    assert features.dtype == mx.float32
    assert rel_error(features, hidden * mask[..., None]) < tolerance


def test_load_dtype_casts_all_but_norms(converted):
    model = load_text_encoder(converted, dtype="float16").model
    block = model.encoder.block[0].layer
    assert block[0].SelfAttention.q.weight.dtype == mx.float16 and model.encoder.embed_tokens.weight.dtype == mx.float16
    assert block[1].layer_norm.weight.dtype == mx.float32


def test_pytorch_bin_converts_to_the_same_weights(tmp_path, converted):
    src = make_tiny_t5(tmp_path / "hf_bin", safe_serialization=False)
    assert (src / "pytorch_model.bin").is_file() and not (src / "model.safetensors").exists()
    convert_t5(src, tmp_path / "out", dtype="float32")
    ours, ref = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert sorted(ours) == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


def test_sharded_encoder_only_folder(tmp_path):
    src = make_tiny_t5(tmp_path / "hf", encoder_only=True)
    convert_t5(src, tmp_path / "whole", dtype="float32")
    state = load_file(str(src / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(src / shard))
    (src / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_t5(src, tmp_path / "sharded", dtype="float32")
    ours, ref = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("sharded", "whole"))
    assert sorted(ours) == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


def test_original_t5_relu_feed_forward(tmp_path):
    src = make_tiny_t5(tmp_path / "hf", encoder_only=True, feed_forward_proj="relu", seed=1)
    convert_t5(src, tmp_path / "out", dtype="float32")
    encoder = load_text_encoder(tmp_path / "out")
    ids, mask = encoder.tokenize(PROMPTS, MAX_LENGTH)
    model = T5EncoderModel.from_pretrained(str(src)).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(np.array(ids)).long(),
                    attention_mask=torch.from_numpy(np.array(mask))).last_hidden_state.numpy()
    assert rel_error(encoder.model(ids, mask), ref) < 1e-4


def test_config_round_trip_and_validation():
    config = T5Config.from_hf_dict({"model_type": "t5", "d_model": 64, "feed_forward_proj": "gated-gelu"})
    assert config.activation == "gelu_new" and config.is_gated and config.d_ff == 2048
    assert T5Config.from_dict(config.to_dict()) == config
    assert T5Config.from_hf_dict({"model_type": "t5"}).feed_forward_proj == "relu"
    with pytest.raises(ConfigError, match="not a T5 model"):
        T5Config.from_hf_dict({"model_type": "bert"})
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-swish")


def test_parameter_names_are_transformers_encoder_names():
    hf_names = set(tiny_t5(encoder_only=True).state_dict()) - {"shared.weight"}
    config = T5Config.from_hf_dict({**TINY, "model_type": "t5"})
    assert {name for name, _ in tree_flatten(T5Encoder(config).parameters())} == hf_names


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_conversion_errors(hf_folder, tmp_path):
    def broken(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(hf_folder, folder)
        return folder

    with pytest.raises(T5ConversionError) as exc:
        convert_t5(tmp_path / "nowhere", tmp_path / "o1")
    assert "not found" in one_line(exc)
    (broken("no_config") / "config.json").unlink()
    with pytest.raises(T5ConversionError) as exc:
        convert_t5(tmp_path / "no_config", tmp_path / "o2")
    assert "no config.json" in one_line(exc)
    folder = broken("bert")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(T5ConversionError) as exc:
        convert_t5(folder, tmp_path / "o3")
    assert "not a T5 model" in one_line(exc)
    (broken("no_weights") / "model.safetensors").unlink()
    with pytest.raises(T5ConversionError) as exc:
        convert_t5(tmp_path / "no_weights", tmp_path / "o4")
    assert "model.safetensors" in one_line(exc)
    folder = broken("missing_key")
    state = load_file(str(folder / "model.safetensors"))
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(T5ConversionError) as exc:
        convert_t5(folder, tmp_path / "o5")
    assert "lacks encoder.block.1.layer.1.DenseReluDense.wo.weight" in one_line(exc)
    folder = broken("extra_key")
    state = load_file(str(folder / "model.safetensors"))
    state["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(T5ConversionError) as exc:
        convert_t5(folder, tmp_path / "o6")
    assert "unexpected tensor encoder.block.0.layer.0.SelfAttention.extra.weight" in one_line(exc)
    folder = broken("no_tokenizer")
    for name in ("tokenizer.json", "spiece.model"):
        (folder / name).unlink()
    with pytest.raises(T5ConversionError) as exc:
        convert_t5(folder, tmp_path / "o7")
    assert "tokenizer" in one_line(exc)
    convert_t5(folder, tmp_path / "o8", tokenizer_src=hf_folder)  # the tokenizer can come from elsewhere
    with pytest.raises(T5ConversionError) as exc:
        convert_t5(hf_folder, tmp_path / "o8")
    assert "not empty" in one_line(exc)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_load_errors(hf_folder, converted, tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_text_encoder(tmp_path / "nowhere")
    assert "not found" in one_line(exc)
    load_text_encoder(hf_folder)  # a Hugging Face folder loads directly (tests/test_hf_folders.py)
    folder = tmp_path / "no_weights"
    shutil.copytree(converted, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as exc:
        load_text_encoder(folder)
    assert "model.safetensors" in one_line(exc)
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(converted, folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ModelLoadError) as exc:
        load_text_encoder(folder)
    assert "tokenizer" in one_line(exc)
    folder = tmp_path / "small_vocab"
    shutil.copytree(converted, folder)
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    config["vocab_size"] = 16
    state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"][:16]
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError) as exc:
        load_text_encoder(folder)
    assert "do not belong together" in one_line(exc)
    encoder = load_text_encoder(converted)
    with pytest.raises(ValueError, match="no prompts"):
        encoder.encode([], 8)
