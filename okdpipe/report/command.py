"""`okdpipe report RUN [RUN...] --out DIR`."""

from __future__ import annotations

from pathlib import Path

import typer


def report_command(
    runs: list[Path] = typer.Argument(..., help="Run directories (the --out of okdpipe distill); may be training."),
    out: Path = typer.Option(Path("report"), help="Folder for report.html, report.md and the PNG figures."),
) -> None:
    """Training curves (validation top-1 per model, loss terms, learning rate), the candidate table of
    selection.json with the ensemble as reference, and for several runs the curves overlaid and a table side by
    side: one self-contained HTML page, a Markdown summary and the PNGs.

    Exit code: 0 written; 2 bad input (not a run directory, a damaged selection.json, an unwritable --out)."""
    from okdpipe.console import say
    from okdpipe.report.build import write_report

    written = write_report(runs, out)
    say(f"wrote {len(written) - 2} figures, {out / 'report.html'} (open it in a browser) and {out / 'report.md'}")
