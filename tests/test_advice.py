"""Errors word their advice for whoever made the mistake: Python names parameters, the command line options."""

import pytest

from starflow_mlx.advice import cli_message
from starflow_mlx.models.lora import check_scale
from starflow_mlx.quantize.policy import check_setting
from starflow_mlx.training.moving_digits import load_moving_digits_split


@pytest.mark.parametrize("call, python, cli", [
    (lambda: check_scale(float("nan")), "lora_scale must be a number", "--lora-scale must be a number"),
    (lambda: check_setting(4, 48), "group_size must be 32, 64 or 128", "--group-size must be 32, 64 or 128"),
    (lambda: check_setting(3, 64, "base_bits"), "base_bits must be 4 or 8", "--base-bits must be 4 or 8"),
    (lambda: load_moving_digits_split(5, 4), "canvas 4: the moving-digits canvas", "--image-size 4: the moving-"),
])
def test_python_errors_name_parameters_and_the_cli_names_options(call, python, cli):
    with pytest.raises(ValueError) as refused:
        call()
    assert str(refused.value).startswith(python) and cli_message(refused.value).startswith(cli)
