"""How a command fails: one ``error:`` line and a non-zero exit, never a traceback for a user's mistake."""

from __future__ import annotations

import functools
import os

import typer


def fail(message: str, code: int = 1) -> None:
    """Print an error and exit; file-provided text in it cannot reach the terminal as escape codes."""
    from starflow_mlx.safe_text import printable

    lines = [printable(line, 2000) for line in message.splitlines()] or [""]
    rank = os.environ.get("MLX_RANK")  # under mlx.launch every rank reports its own failure: say whose
    typer.echo("error: " + (f"rank {printable(rank, 8)}: " if rank else "") + "\n".join(lines), err=True)
    raise typer.Exit(code)


def _first_line(exc: BaseException) -> str:
    from starflow_mlx.advice import cli_message

    text = cli_message(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _message(exc: BaseException) -> str:
    """One line in the command line's words (its options, not Python's parameters); the hub's missing files
    add a second, the commands that fetch them."""
    from starflow_mlx.advice import cli_message
    from starflow_mlx.io.hub import HubError

    text = cli_message(exc).strip()
    return text if isinstance(exc, HubError) and text else _first_line(exc)


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
            fail(_message(exc))
        except RecursionError:
            if os.environ.get("STARFLOW_DEBUG"):
                raise
            fail("the input is nested too deeply to be a real model file")
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (termination.install): cleaned up by now
            from starflow_mlx.io.termination import describe

            fail(*describe(exc))
        except typer.Exit:  # a command that has said why it stops, with its own status
            raise
        except Exception as exc:  # a bug, not the user's mistake: still one line, with how to learn more
            if os.environ.get("STARFLOW_DEBUG"):
                raise
            fail(f"internal error ({type(exc).__name__}: {_first_line(exc)}); "
                 "rerun with STARFLOW_DEBUG=1 for the traceback and please report it")

    return wrapper
