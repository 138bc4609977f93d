"""`okdpipe report RUN [RUN...] --out DIR`: training curves, the candidate table and, for several runs, the
curves overlaid and a table side by side. Writes DIR/report.html (self-contained), DIR/report.md and the PNGs.

It reads only the run directory's files (metrics.jsonl, manifest.json, selection.json), so it works on a run
that is still training and needs no torch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_files, kind_of
from okdpipe.report import figures
from okdpipe.report.document import Block, Figure, Heading, Paragraph, Table, to_html, to_markdown
from okdpipe.report.runs import RunHistory, read_run, unique_names


def percent(value: Optional[float]) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def slug(name: str) -> str:
    """A file-name-safe form of a run's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def progress(run: RunHistory) -> str:
    """Where the run stands: epochs finished of those planned, its status, lines skipped while reading."""
    done = len(run.epochs)
    planned = f"/{run.planned_epochs}" if run.planned_epochs else ""
    text = f"{done}{planned} epochs recorded; status: {run.status}"
    if run.selection is None:
        text += "; not selected yet (`okdpipe select` writes the candidate table)"
    if run.skipped_lines:
        text += f"; {run.skipped_lines} unreadable metrics line(s) skipped (torn by a write in progress or a kill)"
    return text + "."


def last_epoch_table(run: RunHistory) -> Table:
    """Validation accuracy of every model at the last recorded epoch, and its best epoch."""
    last = run.epochs[-1]
    rows = []
    for name in run.models():
        history = [(e["val"][name]["top1"], e["epoch"]) for e in run.epochs if name in e["val"]]
        best = max(history)
        score = last["val"].get(name, {})
        rows.append([name, percent(score.get("top1")), percent(score.get("top5")), percent(best[0]), str(best[1])])
    marks = ["shipped" if name == run.shipped() else "reference" if name == "ensemble" else "" for name in run.models()]
    headers = [
        "model",
        f"val top-1 % (epoch {last['epoch']})",
        f"val top-5 % (epoch {last['epoch']})",
        "best val top-1 %",
        "best epoch",
    ]
    return Table(headers, rows, marks)


def candidate_table(run: RunHistory) -> Table:
    """selection.json's candidates with their gap to the ensemble (the reference, not shippable), shipped marked."""
    selection = run.selection
    ensemble = (selection.get("ensemble") or {}).get("val_top1")
    rows, marks = [], []
    for row in selection["candidates"]:
        gap = "" if ensemble is None else f"{100 * (row['val_top1'] - ensemble):+.2f}"
        recal = row.get("val_top1_without_bn_recalibration")
        rows.append(
            [
                row["candidate"],
                percent(row["val_top1"]),
                gap,
                percent(recal) if recal is not None else "",
                f"{row.get('params', 0):,}",
                f"{row.get('macs', 0) / 1e6:.1f}",
                "shipped" if row.get("chosen") else "",
            ]
        )
        marks.append("shipped" if row.get("chosen") else "")
    if ensemble is not None:
        reference = selection["ensemble"]
        rows.append(
            [
                "ensemble",
                percent(ensemble),
                "+0.00",
                "",
                f"{reference.get('params', 0):,}",
                f"{reference.get('macs', 0) / 1e6:.1f}",
                "reference",
            ]
        )
        marks.append("reference")
    headers = [
        "candidate",
        "val top-1 %",
        "vs ensemble (points)",
        "val top-1 % without BN recalibration",
        "params",
        "MMACs",
        "",
    ]
    return Table(headers, rows, marks)


def run_blocks(run: RunHistory, prefix: str) -> list[Block]:
    """The section of one run: progress, curves, the last epoch's table, the candidates."""
    blocks: list[Block] = [Heading(run.name), Paragraph(f"{run.root}: {progress(run)}")]
    if run.epochs:
        blocks.append(
            Figure(f"{prefix}accuracy.png", "validation top-1 per model and epoch", figures.accuracy_figure(run))
        )
        blocks.append(last_epoch_table(run))
    if run.steps:
        blocks.append(Figure(f"{prefix}losses.png", "training loss terms per step", figures.loss_figure(run)))
        blocks.append(Figure(f"{prefix}lr.png", "learning rate per step", figures.lr_figure(run)))
    if not run.epochs and not run.steps:
        blocks.append(Paragraph("Nothing logged yet: the first metrics line is written after 50 steps."))
    if run.selection is not None:
        shipped = run.shipped()
        blocks.append(Heading("Candidates (validation split; the ensemble is the reference)", 3))
        blocks.append(Paragraph(f"Shipped: {shipped} ({run.selection.get('strategy', '?')} strategy)."))
        blocks.append(candidate_table(run))
        blocks.append(Figure(f"{prefix}candidates.png", "candidates scored by select", figures.candidates_figure(run)))
    return blocks


def side_by_side(runs: list[RunHistory]) -> Table:
    """One row per run: what it trained, how far it got, its best student, ensemble and shipped model."""
    rows = []
    for run in runs:
        config = run.manifest.get("config", {})
        last = run.epochs[-1]["val"] if run.epochs else {}
        students = [v["top1"] for k, v in last.items() if k.startswith("student:")]
        shipped = run.shipped()
        shipped_top1 = next(
            (c["val_top1"] for c in (run.selection or {}).get("candidates", []) if c.get("chosen")), None
        )
        rows.append(
            [
                run.name,
                str(config.get("method", "")),
                str(config.get("arch", "")),
                str(config.get("dataset", "")),
                f"{len(run.epochs)}/{run.planned_epochs or '?'}",
                percent(max(students) if students else None),
                percent(last.get("ensemble", {}).get("top1")),
                shipped or "",
                percent(shipped_top1),
                run.status,
            ]
        )
    headers = [
        "run",
        "method",
        "arch",
        "dataset",
        "epochs",
        "best student val top-1 % (last epoch)",
        "ensemble val top-1 % (last epoch)",
        "shipped",
        "shipped val top-1 %",
        "status",
    ]
    return Table(headers, rows)


def build(paths: list[Path]) -> tuple[str, list[Block]]:
    runs = unique_names([read_run(path) for path in paths])
    blocks: list[Block] = []
    if len(runs) > 1:
        blocks += [Heading("Runs side by side"), side_by_side(runs)]
        blocks.append(
            Figure("overlay.png", "several runs: best student and ensemble, loss, lr", figures.overlay_figure(runs))
        )
    for index, run in enumerate(runs):
        prefix = f"{index + 1}-{slug(run.name)}-" if len(runs) > 1 else ""
        blocks += run_blocks(run, prefix)
    title = "okdpipe report: " + ", ".join(run.name for run in runs)
    return title, blocks


def write_report(paths: list[Path], out: Path) -> list[Path]:
    """Write the PNGs, report.html and report.md into `out`; returns the files written."""
    if not paths:
        raise OkdpipeError("give at least one run directory: okdpipe report RUN [RUN...] --out DIR")
    if out.exists() and not out.is_dir():
        raise OkdpipeError(f"--out {out}: is {kind_of(out)}; give a folder for the report")
    title, blocks = build(paths)
    contents = {out / block.filename: block.data for block in blocks if isinstance(block, Figure)}
    contents[out / "report.html"] = to_html(title, blocks).encode()
    contents[out / "report.md"] = to_markdown(title, blocks).encode()
    atomic_write_files(contents)  # all or none: a full disk never leaves figures of one report beside another's
    return list(contents)
