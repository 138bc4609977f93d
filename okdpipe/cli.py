"""The `okdpipe` command line. Each command lives in its stage's package; heavy imports happen inside them,
so `okdpipe --help` stays instant."""

from __future__ import annotations

from typing import Optional

import typer

from okdpipe import __version__
from okdpipe.cli_support import friendly_errors
from okdpipe.distill.command import distill_command, select_command
from okdpipe.export.bench_command import bench_command
from okdpipe.export.command import export_command
from okdpipe.pipeline_command import pipeline_command
from okdpipe.serve.command import serve_command

app = typer.Typer(
    name="okdpipe",
    help="Train peer students together by online distillation, ship one, export, benchmark and serve it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"okdpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_show_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """okdpipe: online knowledge distillation to deployment."""


app.command("distill")(friendly_errors(distill_command))
app.command("select")(friendly_errors(select_command))
app.command("export")(friendly_errors(export_command))
app.command("bench")(friendly_errors(bench_command))
app.command("serve")(friendly_errors(serve_command))
app.command("pipeline")(friendly_errors(pipeline_command))

if __name__ == "__main__":
    app()
