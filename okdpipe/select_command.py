"""`okdpipe select RUN_DIR`: the typer command. An entry point (like pipeline_command), because `--precision
int8` composes the distill stage's selection with the export stage's INT8 scoring (okdpipe.export.select_int8);
its options are SelectConfig (okdpipe/distill/select_command.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from okdpipe.distill.select_command import SelectConfig
from okdpipe.stage_config import flag


def select_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished distill run directory.")],
    strategy: Annotated[Optional[str], flag(SelectConfig, "strategy")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write the model (default RUN_DIR/model.pt).")] = None,
    bn_batches: Annotated[Optional[int], flag(SelectConfig, "bn_batches")] = None,
    device: Annotated[Optional[str], flag(SelectConfig, "device")] = None,
    precision: Annotated[Optional[str], flag(SelectConfig, "precision")] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(help="YAML holding these options (as the pipeline's select: section); flags override it."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print selection.json's content on stdout.")] = False,
) -> None:
    """Score every candidate on the validation split, pick the model to ship, write a self-describing MODEL.pt."""
    from okdpipe.stage_config import resolve, show

    flags = dict(strategy=strategy, bn_batches=bn_batches, device=device, precision=precision)
    cfg = resolve(SelectConfig, config, flags)
    if dry_run:  # everything select checks before scoring, with the same lines
        from okdpipe.distill.select import check_inputs

        check_inputs(run_dir, out, cfg.strategy)
        show(cfg)
        return
    from okdpipe.export.select_int8 import select_shipping

    rows, ensemble, chosen, path = select_shipping(run_dir, cfg, out)
    if json_output:
        import json

        from okdpipe.console import emit_json

        emit_json(json.loads((Path(run_dir) / "selection.json").read_text()))
        return
    print_candidates(run_dir, rows, ensemble)
    from okdpipe.console import say

    shipped = "" if chosen.shipped is None else f", {cfg.precision} {chosen.ship_top1:.2%}"
    say(f"chose {chosen.name} (val top-1 {chosen.top1:.2%}{shipped}) -> {path}")
    quantize = " --quantize int8" if cfg.precision == "int8" else ""
    say(f"next: okdpipe export {path} --format onnx{quantize} --out {path.parent / 'export'}")


def print_candidates(run_dir: Path, rows: list[dict], ensemble: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from okdpipe.console import QUIET, verbosity

    if verbosity() == QUIET:
        return
    table = Table(title=f"candidates of {run_dir} (validation split)")
    for column in ("candidate", "arch", "val top-1", "int8 top-1", "no BN recal.", "params", "MMACs", ""):
        table.add_column(column, justify="left" if column in ("candidate", "arch") else "right")
    for row in [*rows, ensemble]:
        recal = row.get("val_top1_without_bn_recalibration")
        int8 = row.get("int8", {}).get("val_top1")
        table.add_row(
            row["candidate"],
            row.get("arch", ""),
            f"{row['val_top1']:.2%}",
            "" if int8 is None else f"{int8:.2%}",
            "" if recal is None else f"{recal:.2%}",
            f"{row['params']:,}",
            f"{row['macs'] / 1e6:.1f}",
            "chosen" if row.get("chosen") else ("reference" if row.get("reference") else ""),
        )
    Console().print(table)
