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


def model_claims(results: list[dict], methods: list[str]) -> str:
    """Each claimed model of a method in `methods` against the student that validated best, seed by seed, on
    validation and on test."""
    rows = [
        "| method | model | against (chosen by validation) | val: model - other (points) | "
        "test: model - other (points) |",
        "|---|---|---|---|---|",
    ]
    for method, model, other, common_only in [claim for claim in MODEL_CLAIMS if claim[0] in methods]:
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


def architecture_table(results: list[dict], names: list[str]) -> str:
    """Every student of an entry whose students differ in backbone (`arch: a,b`), by validation and test top-1,
    so that each backbone trained in the group can be set against the same backbone trained alone."""
    rows = ["| entry | student | backbone | seeds | val top-1 % | test top-1 % |", "|---|---|---|---|---|---|"]
    for name in names:
        mine = list(by_entry(results, name).values())
        students = sorted({k for r in mine for k in r["students_test_top1"]}, key=lambda k: int(k.split(":")[1]))
        backbones = {k: sorted({r["candidates_val"][k].get("arch", "?") for r in mine}) for k in students}
        if len({arch for archs in backbones.values() for arch in archs}) < 2:
            continue
        for key in students:
            val = [r["candidates_val"][key]["val_top1"] for r in mine]
            test = [r["students_test_top1"][key] for r in mine]
            rows.append(
                f"| {name} | {key} | {', '.join(backbones[key])} | {len(mine)} | {percent(val)} | {percent(test)} |"
            )
    return "\n".join(rows)


def student_with(record: dict, backbone: str) -> str | None:
    """The one student of `record` built on `backbone` (None when there is none, or more than one)."""
    keys = [k for k, c in record["candidates_val"].items() if k.startswith("student:") and c.get("arch") == backbone]
    return keys[0] if len(keys) == 1 else None


def backbone_versus_table(results: list[dict], pairs: list[tuple[str, str]]) -> str:
    """For entries whose students differ in backbone: each backbone's student in entry a against the same
    backbone's student in entry b (e.g. trained with a peer by DML against trained alone), paired by seed."""
    rows = [
        "| a | b | backbone | seeds | val: a - b, paired by seed (points) | test: a - b, paired by seed (points) |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in pairs:
        mine, theirs = by_entry(results, a), by_entry(results, b)
        seeds = sorted(mine.keys() & theirs.keys())
        backbones = sorted({c.get("arch") for s in seeds for c in mine[s]["candidates_val"].values() if "arch" in c})
        if len(backbones) < 2:
            continue
        for backbone in backbones:
            paired = [
                (mine[s], theirs[s])
                for s in seeds
                if student_with(mine[s], backbone) and student_with(theirs[s], backbone)
            ]
            diffs = {
                split: [best_of(x, backbone, split) - best_of(y, backbone, split) for x, y in paired]
                for split in ("val", "test")
            }
            rows.append(
                f"| {a} | {b} | {backbone} | {len(paired)} | {points(diffs['val'])} | {points(diffs['test'])} |"
            )
    return "\n".join(rows)


def best_of(record: dict, backbone: str, split: str) -> float:
    key = student_with(record, backbone)
    return record["candidates_val"][key]["val_top1"] if split == "val" else record["students_test_top1"][key]


def summarise(protocol: dict, results: list[dict]) -> str:
    """Every table that has a row for this protocol (a comparison of two methods only shows no seed-paper claim
    about methods it did not train)."""
    methods, variants = protocol["methods"], list(protocol.get("variants", {}))
    against_vanilla = [(m, "vanilla") for m in methods if m != "vanilla"]
    seed_claims = [(a, b) for a in ("pcl", "okdph") for b in ("dml", "one") if {a, b} <= set(methods)]
    variant_pairs = [(v, protocol["variants"][v]["method"]) for v in variants]
    sections = [
        ("Methods at their paper defaults", results_table(results, methods)),
        ("Against vanilla", versus_table(results, against_vanilla)),
        ("Seed papers: PCL and OKDPH above DML and ONE", versus_table(results, seed_claims)),
        ("Seed papers: a method's own models", model_claims(results, methods)),
        ("Students by backbone", architecture_table(results, methods + variants)),
        ("Each backbone against vanilla", backbone_versus_table(results, against_vanilla)),
        ("Variants", results_table(results, variants)),
        ("Variants against their method's defaults", versus_table(results, variant_pairs)),
        ("Other outputs (candidates and reference-only)", reference_table(results, methods + variants)),
        ("Weight-averaged candidates", averaging_table(results, methods + variants)),
    ]
    with_rows = [(title, table) for title, table in sections if table.count("\n") > 1]  # more than the header
    return "\n\n".join(f"### {title}\n\n{table}" for title, table in with_rows)
