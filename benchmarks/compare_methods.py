"""Run the method comparison protocol and summarise it (RESULTS.md).

    python benchmarks/compare_methods.py configs/fmnist-compare.yaml [--only pcl,okdph] [--seeds 0]

Each (method, seed) trains through the real CLI (`okdpipe distill`), then `okdpipe select --strategy auto`
picks the model to ship on the validation split; the shipped MODEL.pt is then measured once on the test split.
A finished run leaves a small record in the protocol's `records` folder (committed to the repository, so the
table can be filled over several sessions and machines); a run with a record is skipped, and a killed run is
resumed from its last checkpoint. The summary (records/summary.md) is rewritten from the records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}-s{seed}"


def manifest(path: Path) -> dict:
    file = path / "manifest.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def okdpipe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "okdpipe.cli", *args], check=True)


def train(protocol: dict, out: Path, method: str, seed: int) -> None:
    path = run_dir(out, method, seed)
    state = manifest(path)
    if state.get("status") == "finished":
        return
    config = {**protocol["base"], **protocol.get("method_overrides", {}).get(method, {}), "method": method,
              "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / f".{method}-s{seed}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    resume = ["--resume"] if (path / "checkpoints" / "last.pt").is_file() else []
    started = time.time()
    okdpipe("distill", "--config", str(config_file), "--out", str(path), *resume)
    print(f"{method} seed {seed}: trained in {time.time() - started:.0f} s", flush=True)


def shipped_test_accuracy(model_file: Path) -> float:
    """Top-1 of the shipped model on the test split: measured once, never used to choose anything."""
    import torch

    from okdpipe.datasets import load_dataset, make_loader
    from okdpipe.modelfile import load_model_file

    model, info = load_model_file(model_file)
    data = info.provenance["data"]
    bundle = load_dataset(data["dataset"], data["data_dir"], val_split=data["val_split"], seed=data["seed"],
                          **data.get("options", {}))
    loader = make_loader(bundle.test, bundle.spec, batch_size=512, train=False, device="cpu")
    with torch.no_grad():
        hits = sum(int((model(b.views[0]).argmax(1) == b.labels).sum()) for b in loader.epoch(0))
    return hits / len(bundle.test)


def record_path(records: Path, method: str, seed: int) -> Path:
    return records / f"{method}-s{seed}.json"


def select_and_measure(out: Path, records: Path, method: str, seed: int) -> dict:
    path = run_dir(out, method, seed)
    okdpipe("select", str(path), "--strategy", "auto")
    selection = json.loads((path / "selection.json").read_text())
    state = manifest(path)
    result = {
        "method": method, "seed": seed, "shipped": selection["chosen"],
        "shipped_val_top1": next(c["val_top1"] for c in selection["candidates"] if c["chosen"]),
        "shipped_test_top1": shipped_test_accuracy(Path(selection["model_file"])),
        "ensemble_test_top1": state["test"]["ensemble"]["top1"],
        "students_test_top1": {k: v["top1"] for k, v in state["test"].items() if k.startswith("student:")},
        "extras_test_top1": {k: v["top1"] for k, v in state["test"].items()
                             if not k.startswith("student:") and k != "ensemble"},
        "candidates_val": {c["candidate"]: c for c in selection["candidates"]},
        "train_seconds": sum(e["seconds"] for e in state["epochs"]),
        "wall_seconds": wall_seconds(state),
        "students": state["students"]["count"],
        "config": state["config"],
    }
    records.mkdir(parents=True, exist_ok=True)
    record_path(records, method, seed).write_text(json.dumps(result, indent=2) + "\n")
    return result


def wall_seconds(state: dict) -> float:
    """From the run's manifest: first start to finish (a resumed run includes the time it lay killed)."""
    from datetime import datetime

    return (datetime.fromisoformat(state["finished"]) - datetime.fromisoformat(state["created"])).total_seconds()


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (one seed, no spread yet)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def summarise(protocol: dict, results: list[dict]) -> str:
    rows = ["| method | students | seeds | shipped model (test top-1 %) | ensemble (test top-1 %) | "
            "shipped candidates | wall time per run (s) |", "|---|---|---|---|---|---|---|"]
    for method in protocol["methods"]:
        mine = [r for r in results if r["method"] == method]
        if not mine:
            rows.append(f"| {method} | | 0 | not run yet | | | |")
            continue
        shipped = sorted({r["shipped"] for r in mine})
        rows.append(f"| {method} | {mine[0]['students']} | {len(mine)} | "
                    f"{mean_std([r['shipped_test_top1'] for r in mine])} | "
                    f"{mean_std([r['ensemble_test_top1'] for r in mine])} | {', '.join(shipped)} | "
                    f"{statistics.mean(r['wall_seconds'] for r in mine):.0f} |")
    return "\n".join(rows)


def averaging_table(results: list[dict]) -> str:
    """Weight-averaged candidates (OKDPH's hybrid, the students' soup): validation top-1 with and without
    recomputing BatchNorm statistics, next to the best single student."""
    rows = ["| method | seed | candidate | val top-1, BN recalibrated | val top-1, averaged BN stats | "
            "best student (val) |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        best = max(c["val_top1"] for name, c in r["candidates_val"].items() if name.startswith("student:"))
        for name, c in r["candidates_val"].items():
            if c.get("weight_averaged"):
                rows.append(f"| {r['method']} | {r['seed']} | {name} | {100 * c['val_top1']:.2f} | "
                            f"{100 * c['val_top1_without_bn_recalibration']:.2f} | {100 * best:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", type=Path)
    parser.add_argument("--only", help="comma-separated methods to run (default: all in the protocol)")
    parser.add_argument("--seeds", help="comma-separated seeds to run (default: the protocol's)")
    parser.add_argument("--summary-only", action="store_true", help="only rewrite the summary")
    args = parser.parse_args()
    protocol = yaml.safe_load(args.protocol.read_text())
    out, records = Path(protocol["out"]), Path(protocol["records"])
    methods = args.only.split(",") if args.only else protocol["methods"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else protocol["seeds"]
    if not args.summary_only:
        for seed in seeds:  # seed-major: a partial table has every method at seed 0 first
            for method in methods:
                if not record_path(records, method, seed).is_file():
                    train(protocol, out, method, seed)
                    select_and_measure(out, records, method, seed)
    results = [json.loads(p.read_text()) for p in sorted(records.glob("*-s*.json"))]
    table = summarise(protocol, results) + "\n\n" + averaging_table(results)
    records.mkdir(parents=True, exist_ok=True)
    (records / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
