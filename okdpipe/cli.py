"""The `okdpipe` command line (also `python -m okdpipe`). Each command lives with its stage; heavy imports
happen inside them, so `okdpipe --help` stays instant.

Exit codes, the same for every command: see okdpipe/errors.py (0 ok, 1 a check or gate failed, 2 bad input or
usage, 130 interrupted).
"""

from __future__ import annotations

from typing import Optional

import typer

from okdpipe import __version__
from okdpipe.bench.command import bench_command
from okdpipe.cli_support import friendly_errors
from okdpipe.console import NORMAL, QUIET, VERBOSE, set_verbosity
from okdpipe.distill.command import distill_command
from okdpipe.distill.select_command import select_command
from okdpipe.env_command import env_command
from okdpipe.export.command import export_command
from okdpipe.pipeline_command import pipeline_command
from okdpipe.serve.command import serve_command

app = typer.Typer(
    name="okdpipe",
    help="Train peer students together by online distillation, ship one, export, benchmark and serve it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"okdpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_show_version, is_eager=True,
                                           help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and --json output."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the libraries' warnings and logs."),
) -> None:
    """okdpipe: online knowledge distillation to deployment. Exit codes: 0 ok, 1 a check or gate failed, 2 bad
    input or usage."""
    set_verbosity(QUIET if quiet else VERBOSE if verbose else NORMAL)


for name, command in [("distill", distill_command), ("select", select_command), ("export", export_command),
                      ("bench", bench_command), ("serve", serve_command), ("pipeline", pipeline_command),
                      ("env", env_command)]:
    app.command(name)(friendly_errors(command))

if __name__ == "__main__":
    app()
