"""The comparison in one picture (records/summary.png): the shipped model's test top-1 of every entry with its
seed spread, and the paired gaps the summary's verdicts are drawn from (each method against vanilla, each variant
against its method's defaults), with the larger seed spread each gap must exceed."""

from __future__ import annotations

import statistics
from pathlib import Path

from okdpipe.compare.summary import by_entry
from okdpipe.files import atomic_write


def gap_pairs(protocol: dict) -> list[tuple[str, str]]:
    """The pairs of the summary's verdict tables: every method against vanilla, the seed papers' claims (PCL and
    OKDPH above DML and ONE), every variant against its method."""
    methods = protocol["methods"]
    against_vanilla = [(m, "vanilla") for m in methods if m != "vanilla"]
    seed_claims = [(a, b) for a in ("pcl", "okdph") for b in ("dml", "one") if a in methods and b in methods]
    variants = protocol.get("variants", {})
    return against_vanilla + seed_claims + [(v, variants[v]["method"]) for v in variants]


def accuracy_panel(ax, results: list[dict], names: list[str]) -> None:
    """One row per entry: every seed's shipped test top-1 (dots) and their mean ± sample std (bar)."""
    for row, name in enumerate(names):
        values = [100 * r["shipped_test_top1"] for r in by_entry(results, name).values()]
        if not values:
            continue
        ax.scatter(values, [row] * len(values), color="tab:blue", alpha=0.5, s=14, zorder=3)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.errorbar(statistics.mean(values), row, xerr=spread, fmt="D", color="black", capsize=4, zorder=4)
    vanilla = [100 * r["shipped_test_top1"] for r in by_entry(results, "vanilla").values()]
    if vanilla:
        ax.axvline(statistics.mean(vanilla), color="gray", linestyle=":", label="vanilla (mean)")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("shipped model, test top-1 (%)  [dots: seeds; diamond: mean ± std]")
    ax.set_title("Shipped model per entry")
    ax.grid(axis="x", alpha=0.3)


def gap_panel(ax, results: list[dict], pairs: list[tuple[str, str]]) -> None:
    """One row per pair: the test gaps paired by seed, their mean, and ± the larger seed std (the bar to clear)."""
    labels = []
    for row, (a, b) in enumerate(pairs):
        labels.append(f"{a} - {b}")
        mine, theirs = by_entry(results, a), by_entry(results, b)
        seeds = sorted(mine.keys() & theirs.keys())
        if len(seeds) < 2:
            continue
        gaps = [100 * (mine[s]["shipped_test_top1"] - theirs[s]["shipped_test_top1"]) for s in seeds]
        spread = 100 * max(statistics.stdev([e[s]["shipped_test_top1"] for s in seeds]) for e in (mine, theirs))
        mean = statistics.mean(gaps)
        colour = "tab:green" if mean > spread else "tab:red" if mean < -spread else "tab:gray"
        ax.scatter(gaps, [row] * len(gaps), color=colour, alpha=0.5, s=14, zorder=3)
        ax.errorbar(mean, row, xerr=spread, fmt="o", color=colour, capsize=4, zorder=4)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("test top-1 gap, paired by seed (points)  [bar: ± larger seed std]")
    ax.set_title("Paired gaps: a - b\ngreen: a ahead by more than the seed spread; red: behind by more", fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def write_figure(protocol: dict, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [*protocol["methods"], *protocol.get("variants", {})]
    pairs = gap_pairs(protocol)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.38 * max(len(names), len(pairs)) + 1.8))
    accuracy_panel(left, results, names)
    gap_panel(right, results, pairs)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
