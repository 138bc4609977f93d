"""Bench reports: report.json (+ gate results), a Markdown summary, a PNG plot, JUnit XML, and rich tables.

The Markdown is written for a CI job summary or a PR comment; the JUnit file has one <testcase> per
(gate, entry) so CI systems list every gate as a test, with a <failure> saying by how much it missed.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from okdpipe.bench.gate import failed, fmt
from okdpipe.contracts.report import BenchReport, Entry, GateResult
from okdpipe.files import atomic_write_files, json_text

SUMMARY_HEADERS = ("model", "kind", "precision", "top-1", "top-5", "params", "MACs/image", "start ms", "peak RSS MB")
LATENCY_HEADERS = ("model", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "images/s", "GFLOP/s", "% of peak")
SENSITIVITY_HEADERS = ("rank", "node", "op type", "error", "top-1 drop (points)", "kept in FP32")
SENSITIVITY_ROWS = 10  # the most sensitive nodes shown; the card holds the full ranking
GATE_HEADERS = ("gate", "entry", "value", "threshold", "result", "detail")
KIND_MARKERS = {"onnx": "o", "pytorch": "s", "ensemble": "*"}


def report_paths(out_json: Path, junit: Path | None = None) -> dict[str, Path]:
    """report.json, the .md and .png beside it, and the JUnit file when asked."""
    out_json = Path(out_json)
    paths = {"json": out_json, "md": out_json.with_suffix(".md"), "png": out_json.with_suffix(".png")}
    return paths if junit is None else {**paths, "junit": Path(junit)}


def write_reports(report: BenchReport, out_json: Path, junit: Path | None = None) -> dict[str, Path]:
    """Every rendering of `report` (its gate results included); returns the paths written."""
    paths = report_paths(out_json, junit)
    texts = {"json": json_text(report.to_dict(), paths["json"]), "md": markdown(report, report.gates)}
    if junit is not None:
        texts["junit"] = junit_xml(report.gates)
    contents = {paths[kind]: text.encode() for kind, text in texts.items()}
    atomic_write_files({**contents, paths["png"]: plot_png(report)})  # all or none: never a half-updated set
    return paths


# ---------------------------------------------------------------- rows shared by Markdown and the terminal


def summary_rows(report: BenchReport) -> list[list[str]]:
    rows = []
    for e in report.entries():
        top1, top5 = (e.accuracy.top1, e.accuracy.top5) if e.accuracy else (None, None)
        rows.append(
            [
                e.name,
                e.kind,
                str(e.precision),
                _percent(top1),
                _percent(top5),
                fmt(e.params),
                fmt(e.macs),
                fmt(e.start_ms),
                fmt(e.memory.peak_rss_delta_mb),
            ]
        )
    return rows


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


def latency_rows(report: BenchReport) -> list[list[str]]:
    rows = []
    for e in report.entries():
        for batch, point in e.latency.items():
            rows.append(
                [
                    e.name,
                    str(batch),
                    fmt(point.p50_ms),
                    fmt(point.p90_ms),
                    fmt(point.p99_ms),
                    fmt(point.mean_ms),
                    fmt(point.images_per_s),
                    fmt(point.gflops_per_s),
                    _percent(point.peak_fraction),
                ]
            )
    return rows


def sensitivity_rows(entry: Entry) -> list[list[str]]:
    """The entry's most sensitive INT8 nodes (measured at export on validation images, one node quantized at a
    time): the error that node alone introduces, relative to the FP32 logits."""
    return [
        [
            str(row["rank"]),
            row["node"],
            row["op_type"],
            "non-finite" if row["error"] is None else f"{row['error']:.4g}",
            "-" if row["top1_drop_points"] is None else f"{row['top1_drop_points']:.2f}",
            "yes" if row["fp32"] else "",
        ]
        for row in entry.sensitivity[:SENSITIVITY_ROWS]
    ]


def sensitivity_title(entry: Entry) -> str:
    kept = sum(1 for row in entry.sensitivity if row["fp32"])
    more = len(entry.sensitivity) - SENSITIVITY_ROWS
    tail = f"; {more} more nodes in its model card" if more > 0 else ""
    return f"INT8 sensitivity of {entry.name} (most sensitive first; {kept} node(s) kept in FP32{tail})"


def gate_rows(results: list[GateResult]) -> list[list[str]]:
    return [
        [r.name or r.expression, r.artifact, fmt(r.value), fmt(r.threshold), "pass" if r.passed else "FAIL", r.detail]
        for r in results
    ]


def savings_lines(report: BenchReport) -> list[str]:
    """What each shipped artifact saves against the ensemble it replaces: MACs, p50 at batch 1, top-1."""
    ensembles = [e for e in report.references if e.kind == "ensemble"]
    lines = []
    for artifact in report.artifacts:
        for ensemble in (e for e in ensembles if artifact.name in e.of):
            lines.append(f"{artifact.name} vs {ensemble.name}: " + _saving(artifact, ensemble))
    return lines


def _saving(artifact: Entry, ensemble: Entry) -> str:
    parts = []
    if artifact.macs and ensemble.macs:
        parts.append(f"{ensemble.macs / artifact.macs:.2f}x fewer MACs")
    batch = min(artifact.latency)
    if batch in ensemble.latency:
        speedup = ensemble.latency[batch].p50_ms / artifact.latency[batch].p50_ms
        parts.append(f"{speedup:.2f}x lower p50 latency at batch {batch}")
    if artifact.accuracy and ensemble.accuracy:
        drop = 100 * (ensemble.accuracy.top1 - artifact.accuracy.top1)
        parts.append(f"top-1 {drop:.2f} points below the ensemble" if drop >= 0 else f"top-1 {-drop:.2f} points above")
    return ", ".join(parts)


def machine_line(report: BenchReport) -> str:
    machine, runtime = report.machine, report.runtime
    features = ", ".join(flag for flag, present in machine["cpu_features"].items() if present) or "none detected"
    peak = machine["peak_gflops"]
    return (
        f"{machine['cpu_model']} ({machine['logical_cpus']} logical CPUs; {features}); provider "
        f"{machine['provider']}, threads {machine['threads'] or 'runtime default'}; onnxruntime "
        f"{runtime.get('onnxruntime')}, torch {runtime.get('torch')}; measured peak {fmt(peak['gflops'])} "
        f"GFLOP/s ({peak['method']})"
    )


# ---------------------------------------------------------------- Markdown


def markdown(report: BenchReport, gate_results: list[GateResult]) -> str:
    lines = [
        "## okdpipe bench",
        "",
        machine_line(report),
        "",
        _md_table(SUMMARY_HEADERS, summary_rows(report)),
        "",
        _md_table(LATENCY_HEADERS, latency_rows(report)),
    ]
    savings = savings_lines(report)
    if savings:
        lines += ["", "### What the student saves", "", *(f"- {line}" for line in savings)]
    for entry in (e for e in report.artifacts if e.sensitivity):
        lines += ["", f"### {sensitivity_title(entry)}", "", _md_table(SENSITIVITY_HEADERS, sensitivity_rows(entry))]
    if gate_results:
        bad = failed(gate_results)
        verdict = (
            f"**{len(bad)} of {len(gate_results)} gates failed**" if bad else f"all {len(gate_results)} gates pass"
        )
        lines += ["", f"### Gates: {verdict}", "", _md_table(GATE_HEADERS, gate_rows(gate_results))]
    if report.notes:
        lines += ["", "### Notes", "", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines) + "\n"


def _md_table(headers: tuple[str, ...], rows: list[list[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731 - a name for a one-liner
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- plot


def plot_png(report: BenchReport) -> bytes:
    """Top-1 against p50 latency (log scale), one line per entry through its batch sizes; the ensemble a star.

    Uses matplotlib's object API with the Agg canvas, so no display and no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=110)
    axes = figure.add_subplot()
    for e in report.entries():
        _plot_entry(axes, e)
    axes.set_xscale("log")
    axes.set_xlabel("p50 latency per batch (ms, log scale)")
    axes.set_ylabel("test top-1")
    axes.set_title("accuracy vs latency (labels: batch size)")
    axes.grid(True, which="both", alpha=0.3)
    if report.entries():
        axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _plot_entry(axes: Any, e: Entry) -> None:
    if e.accuracy is None or not e.latency:
        return
    top1 = e.accuracy.top1
    batches = sorted(e.latency)
    latency = [e.latency[b].p50_ms for b in batches]
    size = 160 if e.kind == "ensemble" else 50
    [line] = axes.plot(latency, [top1] * len(batches), linestyle="-", alpha=0.4)
    axes.scatter(
        latency,
        [top1] * len(batches),
        marker=KIND_MARKERS.get(e.kind, "o"),
        s=size,
        color=line.get_color(),
        label=f"{e.name} [{e.kind}]",
        zorder=3,
    )
    for batch, x in zip(batches, latency):
        axes.annotate(str(batch), (x, top1), textcoords="offset points", xytext=(3, 5), fontsize=7)


