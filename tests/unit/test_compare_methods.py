"""The comparison runner (benchmarks/compare_methods.py): what each entry trains, in which order, and the claims
its summary states, checked on hand-made records."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

PROTOCOL = {
    "base": {"arch": "resnet8", "epochs": 15, "weight_decay": 5e-4},
    "seeds": [0, 1, 2],
    "methods": ["vanilla", "pcl", "ffsd"],
    "method_overrides": {"pcl": {"optimizer": "nesterov"}},
    "variant_seeds": [0],
    "variants": {"pcl-ema0.99": {"method": "pcl", "method_params": {"ema_decay": 0.99}}},
}


def record(entry, seed, test, students_val, students_test, extras_val=None, extras_test=None, val=None):
    """A record as select_and_measure writes it (only the fields the summary reads)."""
    candidates = {k: {"candidate": k, "val_top1": v} for k, v in {**students_val, **(extras_val or {})}.items()}
    method = entry.split("-")[0]
    return {
        "entry": entry,
        "method": method,
        "seed": seed,
        "shipped": "student:0",
        "shipped_val_top1": test if val is None else val,
        "shipped_test_top1": test,
        "ensemble_test_top1": test,
        "students_test_top1": students_test,
        "extras_test_top1": extras_test or {},
        "candidates_val": candidates,
        "wall_seconds": 10.0,
        "students": len(students_val),
    }


def test_a_variant_trains_its_method_with_the_method_overrides_and_its_own_params():
    config = compare.entry_config(PROTOCOL, "pcl-ema0.99", 4)
    assert config == {
        "arch": "resnet8",
        "epochs": 15,
        "weight_decay": 5e-4,
        "optimizer": "nesterov",
        "method_params": {"ema_decay": 0.99},
        "method": "pcl",
        "seed": 4,
    }
    assert compare.entry_config(PROTOCOL, "vanilla", 0)["method"] == "vanilla"


def test_schedule_is_seed_major_methods_before_variants_and_honours_only():
    assert compare.schedule(PROTOCOL, None, None) == [
        ("vanilla", 0),
        ("pcl", 0),
        ("ffsd", 0),
        ("vanilla", 1),
        ("pcl", 1),
        ("ffsd", 1),
        ("vanilla", 2),
        ("pcl", 2),
        ("ffsd", 2),
        ("pcl-ema0.99", 0),
    ]
    assert compare.schedule(PROTOCOL, ["pcl", "pcl-ema0.99"], [5]) == [("pcl", 5), ("pcl-ema0.99", 5)]


def test_versus_pairs_seeds_and_needs_the_gap_to_exceed_the_larger_spread():
    results = [record("vanilla", s, t, {"student:0": t}, {"student:0": t}) for s, t in enumerate([0.80, 0.81, 0.82])]
    results += [
        record("pcl", s, t, {"student:0": t}, {"student:0": t}, val=t - 0.02) for s, t in enumerate([0.83, 0.84, 0.85])
    ]
    results.append(record("pcl", 7, 0.10, {"student:0": 0.1}, {"student:0": 0.1}))  # no vanilla seed 7: left out
    row = compare.versus_table(results, [("pcl", "vanilla")]).splitlines()[2]
    assert row == "| pcl | vanilla | 3 | +1.00 ± 0.00 (3/3 seeds > 0) | +3.00 ± 0.00 (3/3 seeds > 0) | 1.00 | yes |"
    close = [r for r in results if r["entry"] == "vanilla"]
    close += [record("ffsd", s, t, {"student:0": t}, {"student:0": t}) for s, t in enumerate([0.805, 0.815, 0.825])]
    assert compare.versus_table(close, [("ffsd", "vanilla")]).splitlines()[2].endswith("| 1.00 | no |")


def test_model_claims_compare_with_the_student_chosen_on_validation():
    # FFSD: the leader is the last student; the best *common* student by validation is student:1, whose test
    # accuracy (0.70) is lower than student:0's (0.90): the claim must use 0.70, never the best test score.
    ffsd = record(
        "ffsd",
        0,
        0.8,
        {"student:0": 0.60, "student:1": 0.65, "student:2": 0.99},
        {"student:0": 0.90, "student:1": 0.70, "student:2": 0.80},
        extras_val={"leader": 0.99},
        extras_test={"leader": 0.80},
    )
    rows = {line.split(" | ")[0][2:]: line for line in compare.model_claims([ffsd]).splitlines()[2:]}
    assert "| +34.00 (1/1 seeds > 0) | +10.00 (1/1 seeds > 0) |" in rows["ffsd"]
    assert compare.best_student(ffsd, "test") == 0.80  # all students: student:2 validates best
    assert compare.best_student(ffsd, "test", common_only=True) == 0.70


def test_mean_and_spread_are_in_percent_with_the_sample_std():
    assert compare.percent([0.8, 0.9]) == "85.00 ± 7.07"
    assert compare.percent([0.8]) == "80.00 (one seed)"
    assert compare.points([0.01, -0.02, 0.04]) == "+1.00 ± 3.00 (2/3 seeds > 0)"


def test_old_records_without_an_entry_name_count_as_their_method():
    old = record("dml", 0, 0.8, {"student:0": 0.8}, {"student:0": 0.8})
    del old["entry"]
    assert compare.entry_of(old) == "dml"
    row = compare.results_table([old], ["dml"]).splitlines()[2]
    assert row.startswith("| dml | dml | 1 | 1 | 80.00 (one seed) | 80.00")


@pytest.mark.parametrize("section", ["Against vanilla", "Seed papers: a method's own models", "Variants"])
def test_summary_has_every_section(section):
    assert f"### {section}\n" in compare.summarise(PROTOCOL, [])
