"""The ``starflow`` command line.

Each command lives in its own module and registers itself here. User mistakes
(bad paths, wrong options, damaged files) print one line and exit non-zero;
set STARFLOW_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import functools
import os

import typer

app = typer.Typer(
    name="starflow",
    help="Run Apple's STARFlow flows with MLX: generate, convert, quantize, export, bench, score.",
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


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(command):
    """Wrap a command so a user mistake prints one line and exits 1 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError, MemoryError) as exc:
            if os.environ.get("STARFLOW_DEBUG"):
                raise
            from starflow_mlx.hub import HubError

            text = str(exc).strip()
            # Library messages can run on for lines; ours are one line, except the hub's list of missing files.
            fail(text if isinstance(exc, HubError) else text.splitlines()[0] if text else type(exc).__name__)

    return wrapper


def main() -> None:
    from starflow_mlx.apps import commands

    commands.register(app)
    app()
