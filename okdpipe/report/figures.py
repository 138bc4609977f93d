"""The report's figures, drawn with matplotlib's Agg backend (no display needed) and returned as PNG bytes.

Accuracies are plotted in percent, learning rates as set at each step, x axes in epochs (validation) or optimiser steps
(training losses: one point per logged step, every 50 steps and at each epoch's end).
"""

from __future__ import annotations

import io
from collections import defaultdict

from okdpipe.report.runs import RunHistory

DPI = 110
ENSEMBLE_STYLE = dict(color="black", linestyle="--", linewidth=2)


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use (it takes a second)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def png(figure) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure otherwise)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    pyplot().close(figure)
    return buffer.getvalue()


def integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def few_points_marker(points: list) -> str | None:
    """Dots on a curve of few points (a run that just started has one, which a bare line would not show)."""
    return "." if len(points) < 30 else None


def model_label(name: str, shipped: str | None) -> str:
    return f"{name} (shipped)" if name == shipped else name


def accuracy_curves(ax, run: RunHistory, models: list[str]) -> None:
    """Validation top-1 per epoch of every model; the ensemble dashed black, the shipped model thick."""
    shipped = run.shipped()
    for name in models:
        points = [(e["epoch"], 100 * e["val"][name]["top1"]) for e in run.epochs if name in e["val"]]
        if not points:
            continue
        xs, ys = zip(*points)
        style = dict(marker="o", markersize=3, linewidth=1.2)
        if name == "ensemble":
            style.update(ENSEMBLE_STYLE)
        elif name == shipped:
            style.update(linewidth=3, markersize=6, marker="*")
        ax.plot(xs, ys, label=model_label(name, shipped), **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.xaxis.set_major_locator(integer_ticks())
    ax.grid(alpha=0.3)


def accuracy_figure(run: RunHistory) -> bytes:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7.5, 4.5))
    accuracy_curves(ax, run, run.models())
    ax.set_title(f"{run.name}: validation top-1 per model")
    epochs = run.planned_epochs
    if epochs:
        ax.set_xlim(0.5, epochs + 0.5)
    ax.legend(fontsize=8, loc="lower right")
    return png(figure)


def term_groups(terms: list[str]) -> dict[str, list[str]]:
    """Loss keys grouped by term: `ce/s0`, `ce/s1` -> "ce": [...]; the total `loss` alone."""
    groups: dict[str, list[str]] = defaultdict(list)
    for term in terms:
        groups[term.split("/")[0]].append(term)
    return dict(groups)


def loss_figure(run: RunHistory) -> bytes:
    """One panel per loss term (the total first), one line per student or module the term is logged for."""
    plt = pyplot()
    groups = term_groups(run.loss_terms())
    columns = min(3, max(len(groups), 1))
    rows = max(1, -(-len(groups) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (group, terms) in zip(axes.flat, groups.items()):
        for term in terms:
            points = [(s["step"], s[term]) for s in run.steps if term in s]
            ax.plot(*zip(*points), label=term, linewidth=1.2, marker=few_points_marker(points))
        ax.set_title(f"{group}" + (" (total, minimised)" if group == "loss" else ""))
        ax.set_xlabel("training step (batches)")
        ax.set_ylabel("loss (nats per image)")
        ax.grid(alpha=0.3)
        if len(terms) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    figure.suptitle(f"{run.name}: training loss terms (mean over the logged batches)")
    return png(figure)


def lr_figure(run: RunHistory) -> bytes:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6, 3))
    points = [(s["step"], s["lr"]) for s in run.steps if "lr" in s]
    if points:
        ax.plot(*zip(*points), marker=few_points_marker(points))
    ax.set_xlabel("training step (batches)")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{run.name}: learning rate (students' parameter group)")
    ax.grid(alpha=0.3)
    return png(figure)


def candidates_figure(run: RunHistory) -> bytes:
    """Validation top-1 of every candidate select scored, the shipped one highlighted, the ensemble as the
    reference line the shipped model approaches."""
    plt = pyplot()
    rows = run.selection["candidates"]
    figure, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.6))
    names = [r["candidate"] for r in rows]
    values = [100 * r["val_top1"] for r in rows]
    colours = ["tab:orange" if r.get("chosen") else "tab:blue" for r in rows]
    bars = ax.barh(names, values, color=colours)
    for bar, value, row in zip(bars, values, rows):
        text = f"{value:.2f}%" + ("  shipped" if row.get("chosen") else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}", va="center", fontsize=8)
    ensemble = run.selection.get("ensemble") or {}
    if isinstance(ensemble.get("val_top1"), (int, float)):
        reference = 100 * ensemble["val_top1"]
        ax.axvline(reference, **ENSEMBLE_STYLE, label=f"ensemble {reference:.2f}% (reference, not shippable)")
        ax.legend(fontsize=8, loc="lower right")
    low = min(values + [100 * ensemble.get("val_top1", 1.0)])
    ax.set_xlim(max(0.0, low - 5), min(100.0, max(values) + 6))
    ax.invert_yaxis()
    ax.set_xlabel("validation top-1 (%)")
    ax.set_title(f"{run.name}: candidates scored by select ({run.selection.get('strategy', '?')} strategy)")
    return png(figure)


def best_student(epoch: dict) -> float | None:
    scores = [v["top1"] for k, v in epoch["val"].items() if k.startswith("student:")]
    return 100 * max(scores) if scores else None


def overlay_figure(runs: list[RunHistory]) -> bytes:
    """Several runs on shared axes: validation top-1 of the best student (solid) and the ensemble (dashed),
    the total training loss, and the learning rate; one colour per run."""
    plt = pyplot()
    figure, (acc, loss, lr) = plt.subplots(1, 3, figsize=(15, 4.5))
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        best = [(e["epoch"], best_student(e)) for e in run.epochs if best_student(e) is not None]
        ensemble = [(e["epoch"], 100 * e["val"]["ensemble"]["top1"]) for e in run.epochs if "ensemble" in e["val"]]
        if best:
            acc.plot(*zip(*best), color=colour, marker="o", markersize=3, label=f"{run.name}: best student")
        if ensemble:
            acc.plot(
                *zip(*ensemble), color=colour, linestyle="--", marker="s", markersize=3, label=f"{run.name}: ensemble"
            )
        for ax, key in ((loss, "loss"), (lr, "lr")):
            points = [(s["step"], s[key]) for s in run.steps if key in s]
            if points:
                ax.plot(*zip(*points), color=colour, label=run.name, marker=few_points_marker(points))
    for ax, title, xlabel, ylabel in (
        (acc, "validation top-1", "epoch", "validation top-1 (%)"),
        (loss, "total training loss", "training step (batches)", "loss (nats per image)"),
        (lr, "learning rate", "training step (batches)", "learning rate"),
    ):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    acc.xaxis.set_major_locator(integer_ticks())
    return png(figure)
