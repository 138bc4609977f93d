"""Run the method comparison protocol and summarise it (RESULTS.md).

    python benchmarks/compare_methods.py configs/fmnist-compare.yaml [--only pcl,okdph] [--seeds 0]

Each entry -- a method at its paper defaults, or a named variant of one (other hyperparameters) -- trains
through the real CLI (`okdpipe distill`) for every seed, then `okdpipe select --strategy auto` picks the model
to ship on the validation split; the shipped MODEL.pt is then measured once on the test split. A finished run
leaves a small record in the protocol's `records` folder (committed to the repository, so the table can be filled
over several sessions and machines); a run with a record is skipped, and a killed run is resumed from its last
checkpoint. The summary (records/summary.md) is rewritten from the records: the main table, the seed papers'
claims checked seed by seed, the variants, the reference-only outputs and the weight-averaged candidates.
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


def entry_config(protocol: dict, name: str, seed: int) -> dict:
    """The distill config of one entry: a method name, or a variant {method, method_params, ...}."""
    variant = protocol.get("variants", {}).get(name, {"method": name})
    method = variant["method"]
    overrides = {k: v for k, v in variant.items() if k != "method"}
    return {
        **protocol["base"],
        **protocol.get("method_overrides", {}).get(method, {}),
        **overrides,
        "method": method,
        "seed": seed,
    }


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}-s{seed}"


def manifest(path: Path) -> dict:
    file = path / "manifest.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def okdpipe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "okdpipe", *args], check=True)


def train(protocol: dict, out: Path, name: str, seed: int) -> None:
    path = run_dir(out, name, seed)
    if manifest(path).get("status") == "finished":
        return
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / f".{name}-s{seed}.yaml"
    config_file.write_text(yaml.safe_dump(entry_config(protocol, name, seed)))
    resume = ["--resume"] if (path / "checkpoints" / "last.pt").is_file() else []
    started = time.time()
    okdpipe("distill", "--config", str(config_file), "--out", str(path), *resume)
    print(f"{name} seed {seed}: trained in {time.time() - started:.0f} s", flush=True)


def model_file_accuracy(model_file: Path, split: str = "test") -> float:
    """Top-1 of a MODEL.pt on its own dataset's `split` ("val" or "test"), from the file alone. The test split is
    measured once, for the record, and never used to choose anything."""
    import torch

    from okdpipe.contracts.data import DataSource
    from okdpipe.datasets import make_loader
    from okdpipe.distill.models import load_model_file

    model, info = load_model_file(model_file)
    bundle = DataSource.from_record(info.provenance["data"], model_file).load()  # the split select scored on
    images = bundle.test if split == "test" else bundle.val
    loader = make_loader(images, bundle.spec, batch_size=512, train=False, device="cpu")
    with torch.no_grad():
        hits = sum(int((model(b.views[0]).argmax(1) == b.labels).sum()) for b in loader.epoch(0))
    return hits / len(images)


def record_path(records: Path, name: str, seed: int) -> Path:
    return records / f"{name}-s{seed}.json"


def chosen_val_top1(selection: dict) -> float:
    """The validation top-1 that `okdpipe select` recorded for the model it chose (selection.json)."""
    return next(c["val_top1"] for c in selection["candidates"] if c["chosen"])


def select_and_measure(out: Path, records: Path, name: str, seed: int) -> dict:
    path = run_dir(out, name, seed)
    okdpipe("select", str(path), "--strategy", "auto")
    selection = json.loads((path / "selection.json").read_text())
    state = manifest(path)
    result = {
        "entry": name,
        "method": state["config"]["method"],
        "seed": seed,
        "shipped": selection["chosen"],
        "shipped_val_top1": chosen_val_top1(selection),
        "shipped_test_top1": model_file_accuracy(Path(selection["model_file"])),
        "ensemble_test_top1": state["test"]["ensemble"]["top1"],
        "students_test_top1": {k: v["top1"] for k, v in state["test"].items() if k.startswith("student:")},
        "extras_test_top1": {
            k: v["top1"] for k, v in state["test"].items() if not k.startswith("student:") and k != "ensemble"
        },
        "candidates_val": {c["candidate"]: c for c in selection["candidates"]},
        "train_seconds": sum(e["seconds"] for e in state["epochs"]),
        "wall_seconds": wall_seconds(state),
        "students": state["students"]["count"],
        "config": state["config"],
    }
    records.mkdir(parents=True, exist_ok=True)
    record_path(records, name, seed).write_text(json.dumps(result, indent=2) + "\n")
    return result


def wall_seconds(state: dict) -> float:
    """From the run's manifest: first start to finish (a resumed run includes the time it lay killed)."""
    from datetime import datetime

    return (datetime.fromisoformat(state["finished"]) - datetime.fromisoformat(state["created"])).total_seconds()


