"""What INT8 costs each student, and what okdpipe's three ways of shipping it win back (issue 17, RESULTS.md).

    python benchmarks/quant_study.py RUN_DIR [RUN_DIR ...] --students 0,1 --out results/fmnist-quant

For every run directory (one per seed) and every student index, the script picks that student
(`okdpipe select --strategy student:N`) and exports it four ways, exactly as a user would:

| variant | export options |
|---|---|
| `ptq` | plain static INT8 (`--tune-budget 0`), whatever it loses |
| `tuned` | accuracy-aware INT8: the search runs when plain INT8 loses more than `--max-accuracy-drop` |
| `qat-ensemble` | `--qat-epochs N`, distilling from the run's peer ensemble and the labels |
| `qat-labels` | `--qat-epochs N --qat-teacher labels`: the same fine-tuning with cross-entropy alone |

Validation figures come from the export's own model card (the check the export gates on); test figures and
latency come from one `okdpipe bench` of the FP32 model and the four INT8 models, so the test split is measured
once per model and chooses nothing. One JSON per (run, student) is written to OUT, which is skipped when the
script runs again (resumable), and OUT/summary.md holds mean ± sample std over the runs for each backbone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "ptq": ["--tune-budget", "0", "--max-accuracy-drop", "100"],
    "tuned": [],  # --tune-budget and --max-accuracy-drop from the command line
    "qat-ensemble": ["--qat-teacher", "ensemble", "--max-accuracy-drop", "100"],
    "qat-labels": ["--qat-teacher", "labels", "--max-accuracy-drop", "100"],
}


def okdpipe(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI of this interpreter's okdpipe; its stderr (progress, errors) goes to the terminal."""
    return subprocess.run([sys.executable, "-m", "okdpipe", *args], stdout=subprocess.PIPE, text=True)


def export_variant(model: Path, variant: str, work: Path, options: argparse.Namespace) -> dict:
    """Export `model` one way; the INT8 card's validation figures, or why the export failed."""
    extra = list(VARIANTS[variant])
    if variant == "tuned":
        extra = ["--tune-budget", options.tune_budget, "--max-accuracy-drop", str(options.max_accuracy_drop)]
    if variant.startswith("qat"):
        extra += ["--qat-epochs", str(options.qat_epochs)]
    out = work / variant
    card = out / "int8" / "model.json"
    seconds = None  # exported by an earlier, interrupted call of this script: its card is read back
    if not card.exists():
        started = time.perf_counter()
        done = okdpipe("export", str(model), "--quantize", "int8", "--out", str(out), *extra)
        seconds = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            return {"exported": False, "exit_code": done.returncode, "seconds": seconds}
    int8 = json.loads(card.read_text())
    quantization = int8["quantization"]
    return {
        "exported": True,
        "seconds": seconds,
        "directory": str(out / "int8"),
        "fp32_directory": str(out / "fp32"),
        "val_top1": int8["accuracy"]["val_top1"],
        "fp32_val_top1": int8["accuracy"]["fp32_val_top1"],
        "val_drop_points": int8["accuracy"]["drop_points"],
        "method": quantization.get("method"),
        "fp32_nodes": len(quantization.get("fp32_nodes") or []),
        "trials": len((quantization.get("tuning") or {}).get("trials") or []),
    }


def first_with_same_model(directory: str, directories: list[str]) -> str:
    """The first of `directories` whose model.onnx has the same bytes (the tuned search kept plain INT8 when plain
    INT8 already met the budget): it is measured once."""
    digest = hashlib.sha256((Path(directory) / "model.onnx").read_bytes()).hexdigest()
    return next(d for d in directories if hashlib.sha256((Path(d) / "model.onnx").read_bytes()).hexdigest() == digest)


def bench(directories: list[str], work: Path, options: argparse.Namespace) -> dict[str, dict]:
    """Test top-1 and latency of each artifact directory, from one `okdpipe bench` (keyed by directory)."""
    args = ["bench", *directories, "--batch-sizes", options.batch_sizes, "--no-pytorch", "--no-ensemble"]
    args += ["--threads", str(options.threads), "--report", str(work / "bench" / "report.json"), "--json"]
    done = okdpipe(*args)
    if done.returncode != 0:
        raise SystemExit(f"error: okdpipe bench failed (exit {done.returncode}) on {' '.join(directories)}")
    figures = {}
    for artifact in json.loads(done.stdout)["artifacts"]:
        latency = {size: timing["p50_ms"] for size, timing in artifact["latency"].items()}
        figures[artifact["path"]] = {"test_top1": artifact["accuracy"]["top1"], "p50_ms": latency}
    return figures