# ---------------------------------------------------------------- JUnit


def junit_xml(results: list[GateResult]) -> str:
    """JUnit XML (the Jenkins/GitLab/GitHub-reporter dialect): one testsuite, one testcase per gate result."""
    bad = len(failed(results))
    suites = ET.Element("testsuites", name="okdpipe bench", tests=str(len(results)), failures=str(bad), errors="0")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name="okdpipe.gates",
        tests=str(len(results)),
        failures=str(bad),
        errors="0",
        skipped="0",
        time="0",
    )
    for result in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"okdpipe.gates.{result.artifact or 'report'}",
            name=result.name or result.expression,
            time="0",
        )
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=result.detail, type="GateFailed")
            failure.text = f"{result.expression} on {result.artifact}: {result.detail}"
        else:
            ET.SubElement(case, "system-out").text = result.detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


# ---------------------------------------------------------------- terminal


def print_summary(report: BenchReport, gate_results: list[GateResult], console: Any = None) -> None:
    """Rich tables: the entries, latency per batch size, the savings, then the gates (failures in red)."""
    import sys

    from rich.console import Console

    # CI logs are not terminals; rich would wrap every table to 80 columns there
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    console.print(machine_line(report), style="dim")
    console.print(_rich_table("models (test split)", SUMMARY_HEADERS, summary_rows(report)))
    console.print(_rich_table("latency", LATENCY_HEADERS, latency_rows(report)))
    for entry in (e for e in report.artifacts if e.sensitivity):
        console.print(_rich_table(sensitivity_title(entry), SENSITIVITY_HEADERS, sensitivity_rows(entry)))
    for line in savings_lines(report) + [f"note: {note}" for note in report.notes]:
        console.print(line)
    if gate_results:
        rows = gate_rows(gate_results)
        styles = [None if r.passed else "bold red" for r in gate_results]
        console.print(_rich_table("gates", GATE_HEADERS, rows, styles))


def _rich_table(title: str, headers: tuple[str, ...], rows: list[list[str]], styles: list | None = None):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index < 2 else "right", no_wrap=index > 0)
    for index, row in enumerate(rows):
        table.add_row(*row, style=styles[index] if styles else None)
    return table
