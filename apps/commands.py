"""Registers every ``starflow`` sub-command on the typer app (one line per command).

Each command is wrapped by ``user_errors`` so bad input ends in a one-line error. ``starflow --help`` lists
them under the headings of the README's tour, in its order: what a new user runs first comes first.
"""

from __future__ import annotations

from starflow_mlx.apps.errors import user_errors

IMAGES, SERVE, TRAIN, MODELS, MACS, MEASURE = ("Images and video", "Server", "Training and LoRA",
                                              "Core ML, quantization and conversion", "Several Macs",
                                              "Benchmarks")


def register(app) -> None:
    if app.registered_commands:
        return

    def add(name: str, function, section: str, **settings) -> None:
        app.command(name, rich_help_panel=section, **settings)(user_errors(function))

    from starflow_mlx.apps import generate_cmd

    add("generate", generate_cmd.generate, IMAGES)

    from starflow_mlx.apps import classify_cmd, score_many

    add("score", score_many.score, IMAGES)
    add("classify", classify_cmd.classify, IMAGES)

    from starflow_mlx.apps import inversion_cmd

    add("encode", inversion_cmd.encode, IMAGES)
    add("edit", inversion_cmd.edit, IMAGES)

    from starflow_mlx.apps import serve_cmd

    add("serve", serve_cmd.serve, SERVE)

    from starflow_mlx.apps import lora_cmd, train_cmd

    add("train", train_cmd.train, TRAIN)
    add("fuse", lora_cmd.fuse, TRAIN)

    from starflow_mlx.apps import convert_cmd, coreml_video_cmd, export_cmd, quantize_cmd

    add("export-coreml", export_cmd.export_coreml, MODELS)
    add("coreml-video", coreml_video_cmd.coreml_video, MODELS)
    add("quantize", quantize_cmd.quantize, MODELS)
    add("convert", convert_cmd.convert, MODELS)

    from starflow_mlx.apps import launch_cmd

    add("launch", launch_cmd.launch, MACS, options_metavar="[OPTIONS] -- COMMAND...",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True})

    from starflow_mlx.apps import bench_cmd

    add("bench", bench_cmd.bench, MEASURE)
