"""The `okdpipe` command line (also `python -m okdpipe`). Each command lives with its stage; heavy imports
happen inside them, so `okdpipe --help` stays instant.

Exit codes, the same for every command: see okdpipe/errors.py (0 ok, 1 a check or gate failed, 2 bad input or
usage, 3 a plug-in's code failed mid-stage, 130 interrupted by Ctrl-C, 143 by SIGTERM).
"""

from __future__ import annotations

import signal
from typing import Optional

import typer

from okdpipe import __version__
from okdpipe.bench.command import bench_command
from okdpipe.cli_support import friendly_errors, one_line
from okdpipe.compare.command import compare_command
from okdpipe.console import NORMAL, QUIET, VERBOSE, set_verbosity
from okdpipe.distill.command import distill_command
from okdpipe.env_command import env_command
from okdpipe.export.command import export_command
from okdpipe.pipeline_command import pipeline_command
from okdpipe.report.command import report_command
from okdpipe.select_command import select_command
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
def root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and --json output."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the libraries' warnings and logs."),
) -> None:
    """okdpipe: online knowledge distillation to deployment. Exit codes: 0 ok, 1 a check or gate failed, 2 bad
    input or usage, 3 a plug-in's code failed."""
    set_verbosity(QUIET if quiet else VERBOSE if verbose else NORMAL)


for name, command in [
    ("distill", distill_command),
    ("select", select_command),
    ("export", export_command),
    ("bench", bench_command),
    ("serve", serve_command),
    ("pipeline", pipeline_command),
    ("report", report_command),
    ("compare", compare_command),
    ("env", env_command),
]:
    app.command(name)(friendly_errors(command))


def main() -> None:
    """The console entry point: click's own parse errors (an unknown flag, `--threads abc`) become one `error:`
    line with exit 2, like every other bad input, instead of a usage box."""
    import sys

    try:
        from typer._click import exceptions as click_errors  # typer >= 0.25 vendors its own click
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        code = 0 if exc.ctx and exc.ctx.info_name == "okdpipe" else 2
    except click_errors.UsageError as exc:
        where = f"okdpipe {exc.ctx.info_name}" if exc.ctx and exc.ctx.info_name != "okdpipe" else "okdpipe"
        message = one_line(exc.format_message()).replace("Value error, ", "").rstrip(".")  # a parser's ValueError
        typer.echo(f"error: {message}; see `{where} --help`", err=True)
        code = 2
    except typer.Abort:
        typer.echo("error: interrupted (Ctrl-C)", err=True)
        code = 130
    # The command has finished and said how; a stop request from now on has nothing left to stop, and during
    # Python's shutdown (handlers reset) it would end the process with 143 and no word after the work was done.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
