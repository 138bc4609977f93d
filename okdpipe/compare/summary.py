"""The comparison's summary (records/summary.md, RESULTS.md's tables), rewritten from the records alone: the main
table, the seed papers' claims checked seed by seed, the variants, the reference-only outputs and the
weight-averaged candidates. Pure functions of the records (no torch), so `--summary-only` regenerates the tables
byte for byte from the committed records on any machine.
"""

from __future__ import annotations

import statistics


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
