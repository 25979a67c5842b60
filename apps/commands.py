"""Registers every ``starflow`` sub-command on the typer app (one line per command)."""

from __future__ import annotations


def register(app) -> None:
    from starflow_mlx.apps import convert_cmd

    app.command("convert")(convert_cmd.convert)

    from starflow_mlx.apps import quantize_cmd

    app.command("quantize")(quantize_cmd.quantize)
