"""The ``starflow`` command line.

Each command lives in its own module; ``commands.register`` adds them all to ``app``, each
wrapped by ``errors.user_errors``: user mistakes (bad paths, wrong options, damaged files)
print one line and exit non-zero; set STARFLOW_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup


class SectionedGroup(TyperGroup):
    """``starflow --help`` lists the commands under the README tour's headings, in its order (each command's
    ``rich_help_panel``, set in ``commands.register``), with plain click formatting."""

    def list_commands(self, ctx):
        return list(self.commands)  # registration order, not alphabetical

    def format_commands(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        commands = [(name, cmd) for name, cmd in commands if cmd is not None and not cmd.hidden]
        if not commands:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        for name, cmd in commands:
            sections.setdefault(getattr(cmd, "rich_help_panel", None) or "Commands", []).append(
                (name, cmd.get_short_help_str(limit)))
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


app = typer.Typer(
    cls=SectionedGroup,
    name="starflow",
    help="Run Apple's STARFlow flows with MLX: generate images and videos, score images, convert, quantize, "
         "train, export to Core ML, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # typer 0.29's rich help prints a type on every option, flags included ("--verify <bool>",
    # even "--help <bool>"); click's plain help lists flags as flags.
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from starflow_mlx import __version__

        typer.echo(f"starflow-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Keeps ``starflow`` a group of commands and gives it --version."""


def main() -> None:
    from starflow_mlx.io.termination import describe, install

    install()
    try:
        from starflow_mlx.apps import commands

        commands.register(app)  # imports every command: seconds on a busy machine, before user_errors can help
        app()
    except KeyboardInterrupt as exc:
        text, status = describe(exc)
        print(f"error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None