def study(run_dir: Path, student: int, options: argparse.Namespace) -> dict:
    """Every variant of one student of one run, measured on validation (export) and test (bench)."""
    work = options.work / f"{run_dir.name}-student{student}"
    model = work / "model.pt"
    chosen = (
        model.exists()
        or not okdpipe("select", str(run_dir), "--strategy", f"student:{student}", "--out", str(model)).returncode
    )
    if not chosen:
        raise SystemExit(f"error: okdpipe select failed on {run_dir} student:{student}")
    variants = {name: export_variant(model, name, work, options) for name in VARIANTS}
    fp32_dir = variants["ptq"]["fp32_directory"]
    exported = [v["directory"] for v in variants.values() if v["exported"]]
    same = {directory: first_with_same_model(directory, exported) for directory in exported}
    figures = bench([fp32_dir, *dict.fromkeys(same.values())], work, options)  # bench refuses a model twice
    for measured in variants.values():
        if measured["exported"]:
            measured.update(figures[same[measured["directory"]]])
            measured["same_model_as"] = Path(same[measured["directory"]]).parent.name
    arch = json.loads((Path(fp32_dir) / "model.json").read_text())["name"].split("-")[0]
    return {"run": str(run_dir), "student": student, "arch": arch, "fp32": figures[fp32_dir], "variants": variants}


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' in points (the inputs are fractions), or the one value."""
    points = [100.0 * v for v in values]
    if len(points) < 2:
        return f"{points[0]:.2f}" if points else "-"
    return f"{statistics.mean(points):.2f} ± {statistics.stdev(points):.2f}"


def summary(records: list[dict], batch_sizes: list[str]) -> str:
    """One table per backbone: FP32 test top-1, and per variant its drops, FP32 nodes and latency ratio."""
    lines = ["# INT8 study (benchmarks/quant_study.py)", ""]
    for arch in sorted({r["arch"] for r in records}):
        rows = [r for r in records if r["arch"] == arch]
        fp32_test = [r["fp32"]["test_top1"] for r in rows]
        lines += [f"## {arch} ({len(rows)} runs): FP32 test top-1 {mean_std(fp32_test)}%", ""]
        ratios = " | ".join(f"INT8/FP32 p50, batch {b}" for b in batch_sizes)
        lines += [
            f"| variant | exported | val drop (points) | test top-1 | test drop (points) | FP32 nodes | {ratios} |"
        ]
        lines += ["|---|---|---|---|---|---|" + "---|" * len(batch_sizes)]
        for name in VARIANTS:
            done = [r for r in rows if r["variants"][name]["exported"]]
            measured = [r["variants"][name] for r in done]
            test_drop = [r["fp32"]["test_top1"] - r["variants"][name]["test_top1"] for r in done]
            nodes = "/".join(str(m["fp32_nodes"]) for m in measured) or "-"
            latency = [
                mean_ratio([m["p50_ms"][b] / r["fp32"]["p50_ms"][b] for m, r in zip(measured, done)])
                for b in batch_sizes
            ]
            lines.append(
                f"| {name} | {len(done)}/{len(rows)} | {mean_std([m['val_drop_points'] / 100 for m in measured])} "
                f"| {mean_std([m['test_top1'] for m in measured])}% | {mean_std(test_drop)} | {nodes} | "
                + " | ".join(latency)
                + " |"
            )
        lines += ["", *qat_gain(rows), ""]
    return "\n".join(lines)


def mean_ratio(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}x" if values else "-"


def qat_gain(rows: list[dict]) -> list[str]:
    """The ensemble teacher's gain over labels-only QAT, paired by run (test top-1 points)."""
    pairs = [r["variants"] for r in rows if r["variants"]["qat-ensemble"]["exported"]]
    pairs = [p for p in pairs if p["qat-labels"]["exported"]]
    gains = [p["qat-ensemble"]["test_top1"] - p["qat-labels"]["test_top1"] for p in pairs]
    if not gains:
        return []
    wins = sum(g > 0 for g in gains)
    return [
        f"QAT with the ensemble teacher minus QAT with labels only, paired by run: {mean_std(gains)} points "
        f"(higher in {wins} of {len(gains)})."
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="distill run directories (one per seed)")
    parser.add_argument("--students", default="0", help="student indices to study, e.g. 0,1")
    parser.add_argument("--out", type=Path, required=True, help="records and summary.md")
    parser.add_argument("--work", type=Path, help="model files and exports (default OUT/work, not committed)")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--tune-budget", default="30")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.3, help="the tuned variant's budget (points)")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args(argv)
    options.work = (options.work or options.out / "work").resolve()  # bench names artifacts by absolute path
    options.out.mkdir(parents=True, exist_ok=True)
    records = []
    for run_dir in options.runs:
        for student in [int(s) for s in options.students.split(",")]:
            path = options.out / f"{run_dir.name}-student{student}.json"
            if not path.exists():
                record = study(run_dir.resolve(), student, options)
                partial = path.with_suffix(".tmp")
                partial.write_text(json.dumps(record, indent=1) + "\n")
                partial.replace(path)
            records.append(json.loads(path.read_text()))
    (options.out / "summary.md").write_text(summary(records, options.batch_sizes.split(",")) + "\n")
    print((options.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