def entry_of(record: dict) -> str:
    """Records written before variants existed name only the method."""
    return record.get("entry", record["method"])


def percent(values: list[float]) -> str:
    """Mean ± sample standard deviation over seeds, in percent."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (one seed)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def by_entry(results: list[dict], name: str) -> dict[int, dict]:
    return {r["seed"]: r for r in results if entry_of(r) == name}


def results_table(results: list[dict], names: list[str]) -> str:
    rows = [
        "| entry | method | students | seeds | shipped model (val top-1 %) | shipped model (test top-1 %) | "
        "ensemble (test top-1 %) | shipped candidates | wall time per run (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        mine = list(by_entry(results, name).values())
        if not mine:
            rows.append(f"| {name} | | | 0 | not run yet | | | | |")
            continue
        shipped = sorted({r["shipped"] for r in mine})
        rows.append(
            f"| {name} | {mine[0]['method']} | {mine[0]['students']} | {len(mine)} | "
            f"{percent([r['shipped_val_top1'] for r in mine])} | "
            f"{percent([r['shipped_test_top1'] for r in mine])} | "
            f"{percent([r['ensemble_test_top1'] for r in mine])} | {', '.join(shipped)} | "
            f"{statistics.mean(r['wall_seconds'] for r in mine):.0f} |"
        )
    return "\n".join(rows)


def points(diffs: list[float]) -> str:
    """Paired differences in points: mean ± std, and in how many seeds the difference is positive."""
    if not diffs:
        return "-"
    spread = f" ± {100 * statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    wins = sum(d > 0 for d in diffs)
    return f"{100 * statistics.mean(diffs):+.2f}{spread} ({wins}/{len(diffs)} seeds > 0)"


def versus_table(results: list[dict], pairs: list[tuple[str, str]]) -> str:
    """Shipped-model test accuracy of entry a against entry b over the seeds both have (a seed fixes the split,
    the training subset and the data order): the mean gap against the larger of the two seed spreads. The
    validation gap beside it is what a choice between the two (a sweep) may be made on."""
    rows = [
        "| a | b | seeds | val: a - b, paired by seed (points) | test: a - b, paired by seed (points) | "
        "larger test seed std (points) | a beats b on test by more than the seed spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, b in pairs:
        mine, theirs = by_entry(results, a), by_entry(results, b)
        seeds = sorted(mine.keys() & theirs.keys())
        if len(seeds) < 2:
            rows.append(f"| {a} | {b} | {len(seeds)} | needs 2 common seeds | | | |")
            continue
        gaps = {
            split: [mine[s][f"shipped_{split}_top1"] - theirs[s][f"shipped_{split}_top1"] for s in seeds]
            for split in ("val", "test")
        }
        spread = max(statistics.stdev([entries[s]["shipped_test_top1"] for s in seeds]) for entries in (mine, theirs))
        rows.append(
            f"| {a} | {b} | {len(seeds)} | {points(gaps['val'])} | {points(gaps['test'])} | "
            f"{100 * spread:.2f} | {'yes' if statistics.mean(gaps['test']) > spread else 'no'} |"
        )
    return "\n".join(rows)


def best_student(record: dict, split: str, common_only: bool = False) -> float:
    """Top-1 on `split` ("val" or "test") of the student that validated best; `common_only` leaves out the last
    student (FFSD's leader)."""
    students = sorted(
        (k for k in record["candidates_val"] if k.startswith("student:")), key=lambda k: int(k.split(":")[1])
    )
    name = max(students[:-1] if common_only else students, key=lambda k: record["candidates_val"][k]["val_top1"])
    return record["candidates_val"][name]["val_top1"] if split == "val" else record["students_test_top1"][name]


def candidate_top1(record: dict, name: str, split: str) -> float:
    return record["candidates_val"][name]["val_top1"] if split == "val" else record["extras_test_top1"][name]


# The claims about one method's own models: (method, its model, what it is compared with, common students only).
MODEL_CLAIMS = [
    ("okdph", "hybrid", "best student", False),
    ("ffsd", "leader", "best common student", True),
    ("pcl", "mean-teacher:0", "best student", False),
]  # the paper ships PCL's peer mean teacher


def model_claims(results: list[dict]) -> str:
    """Each claimed model against the student that validated best, seed by seed, on validation and on test."""
    rows = [
        "| method | model | against (chosen by validation) | val: model - other (points) | "
        "test: model - other (points) |",
        "|---|---|---|---|---|",
    ]
    for method, model, other, common_only in MODEL_CLAIMS:
        mine = list(by_entry(results, method).values())
        diffs = {
            split: [candidate_top1(r, model, split) - best_student(r, split, common_only) for r in mine]
            for split in ("val", "test")
        }
        rows.append(f"| {method} | {model} | {other} | {points(diffs['val'])} | {points(diffs['test'])} |")
    return "\n".join(rows)


def reference_table(results: list[dict], names: list[str]) -> str:
    """Test top-1 of every output beyond the students and the shipped model: candidates and reference-only outputs
    (FFSD's fusion head, PCL-E), over the seeds that recorded them."""
    rows = ["| entry | output | seeds | test top-1 % |", "|---|---|---|---|"]
    for name in names:
        mine = list(by_entry(results, name).values())
        keys = sorted({k for r in mine for k in r["extras_test_top1"]})
        for key in keys:
            values = [r["extras_test_top1"][key] for r in mine if key in r["extras_test_top1"]]
            rows.append(f"| {name} | {key} | {len(values)} | {percent(values)} |")
    return "\n".join(rows)


def averaging_table(results: list[dict], names: list[str]) -> str:
    """Weight-averaged candidates (OKDPH's hybrid, the students' soup): validation top-1 with and without
    recomputing BatchNorm statistics, next to the best single student."""
    rows = [
        "| entry | candidate | seeds | val top-1 %, BN recalibrated | val top-1 %, averaged BN stats | "
        "best student (val %) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        mine = list(by_entry(results, name).values())
        averaged = sorted({k for r in mine for k, c in r["candidates_val"].items() if c.get("weight_averaged")})
        for key in averaged:
            rows.append(
                f"| {name} | {key} | {len(mine)} | "
                f"{percent([r['candidates_val'][key]['val_top1'] for r in mine])} | "
                f"{percent([r['candidates_val'][key]['val_top1_without_bn_recalibration'] for r in mine])} | "
                f"{percent([best_student(r, 'val') for r in mine])} |"
            )
    return "\n".join(rows)


def summarise(protocol: dict, results: list[dict]) -> str:
    methods, variants = protocol["methods"], list(protocol.get("variants", {}))
    against_vanilla = [(m, "vanilla") for m in methods if m != "vanilla"]
    seed_claims = [(a, b) for a in ("pcl", "okdph") for b in ("dml", "one")]
    variant_pairs = [(v, protocol["variants"][v]["method"]) for v in variants]
    sections = [
        ("Methods at their paper defaults", results_table(results, methods)),
        ("Against vanilla", versus_table(results, against_vanilla)),
        ("Seed papers: PCL and OKDPH above DML and ONE", versus_table(results, seed_claims)),
        ("Seed papers: a method's own models", model_claims(results)),
        ("Variants", results_table(results, variants)),
        ("Variants against their method's defaults", versus_table(results, variant_pairs)),
        ("Other outputs (candidates and reference-only)", reference_table(results, methods + variants)),
        ("Weight-averaged candidates", averaging_table(results, methods + variants)),
    ]
    return "\n\n".join(f"### {title}\n\n{table}" for title, table in sections)


def schedule(protocol: dict, names: list[str] | None, seeds: list[int] | None) -> list[tuple[str, int]]:
    """(entry, seed) pairs to run, seed-major (a partial table has every method at seed 0 first), methods first."""
    plan = []
    for group, group_seeds in (
        (protocol["methods"], protocol["seeds"]),
        (list(protocol.get("variants", {})), protocol.get("variant_seeds", protocol["seeds"])),
    ):
        for seed in seeds or group_seeds:
            plan += [(name, seed) for name in group if names is None or name in names]
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", type=Path)
    parser.add_argument("--only", help="comma-separated entries (methods or variants) to run (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds to run (default: the protocol's)")
    parser.add_argument("--summary-only", action="store_true", help="only rewrite the summary")
    args = parser.parse_args()
    protocol = yaml.safe_load(args.protocol.read_text())
    out, records = Path(protocol["out"]), Path(protocol["records"])
    names = args.only.split(",") if args.only else None
    known = [*protocol["methods"], *protocol.get("variants", {})]
    if names and set(names) - set(known):
        parser.error(
            f"--only: unknown entries {', '.join(sorted(set(names) - set(known)))}; the protocol has {', '.join(known)}"
        )
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if not args.summary_only:
        for name, seed in schedule(protocol, names, seeds):
            if not record_path(records, name, seed).is_file():
                train(protocol, out, name, seed)
                select_and_measure(out, records, name, seed)
    results = [json.loads(p.read_text()) for p in sorted(records.glob("*-s*.json"))]
    records.mkdir(parents=True, exist_ok=True)
    summary = summarise(protocol, results)
    (records / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
