"""`okdpipe compare CONFIG`: the method comparison protocol (RESULTS.md), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def names_list(text: Optional[str], flag: str = "--only") -> Optional[list[str]]:
    """`a,b` -> ["a", "b"]; an empty or repeated item is an error (it would silently run nothing, or twice)."""
    from okdpipe.errors import OkdpipeError

    if text is None:
        return None
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise OkdpipeError(f"{flag} {text!r}: an empty item; write a comma-separated list, e.g. {flag} a,b")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise OkdpipeError(f"{flag} {text!r}: {', '.join(repeated)} given twice; give each once")
    return names


def seeds_list(text: Optional[str]) -> Optional[list[int]]:
    from okdpipe.errors import OkdpipeError

    seeds = names_list(text, "--seeds")
    if seeds is not None and not all(seed.isascii() and seed.isdigit() for seed in seeds):
        raise OkdpipeError(f"--seeds {text!r}: expected comma-separated non-negative integers, e.g. --seeds 0,1")
    return None if seeds is None else [int(seed) for seed in seeds]


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
