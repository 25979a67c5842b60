"""Adapter folders as a hostile input: the --lora / --lora-scale pairing, the folder and base-model checks and their
messages, and loading with the default scale (gaps found by mutation testing of ``io/adapters.py``).

An adapter folder may come from anyone: each refusal is pinned to its exact line, so a check that names the wrong
thing (``config.json`` for ``adapter.json``, ``None`` for the folder) or lets a wrong base through is seen.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import IMAGE, random_flow, save_flow
from starflow_mlx.config import FlowConfig
from starflow_mlx.io.adapters import (adapter_options, adapter_record, as_adapter_list, check_adapter, check_base,
                                      load_adapter, load_adapters, read_adapter_config)
from starflow_mlx.io.loading import load_flow
from starflow_mlx.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, AdapterError, base_identity,
                                      lora_layers, trainable_count)
from test_mutation_gaps_lora import make_adapter

TARGET = "blocks.0.attn_blocks.0.attention.qkv"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters-base") / "model"
    save_flow(random_flow(0, **IMAGE), folder)
    return folder


@pytest.mark.parametrize("lora, scale, expected", [
    (None, 1.0, ([], [])), (None, [1.0], ([], [])), (None, [], ([], [])),
    ("a", 0.5, (["a"], [0.5])),  # a string is one folder, not its letters
    (("a", "b"), (0.5,), (["a", "b"], [0.5, 0.5])),  # tuples as lists; one scale for every adapter
    (["a", "b"], [], (["a", "b"], [1.0, 1.0])),  # no scale: 1 each
    (["a", "b", "c"], [1, 2, 3], (["a", "b", "c"], [1.0, 2.0, 3.0])),  # one each, in order
])
def test_adapters_and_their_scales(lora, scale, expected):
    folders, scales = as_adapter_list(lora, scale)
    assert (folders, scales) == expected and all(type(s) is float for s in scales)


@pytest.mark.parametrize("scale", [0.5, 2.0, [1.0, 1.0]])
def test_a_scale_without_an_adapter_is_refused(scale):
    with pytest.raises(AdapterError) as refused:
        as_adapter_list(None, scale)
    assert str(refused.value) == "lora_scale is given without a LoRA adapter: add --lora ADAPTER"


def test_more_scales_than_adapters_is_refused_by_count():
    with pytest.raises(AdapterError) as refused:
        as_adapter_list(["a", "b"], [1.0, 2.0, 3.0])
    assert str(refused.value) == ("2 LoRA adapters but 3 scales: give one --lora-scale for all or one per --lora, "
                                  "in the same order")


@pytest.mark.parametrize("lora, scale, expected", [
    (None, None, (None, 1.0)), ([], [], (None, 1.0)),
    (["p"], None, ("p", 1.0)), (["p"], [0.5], ("p", 0.5)),  # one adapter: a folder and a number
    (["p", "q"], [0.5], (["p", "q"], [0.5, 0.5])), (["p", "q"], [0.5, 0.25], (["p", "q"], [0.5, 0.25])),
])
def test_repeated_options_as_a_job_records_them(lora, scale, expected, tmp_path):
    got = adapter_options([tmp_path / p for p in lora] if lora else lora, scale)
    folders = expected[0] if expected[0] is None else (str(tmp_path / expected[0]) if isinstance(expected[0], str)
                                                       else [str(tmp_path / p) for p in expected[0]])
    assert got == (folders, expected[1]) and type(got[1]) is type(expected[1])
    assert isinstance(got[0], (str, list, type(None))) and all(isinstance(p, str) for p in got[0] or [])


def test_a_scale_option_without_a_lora_option_is_refused():
    with pytest.raises(AdapterError, match="^lora_scale is given without a LoRA adapter"):
        adapter_options(None, [0.5])


def test_metadata_names_local_adapters_by_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert adapter_record(None) is None
    assert adapter_record("a") == str(tmp_path / "a")
    assert adapter_record("user/repo") == "user/repo"  # not a local folder: as given
    assert adapter_record(["a", "b", "user/repo"]) == [str(tmp_path / "a"), str(tmp_path / "b"), "user/repo"]


def test_saved_weights_say_they_are_mlx(base, tmp_path):
    folder = make_adapter(base, tmp_path / "a", rank=2, alpha=2.0)
    weights, metadata = mx.load(str(folder / ADAPTER_WEIGHTS), return_metadata=True)
    assert metadata == {"format": "mlx"} and weights and all(k.endswith((".lora_a", ".lora_b")) for k in weights)


def test_a_missing_folder_or_a_file_is_not_found(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "none", tmp_path / "file"):
        with pytest.raises(AdapterError) as refused:
            read_adapter_config(path)
        assert str(refused.value) == f"LoRA adapter {path} not found: pass the folder starflow train --lora wrote"


@pytest.mark.parametrize("present, missing", [(ADAPTER_CONFIG, ADAPTER_WEIGHTS), (ADAPTER_WEIGHTS, ADAPTER_CONFIG)])
def test_a_folder_missing_either_file_names_it(tmp_path, present, missing):
    (tmp_path / present).write_text("{}")
    with pytest.raises(AdapterError) as refused:
        read_adapter_config(tmp_path)
    assert str(refused.value) == f"{tmp_path} has no {missing}: it is not a complete LoRA adapter (train it again)"


@pytest.mark.parametrize("change, reason", [
    ({"targets": ["text_encoder.weight"]}, "target 'text_encoder.weight' is not an attention or MLP linear of a flow"),
    ({"targets": [TARGET, "blocks.3.attn_blocks.0.mlp.main.0", TARGET]}, f"target {TARGET!r} is listed more than once"),
    ({"format": 2}, "format 2 is not the format 1 this starflow-mlx reads: update starflow-mlx, or train the adapter "
                    "again with this one"),
])
def test_a_config_with_bad_targets_is_refused_naming_its_file(base, tmp_path, change, reason):
    """Checked by the config itself, after its fields: the file is named all the same, as for any other field (with
    several adapters the line says which one). A repeated target was refused as "not a linear layer" of the model;
    a later format loaded as this one."""
    folder = make_adapter(base, tmp_path / "a", rank=2, alpha=2.0)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["format"] == 1
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
    with pytest.raises(AdapterError) as refused:
        load_flow(base, lora=[make_adapter(base, tmp_path / "b", rank=2, alpha=2.0), folder])
    assert str(refused.value) == f"{folder / ADAPTER_CONFIG}: {reason}"


def test_a_damaged_config_is_refused_with_the_config_reader_s_line(base, tmp_path):
    folder = make_adapter(base, tmp_path / "a", rank=2, alpha=2.0)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "rank": 0}))
    with pytest.raises(AdapterError, match=f"^{folder / ADAPTER_CONFIG}: rank must be at least 1, got 0$"):
        read_adapter_config(folder)
    (folder / ADAPTER_CONFIG).write_text("{")
    with pytest.raises(AdapterError, match=f"^LoRA adapter config {folder / ADAPTER_CONFIG} is not valid JSON"):
        read_adapter_config(folder)


def test_a_good_folder_reads_back_its_config(base, tmp_path):
    folder = make_adapter(base, tmp_path / "a", rank=3, alpha=6.0, blocks="all")
    config = read_adapter_config(folder)
    assert (config.rank, config.alpha, config.blocks) == (3, 6.0, "all")
    assert config.base_hash == base_identity(load_flow(base).config)[0]


@pytest.mark.parametrize("shape, shown", [("channels 32, layers [1], 2x2", "channels 32, layers [1], 2x2"),
                                          ("", "unknown")])
def test_an_adapter_for_another_base_says_both_shapes(base, shape, shown):
    flow_config = load_flow(base).config
    config = AdapterConfig(rank=2, alpha=2.0, targets=[TARGET], base_hash="0" * 16, base_shape=shape)
    with pytest.raises(AdapterError) as refused:
        check_base(config, flow_config, "somewhere")
    this = base_identity(flow_config)[1]
    assert str(refused.value) == (f"LoRA adapter somewhere was trained for another base model ({shown}; this one: "
                                  f"{this}): load it with the model it was made for")


def test_check_adapter_names_the_folder_and_checks_the_scale(base, tmp_path):
    folder = make_adapter(base, tmp_path / "a", rank=2, alpha=2.0)
    other = FlowConfig(**{**IMAGE, "channels": 32})
    with pytest.raises(AdapterError, match=f"^LoRA adapter {folder} was trained for another base model"):
        check_adapter(folder, other)
    with pytest.raises(AdapterError, match="^lora_scale must be a number between -1000 and 1000"):
        check_adapter(folder, load_flow(base).config, float("nan"))
    assert check_adapter(folder, load_flow(base).config).rank == 2


def test_load_adapter_scales_by_alpha_over_rank_by_default(base, tmp_path):
    folder = make_adapter(base, tmp_path / "a", rank=2, alpha=3.0)
    flow = load_flow(base)
    load_adapter(flow, folder)
    layers = dict(lora_layers(flow))
    assert layers and all(layer.scale == 1.5 for layer in layers.values())


@pytest.mark.parametrize("scale", [float("nan"), 1e4])
def test_load_adapter_checks_its_own_scale(base, tmp_path, scale):
    """load_flow checks every scale first; load_adapter, called on its own, must too."""
    folder = make_adapter(base, tmp_path / "a", rank=2, alpha=2.0)
    with pytest.raises(AdapterError, match="^lora_scale must be a number between -1000 and 1000"):
        load_adapter(load_flow(base), folder, scale)


def test_weights_that_do_not_match_the_adapter_config_name_adapter_json(base, tmp_path):
    folder = make_adapter(base, tmp_path / "a", rank=2, alpha=2.0)
    weights = mx.load(str(folder / ADAPTER_WEIGHTS))
    name = sorted(weights)[0]
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), {**weights, name: mx.zeros((3, 3))})
    with pytest.raises(AdapterError) as refused:
        load_adapter(load_flow(base), folder)
    shape = tuple(weights[name].shape)
    assert str(refused.value) == f"{folder / ADAPTER_WEIGHTS}: {name} has shape (3, 3), adapter.json needs {shape}"


def test_several_adapters_leave_nothing_trainable(base, tmp_path):
    """Summed adapters are for inference: the merged layers are frozen like the rest of the model."""
    a = make_adapter(base, tmp_path / "a", rank=2, alpha=2.0, seed=1)
    b = make_adapter(base, tmp_path / "b", rank=3, alpha=3.0, blocks="all", seed=2)
    flow = load_flow(base)
    load_adapters(flow, [a, b], [1.0, 1.0])
    assert trainable_count(flow) == 0 and lora_layers(flow)
    np.testing.assert_array_equal(np.array(dict(lora_layers(flow))[TARGET].lora_a),
                                  np.array(mx.load(str(b / ADAPTER_WEIGHTS))[f"{TARGET}.lora_a"]))
