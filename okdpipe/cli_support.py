"""Turn user errors into one line and an exit code, for every command (the table: okdpipe/errors.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer

from okdpipe.errors import OkdpipeError


def friendly_errors(command: Callable) -> Callable:
    """OkdpipeError -> 'error: ...' on stderr and its exit code (2 for bad input, 1 for a failed check);
    Ctrl-C -> exit 130. Bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OkdpipeError as exc:
            typer.echo(f"error: {one_line(exc)}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def one_line(exc: BaseException) -> str:
    """The message on one line, whatever it quotes (a path or a value may hold newlines)."""
    return " ".join(str(exc).split("\n"))
