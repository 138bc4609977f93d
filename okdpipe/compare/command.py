"""`okdpipe compare CONFIG`: the method comparison protocol (RESULTS.md), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def names_list(text: Optional[str]) -> Optional[list[str]]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def seeds_list(text: Optional[str]) -> Optional[list[int]]:
    from okdpipe.errors import OkdpipeError

    try:
        return [int(part) for part in names_list(text)] if text else None
    except ValueError:
        raise OkdpipeError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1") from None


def compare_command(
    config: Path = typer.Argument(..., help="The protocol YAML, e.g. configs/fmnist-compare.yaml."),
    only: Optional[str] = typer.Option(None, help="Comma-separated entries (methods or variants) to run."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds to run (default: the protocol's)."),
    summary_only: bool = typer.Option(False, "--summary-only", help="Only rewrite the summary from the records."),
) -> None:
    """Train every entry of a comparison protocol for every seed, select and measure the shipped model, and
    summarise: the main table, paired gaps with a verdict per claim, variants, other outputs
    (RECORDS/summary.md) and a figure (RECORDS/summary.png). Runs with a record are skipped, killed runs resume.

    Exit code: 0 done; 1 a run diverged; 2 bad input (the protocol, --only, --seeds)."""
    from okdpipe.compare.protocol import entries, read_protocol, schedule
    from okdpipe.compare.runner import check_entries, run_protocol, write_summary
    from okdpipe.console import say
    from okdpipe.errors import OkdpipeError

    protocol = read_protocol(config)
    names, chosen_seeds = names_list(only), seeds_list(seeds)
    unknown = sorted(set(names or []) - set(entries(protocol)))
    if unknown:
        raise OkdpipeError(
            f"--only: unknown entries {', '.join(unknown)}; the protocol has {', '.join(entries(protocol))}"
        )
    if not summary_only:
        check_entries(protocol)
        run_protocol(protocol, schedule(protocol, names, chosen_seeds))
    records = Path(protocol["records"])
    summary = write_summary(protocol, records)
    typer.echo(summary)
    say(f"wrote {records / 'summary.md'} and {records / 'summary.png'}", err=True)
