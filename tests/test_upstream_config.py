"""The upstream YAML reader: typed and bounded like every other config, one line for each bad value."""

import pytest
import yaml

from starflow_mlx.config import ConfigError
from starflow_mlx.convert.upstream_config import read_arguments, resolve

GOOD = [{"img_size": 32}, {"vae": "stabilityai/sd-vae-ft-ema"}, {"channel_size": 4}, {"patch_size": 1},
        {"channels": 64}, {"head_dim": 32}, {"layers_per_block": "1 2"}, {"rope": 1}]


def load(tmp_path, arguments=None, text=None, factor=None):
    path = tmp_path / "c.yaml"
    path.write_text(text if text is not None else yaml.safe_dump({"arguments": GOOD + arguments}))
    return resolve(read_arguments(path), 0, factor)


def test_good_config_resolves(tmp_path):
    config = load(tmp_path, [{"lr": 1e-4}])  # training-only keys are ignored
    assert (config.latent_size, config.layers_per_block, config.vae_factor) == (4, [1, 2], 8)


@pytest.mark.parametrize("item, message", [
    ({"channels": None}, "channels must be int, got null"),
    ({"channels": [64]}, "channels must be int, got list"),
    ({"channels": {"a": 1}}, "channels must be int, got dict"),
    ({"channels": "64"}, "channels must be int"),
    ({"channels": 2**40}, "channels must be at most"),
    ({"head_dim": 0}, "head_dim must be at least 1"),
    ({"img_size": -32}, "img_size must be at least 1"),
    ({"noise_std": float("nan")}, "noise_std must be a finite number"),
    ({"layers_per_block": "1 x 2"}, "must be counts"),
    ({"layers_per_block": [10**6]}, "layers_per_block must be at most"),
    ({"blocks": 10**6}, "blocks must be at most"),
    ({"seq_order": "sideways"}, "seq_order must be L2R or R2L"),
])
def test_bad_values_are_one_line(tmp_path, item, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, [item])


def test_negative_vae_factor(tmp_path):
    with pytest.raises(ConfigError, match="--vae-factor must be between 1 and 64"):
        load(tmp_path, [], factor=-8)


def test_deep_and_exploding_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nested more than"):
        load(tmp_path, text="arguments:\n- channels: " + "[" * 100000 + "]" * 100000)
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(20)) + "arguments:\n- cfg: *u\n"
    with pytest.raises(ConfigError, match="aliases"):
        load(tmp_path, text=bomb)
