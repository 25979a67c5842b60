"""Registers every ``starflow`` sub-command on the typer app (one line per command).

Each command is wrapped by ``user_errors`` so bad input ends in a one-line error.
"""

from __future__ import annotations

from starflow_mlx.apps.cli import user_errors


def register(app) -> None:
    if app.registered_commands:
        return
    # `starflow --help` lists commands in this order: what a new user runs first comes first.
    from starflow_mlx.apps import generate_cmd

    app.command("generate")(user_errors(generate_cmd.generate))
    from starflow_mlx.apps import score_many

    app.command("score")(user_errors(score_many.score))
    from starflow_mlx.apps import classify_cmd; app.command("classify")(user_errors(classify_cmd.classify))

    from starflow_mlx.apps import convert_cmd

    app.command("convert")(user_errors(convert_cmd.convert))

    from starflow_mlx.apps import quantize_cmd

    app.command("quantize")(user_errors(quantize_cmd.quantize))

    from starflow_mlx.apps import export_cmd; app.command("export-coreml")(user_errors(export_cmd.export_coreml))
    from starflow_mlx.apps import coreml_video_cmd

    app.command("coreml-video")(user_errors(coreml_video_cmd.coreml_video))
    from starflow_mlx.apps import bench_cmd; app.command("bench")(user_errors(bench_cmd.bench))

    from starflow_mlx.apps import train_cmd

    app.command("train")(user_errors(train_cmd.train))

    from starflow_mlx.apps import serve_cmd

    app.command("serve")(user_errors(serve_cmd.serve))
    from starflow_mlx.apps import lora_cmd

    app.command("fuse")(user_errors(lora_cmd.fuse))
