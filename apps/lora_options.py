"""The ``--lora`` and ``--lora-scale`` options, declared once for every command that loads a model with adapters."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

Lora = Annotated[Optional[List[Path]], typer.Option(
    "--lora", readable=False, metavar="FOLDER",
    help="Add a LoRA adapter folder (starflow train --lora) to the model; repeat for several (their updates add up).")]
LoraScale = Annotated[Optional[List[float]], typer.Option(
    "--lora-scale", metavar="SCALE", help="Multiply the adapter's update by this (default 1); repeat to give each --lora its own.")]
