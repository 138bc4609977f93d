"""The GPU suite (benchmarks/gpu_suite.py): a step over its box is killed and recorded while the others run, rows
written before a kill survive, and `--smoke` runs every step on CPU with finite numbers or a stated skip reason,
so the one short GPU run cannot fail on a detail."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the suite imports its sibling benchmark modules
spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
suite = sys.modules["gpu_suite"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(suite)

# Stand-ins for the child of each step: writes one row then ends well, fails, or outlives its box.
ROW = (
    "import json, pathlib; p = pathlib.Path(r'PATH'); p.parent.mkdir(parents=True, exist_ok=True); "
    "p.write_text(json.dumps({row}) + '\\n')"
)
PEAK = {"kind": "peak", "dtype": "float32", "tflops": 2.0}
PLAN = {"kind": "plan", "runs": ["vanilla-s0"], "config": {}}
CHILDREN = {
    "peak": ROW.format(row=PEAK),
    "reference": "import sys; print('first line'); print('boom: a typo'); sys.exit(3)",
    "compare": ROW.format(row=PLAN) + "; import time; time.sleep(60)",
}


def fake_children(monkeypatch, out: Path) -> None:
    def command(args, step):
        return [sys.executable, "-c", CHILDREN[step].replace("PATH", str(suite.rows_path(out, step)))]

    monkeypatch.setattr(suite, "child_command", command)


def test_a_failed_and_a_timed_out_step_are_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    fake_children(monkeypatch, tmp_path)
    monkeypatch.setattr(suite, "boxes", lambda budget, steps: {"peak": 60.0, "reference": 60.0, "compare": 5.0})
    monkeypatch.setattr(suite, "MIN_BOX_S", 5.0)  # the comparison gets what is left of the 1 s budget: 5 s at least
    args = suite.parse_args(["--out", str(tmp_path), "--smoke", "--budget-s", "1", "--only", "peak,reference,compare"])
    (tmp_path / "logs").mkdir()
    statuses = suite.run_suite(args)
    assert list(statuses) == ["peak", "reference", "compare"]
    assert statuses["peak"]["status"] == "ok"
    assert statuses["reference"] == {
        "status": "failed",
        "rc": 3,
        "seconds": statuses["reference"]["seconds"],
        "error": "boom: a typo",
    }
    assert statuses["compare"]["status"] == "timed out" and statuses["compare"]["seconds"] < 15
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == statuses
    assert results["peak"] == {"step": "peak", **PEAK}
    assert results["compare_plan"] == {"step": "compare", **PLAN}  # written before the kill: kept
    assert results["compare"] == []
    summary = (tmp_path / "summary.md").read_text()
    assert "| compare | timed out |" in summary and "boom: a typo" in summary
    assert "Not finished: vanilla-s0" in summary


def test_a_failed_configuration_is_an_error_row_and_the_next_one_still_runs(tmp_path):
    outcomes = [
        suite.attempt(tmp_path, "reference", "dml x 4", lambda: 1 / 0),
        suite.attempt(tmp_path, "reference", "dml x 3", lambda: {"kind": "throughput"}),
    ]
    assert outcomes == [False, True]
    assert suite.read_rows(tmp_path, "reference") == [
        {"kind": "error", "what": "dml x 4", "error": "ZeroDivisionError: division by zero"},
        {"kind": "throughput"},
    ]
    with pytest.raises(SystemExit, match="1 of 2 configurations failed"):
        suite.end_step("reference", outcomes)
    suite.end_step("reference", [True, True])


def test_boxes_share_the_budget_and_grow_when_steps_are_left_out():
    full = suite.boxes(1000.0, list(suite.SHARES))
    assert sum(full.values()) == pytest.approx(1000.0)
    assert full["compare"] == pytest.approx(440.0)
    assert suite.boxes(100.0, ["peak", "compare"]) == {"peak": suite.MIN_BOX_S, "compare": pytest.approx(93.62, 0.01)}


def test_the_real_run_refuses_a_missing_gpu_or_missing_data_before_spending_time(tmp_path, capsys):
    with pytest.raises(SystemExit):
        suite.preflight(suite.parse_args(["--out", str(tmp_path), "--device", "cpu", "--data-dir", str(tmp_path)]))
    assert "error: --data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.preflight(suite.parse_args(["--out", str(tmp_path), "--smoke", "--only", "peak,warp"]))
    assert "unknown steps warp" in capsys.readouterr().err


def test_mfu_counts_every_network_against_the_measured_peak():
    row = {"macs_per_image": 1_000_000, "networks": 5, "images_per_s": 2_000.0}
    assert suite.with_mfu([row], {"tflops": 0.12})[0]["mfu"] == pytest.approx(6e6 * 5 * 2000 / 0.12e12)
    assert suite.with_mfu([row], None)[0]["mfu"] is None


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_runs_every_step_with_finite_figures_or_a_skip_reason(tmp_path):
    import subprocess

    out = tmp_path / "suite"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--smoke", "--budget-s", "800"],
        check=True,
        cwd=ROOT,
    )
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert set(steps) == set(suite.SHARES)
    for step, status in steps.items():
        assert status["status"] == "ok" or (status["status"] == "skipped" and status["reason"]), (step, status)
    assert finite(results["peak"]["tflops"])
    measured = {(r["path"], r["mode"], r["method"], r["students"]) for r in results["throughput"]}
    for step in (s for s, status in steps.items() if status["status"] == "ok" and s not in ("peak", "compare")):
        path, mode = ("reference", "eager") if step == "reference" else step.split("-")
        assert {(path, mode, m, n) for m, n in suite.CONFIGS} <= measured, step
    assert all(finite(r[key]) for r in results["throughput"] for key in ("step_ms", "images_per_s", "mfu"))
    runs = {r["method"]: r for r in results["compare"]}
    assert set(runs) == set(suite.COMPARE_METHODS)
    assert all(0.0 <= r["shipped_test_top1"] <= 1.0 for r in runs.values())
    summary = (out / "summary.md").read_text()
    assert all(f"| {step} |" in summary for step in steps)
