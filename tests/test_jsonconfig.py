"""The shared typed JSON-config loader: types, bounds, size and nesting limits, atomic writes."""

import json

import pytest

from starflow_mlx.config import FlowConfig
from starflow_mlx.jsonconfig import MAX_BYTES, ConfigError
from starflow_mlx.io.model_folder import Manifest

BASE = dict(in_channels=4, channels=64, layers_per_block=[1, 2], latent_size=4, head_dim=32)


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_round_trip(tmp_path):
    config = FlowConfig(**BASE)
    config.save(tmp_path / "config.json")
    assert FlowConfig.load(tmp_path / "config.json") == config
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("field, value, message", [
    ("channels", "64", "channels must be int, got \"64\""),
    ("channels", True, "channels must be int, got true"),
    ("channels", 0, "channels must be at least 1, got 0"),
    ("layers_per_block", [1, -2], "layers_per_block must be at least 0, got -2"),
    ("layers_per_block", [1] * 65, "at most 64"),
    ("layers_per_block", None, "layers_per_block must be list"),
    ("noise_std", None, "noise_std must be float"),
    ("num_heads", 2.5, "num_heads must be int or null"),
    ("sos", 1, "sos must be bool"),
    ("bogus", 1, "unknown field 'bogus'"),
])
def test_bad_values_name_the_field(tmp_path, field, value, message):
    path = write(tmp_path, {**BASE, field: value})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        FlowConfig.load(path)


def test_non_finite_numbers_are_refused(tmp_path):
    path = write(tmp_path, json.dumps({**BASE}).replace("}", ', "noise_std": NaN}'))
    with pytest.raises(ConfigError, match="noise_std must be a finite number"):
        FlowConfig.load(path)


def test_missing_field_and_wrong_shape(tmp_path):
    with pytest.raises(ConfigError, match="lacks latent_size"):
        FlowConfig.load(write(tmp_path, {k: v for k, v in BASE.items() if k != "latent_size"}))
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        FlowConfig.load(write(tmp_path, [1, 2]))


def test_size_and_depth_limits(tmp_path):
    with pytest.raises(ConfigError, match="nested more than"):
        FlowConfig.load(write(tmp_path, "[" * 100000 + "]" * 100000))
    big = write(tmp_path, " " * (MAX_BYTES + 1))
    with pytest.raises(ConfigError, match="far larger than any real one"):
        FlowConfig.load(big)
    with pytest.raises(ConfigError, match="not valid JSON"):
        FlowConfig.load(write(tmp_path, "{"))


def test_manifest_checks_types_and_ignores_newer_fields(tmp_path):
    write(tmp_path, {"kind": "class-to-image", "classes": ["0", "1"], "added_later": 1}, "starflow.json")
    assert Manifest.load(tmp_path).classes == ["0", "1"]
    write(tmp_path, {"kind": "class-to-image", "classes": "0123456789"}, "starflow.json")
    with pytest.raises(ConfigError, match="classes must be list"):
        Manifest.load(tmp_path)
    write(tmp_path, {"kind": "class-to-image", "pixel_scale": 0}, "starflow.json")
    with pytest.raises(ConfigError, match="pixel_scale must be at least"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("channels", 2**40, "channels must be at most"),
    ("head_dim", 0, "head_dim must be at least 1"),
    ("patch_size", 0, "patch_size must be at least 1"),
    ("num_heads", 0, "num_heads must be at least 1"),
    ("expansion", 0, "expansion must be at least"),
    ("layers_per_block", [1_000_000], "layers_per_block must be at most"),
    ("layers_per_block", [1000] * 8, "adds up to 8000 layers"),
    ("layers_per_block", [], "layers_per_block is empty"),
    ("patch_size", 8, "patch_size 8 is larger than the latent size 4"),
    ("num_kv_heads", 3, "not a multiple of its 3 key/value heads"),
    ("top_block_channels", 100, "top_block_channels 100 is not a multiple of head_dim 32"),
    ("noise_std", 10**400, "noise_std must be a finite number, got an integer"),
    ("quantization", {"bits": 4, "group_size": 0, "layers": {}}, "group_size must be one of 32, 64, 128"),
    ("quantization", {"bits": 4, "group_size": 64, "layers": {"blocks.0.x": {"bits": 4, "group_size": 0}}},
     "group_size must be one of"),
])
def test_sizes_are_bounded_before_anything_is_built(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        FlowConfig.load(write(tmp_path, {**BASE, field: value}))


def test_configs_made_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="noise_std must be a finite number"):
        FlowConfig(**BASE, noise_std=float("nan"))
    with pytest.raises(ConfigError, match="latent_size must be at least 1"):
        FlowConfig(**{**BASE, "latent_size": -4})


def test_t5_and_vae_configs_are_bounded(tmp_path):
    from starflow_mlx.models.sd_vae import VAEConfig
    from starflow_mlx.models.t5 import T5Config

    with pytest.raises(ConfigError, match="num_layers must be at most"):
        T5Config.from_hf_dict({"model_type": "t5", "num_layers": 10**6})
    with pytest.raises(ConfigError, match="d_model must be int"):
        T5Config.from_hf_dict({"model_type": "t5", "d_model": "512"})
    with pytest.raises(ConfigError, match="norm_num_groups must be at least 1"):
        VAEConfig.from_diffusers_dict({"norm_num_groups": 0})
    with pytest.raises(ConfigError, match="block_out_channels must be list"):
        VAEConfig.from_diffusers_dict({"block_out_channels": 512})
