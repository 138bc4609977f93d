"""`okdpipe pipeline CONFIG.yaml`: the typer command (torch is imported only when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def pipeline_command(
    config: Path = typer.Argument(..., help="Pipeline YAML: out, distill, select, export, bench, gate sections."),
    force: bool = typer.Option(False, "--force", help="Re-run every stage, even unchanged ones."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each stage with run/skip and why; run nothing."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (overrides the config's `out`)."),
) -> None:
    """Distill, select, export, benchmark and gate in one command; unchanged stages are skipped.

    Exit code: 0 when every gate passes, 1 when a gate fails (or a stage fails), 2 for a bad config.
    """
    from okdpipe.console import say
    from okdpipe.pipeline import run_pipeline

    raise typer.Exit(run_pipeline(config, out, force=force, dry_run=dry_run, echo=say))
