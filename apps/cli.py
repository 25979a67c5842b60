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
)


@app.callback()
def _root() -> None:
    """Keeps ``starflow`` a group of commands even while only one is registered."""


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit; file-provided text in it cannot reach the terminal as escape codes."""
    from starflow_mlx.safe_text import printable

    typer.echo(f"error: {printable(message, 2000)}", err=True)
    raise typer.Exit(code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def user_errors(command):
    """Wrap a command so that whatever goes wrong prints one line and exits 1 instead of a traceback.

    Bad input is meant to be caught by the validators with a clear message (ValueError, OSError);
    anything else that escapes is still one line, flagged as a bug to report.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError, MemoryError) as exc:
            if os.environ.get("STARFLOW_DEBUG"):
                raise
            fail(_first_line(exc))
        except RecursionError:
            if os.environ.get("STARFLOW_DEBUG"):
                raise
            fail("the input is nested too deeply to be a real model file")
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:  # a bug, not the user's mistake: still one line, with how to learn more
            if os.environ.get("STARFLOW_DEBUG"):
                raise
            fail(f"internal error ({type(exc).__name__}: {_first_line(exc)}); "
                 "rerun with STARFLOW_DEBUG=1 for the traceback and please report it")

    return wrapper


def main() -> None:
    from starflow_mlx.apps import commands

    commands.register(app)
    app()
