"""Gate expressions, policies, baselines, JUnit XML and the Markdown verdict, on a hand-written report."""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET

import pytest

from okdpipe.bench.gate import (
    Gate,
    GateUsageError,
    evaluate_gates,
    load_baseline,
    load_policy,
    parse_gate,
    validate_gates,
)
from okdpipe.bench.report import junit_xml, markdown
from okdpipe.contracts.report import BenchReport


def point(p99: float, images_per_s: float, batch: int = 1) -> dict:
    return {
        "batch_size": batch,
        "runs": 20,
        "p50_ms": p99 / 2,
        "p90_ms": p99 * 0.8,
        "p99_ms": p99,
        "mean_ms": p99 / 2,
        "min_ms": p99 / 4,
        "images_per_s": images_per_s,
        "gflops_per_s": None,
        "peak_fraction": None,
    }


def entry(name: str, kind: str, precision: str, top1: float, p99: float, macs: int | None = 1000) -> dict:
    return {
        "name": name,
        "kind": kind,
        "precision": precision,
        "path": f"/out/{precision}",
        "dataset": "synthetic",
        "of": [],
        "provenance": {},
        "device": "CPUExecutionProvider",
        "params": 10,
        "macs": macs,
        "start_ms": 5.0,
        "memory": {"peak_rss_delta_mb": 3.0, "method": "VmRSS growth"},
        "accuracy": {"split": "test", "top1": top1, "top5": 1.0, "samples": 100},
        "latency": {"1": point(p99, 500.0), "64": point(p99 * 10, 4000.0, batch=64)},
    }


@pytest.fixture
def report() -> BenchReport:
    return BenchReport.from_dict(
        {
            "schema_version": 1,
            "artifacts": [
                entry("net", "onnx", "fp32", 0.92, 2.0),
                entry("net-int8", "onnx", "int8", 0.90, 1.0, macs=None),
            ],
            "references": [entry("ensemble (2 x net)", "ensemble", "fp32", 0.94, 5.0, macs=2000)],
            "notes": [],
        },
        "test report",
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("top1>=0.90", Gate("top1>=0.90", "top1", ">=", 0.90)),
        (" p99_ms@1 <= 2 ", Gate(" p99_ms@1 <= 2 ", "p99_ms", "<=", 2.0, batch=1)),
        ("images_per_s@64>=1e3", Gate("images_per_s@64>=1e3", "images_per_s", ">=", 1000.0, batch=64)),
        ("int8:top1>.9", Gate("int8:top1>.9", "top1", ">", 0.9, selector="int8")),
        ("top1>=baseline-0.005", Gate("top1>=baseline-0.005", "top1", ">=", 0.005, relation="-")),
        ("p99_ms@1<=baseline*1.10", Gate("p99_ms@1<=baseline*1.10", "p99_ms", "<=", 1.10, relation="*", batch=1)),
        ("macs==baseline", Gate("macs==baseline", "macs", "==", 0.0, relation="=")),
        (
            "ensemble : start_ms < baseline + 5",
            Gate("ensemble : start_ms < baseline + 5", "start_ms", "<", 5.0, relation="+", selector="ensemble"),
        ),
    ],
)
def test_parse_every_form(text, expected):
    assert parse_gate(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("top1 is high", "cannot parse gate"),
        ("top1>=ninety", "cannot parse gate"),
        ("top1=>0.9", "cannot parse gate"),
        ("top1>=baseline/2", "cannot parse gate"),
        ("accuracy>=0.9", "unknown metric 'accuracy'"),
        ("p99_ms<=2", "p99_ms is per batch size; write e.g. p99_ms@1"),
        ("top1@8>=0.9", "top1 does not depend on the batch size"),
        ("top1>=\u0660.9", "cannot parse gate"),  # Arabic-Indic zero: a digit to \\d, not a number to a gate
        ("p99_ms@\u0661<=3", "cannot parse gate"),
        ("top1>=\u00b9", "cannot parse gate"),  # superscript one
        ("p99_ms@0<=3", "p99_ms is per batch size"),
        ("top1>=1e999", "inf is not a finite number"),
        ("p99_ms@1<=baseline*1e400", "inf is not a finite number"),
    ],
)
def test_unusable_gates_are_usage_errors_with_exit_code_2(text, message):
    with pytest.raises(GateUsageError, match=message) as caught:
        parse_gate(text)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_gate_without_selector_applies_to_every_onnx_artifact(report):
    results = evaluate_gates(report, ["top1>=0.91"])
    assert [(r.artifact, r.value, r.threshold, r.passed) for r in results] == [
        ("net", 0.92, 0.91, True),
        ("net-int8", 0.90, 0.91, False),
    ]
    assert results[1].detail == "0.9 is not >= 0.91, off by 0.01"
    assert results[0].detail == "0.92 >= 0.91, margin 0.01"


@pytest.mark.parametrize(
    "selector, chosen",
    [
        ("int8", ["net-int8"]),
        ("net", ["net"]),
        ("fp32", ["net", "ensemble (2 x net)"]),
        ("ensemble", ["ensemble (2 x net)"]),
        ("onnx", ["net", "net-int8"]),
    ],
)
def test_selectors_match_name_precision_kind_or_directory(report, selector, chosen):
    assert [r.artifact for r in evaluate_gates(report, [f"{selector}:p99_ms@64<=100"])] == chosen


def test_batch_metrics_read_their_batch_size(report):
    [result] = evaluate_gates(report, ["int8:images_per_s@64>=4000"])
    assert result.value == 4000.0 and result.passed and result.metric == "images_per_s@64"


def test_unselected_or_unmeasured_is_a_usage_error(report):
    with pytest.raises(GateUsageError, match="selects no report entry .*entries: net, net-int8"):
        evaluate_gates(report, ["fp16:top1>=0.9"])
    with pytest.raises(GateUsageError, match="the report has no macs for 'net-int8'"):
        evaluate_gates(report, ["macs<=2000"])
    with pytest.raises(GateUsageError, match="no p99_ms@8 for 'net'"):
        evaluate_gates(report, ["p99_ms@8<=1"])


def test_baseline_relative_gates(report):
    baseline = copy.deepcopy(report)
    baseline.artifacts[0].accuracy.top1 = 0.924  # net dropped 0.4 points: within 0.5
    baseline.artifacts[1].accuracy.top1 = 0.906  # net-int8 dropped 0.6 points: over
    results = evaluate_gates(report, ["top1>=baseline-0.005"], baseline=baseline)
    assert [(r.artifact, r.passed) for r in results] == [("net", True), ("net-int8", False)]
    assert results[1].threshold == pytest.approx(0.901) and "(baseline 0.906)" in results[1].detail
    baseline.artifacts[0].latency[1].p99_ms = 1.8  # 2.0 is 11% more than 1.8
    [grown] = evaluate_gates(report, ["net:p99_ms@1<=baseline*1.10"], baseline=baseline)
    assert not grown.passed and grown.threshold == pytest.approx(1.98)


def test_a_baseline_relative_threshold_that_overflows_fails_the_gate(report):
    """baseline*1e308 turns a finite baseline into an infinite threshold: no gate passes against infinity."""
    baseline = copy.deepcopy(report)
    baseline.artifacts[0].latency[1].p99_ms = 5.0
    [result] = evaluate_gates(report, ["net:p99_ms@1<=baseline*1e308"], baseline=baseline)
    assert not result.passed and "against inf: not a finite number, so it fails" in result.detail


def test_baseline_matches_by_name_then_unique_precision(report):
    baseline = copy.deepcopy(report)
    baseline.artifacts[0].name = "net-v1"  # renamed, but the only onnx fp32 entry
    [result] = evaluate_gates(report, ["net:top1>=baseline"], baseline=baseline)
    assert result.threshold == 0.92
    baseline.artifacts[0].kind = "pytorch"
    with pytest.raises(GateUsageError, match="baseline has no entry matching 'net'"):
        evaluate_gates(report, ["net:top1>=baseline"], baseline=baseline)


def test_an_ambiguous_baseline_is_a_usage_error_not_the_first_match(report):
    """No entry named 'net' and two onnx fp32 entries in the baseline: gating against whichever came first would
    pass or fail by the order of the baseline's entries."""
    baseline = copy.deepcopy(report)
    baseline.artifacts[0].name = "net-a"
    second = copy.deepcopy(baseline.artifacts[0])
    second.name, second.accuracy.top1 = "net-b", 0.99  # net (0.92) fails against this one, passes against net-a
    baseline.artifacts.append(second)
    with pytest.raises(GateUsageError, match=r"several onnx entries that could match 'net' \(net-a, net-b\)"):
        evaluate_gates(report, ["net:top1>=baseline"], baseline=baseline)
    baseline.artifacts[1].name = "net"  # a same-name match wins over precision, and it is unique
    [result] = evaluate_gates(report, ["net:top1>=baseline"], baseline=baseline)
    assert result.threshold == 0.90 and result.passed


def test_baseline_gate_without_baseline_is_a_usage_error(report):
    with pytest.raises(GateUsageError, match="pass --baseline OLD_REPORT.json"):
        evaluate_gates(report, ["top1>=baseline-0.005"])
    with pytest.raises(GateUsageError, match="pass --baseline"):
        validate_gates(["top1>=baseline"], None, None, (1,))


def test_validate_rejects_batch_sizes_not_benchmarked():
    with pytest.raises(GateUsageError, match="batch size 16 is not benchmarked.*now 1,8,64"):
        validate_gates(["p99_ms@16<=2"], None, None, (1, 8, 64))


def test_policy_file(tmp_path, report):
    policy = tmp_path / "gate.yaml"
    policy.write_text("gates:\n  - top1>=0.5\n  - {name: int8 latency budget, gate: 'int8:p99_ms@1<=0.5'}\n")
    assert load_policy(policy) == [("top1>=0.5", None), ("int8:p99_ms@1<=0.5", "int8 latency budget")]
    results = evaluate_gates(report, ["top5>=1"], policy=policy)
    assert [(r.expression, r.name, r.passed) for r in results] == [
        ("top5>=1", None, True),
        ("top5>=1", None, True),
        ("top1>=0.5", None, True),
        ("top1>=0.5", None, True),
        ("int8:p99_ms@1<=0.5", "int8 latency budget", False),
    ]
    policy.write_text("- top1>=0.5\n")  # a bare list works too
    assert load_policy(policy) == [("top1>=0.5", None)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("top1: 0.9\n", "expected a list of gates"),
        ("- {gate: 'top1>=0.9', limit: 3}\n", "each gate is a string or"),
        ("- [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_policy_files_are_usage_errors(tmp_path, text, message):
    policy = tmp_path / "gate.yaml"
    policy.write_text(text)
    with pytest.raises(GateUsageError, match=message):
        load_policy(policy)
    with pytest.raises(GateUsageError, match="missing.yaml: --policy not found"):
        load_policy(tmp_path / "missing.yaml")


def test_load_baseline(tmp_path, report):
    assert load_baseline(None) is None
    (tmp_path / "old.json").write_text('{"schema_version": 1, "artifacts": []}')
    old = load_baseline(tmp_path / "old.json")  # a v1 report still reads
    assert isinstance(old, BenchReport) and old.artifacts == [] and old.references == []
    (tmp_path / "bad.json").write_text('{"schema_version": 1')
    for path, message in [
        (tmp_path / "bad.json", "not valid JSON"),
        (tmp_path / "none.json", "none.json: --baseline not found"),
    ]:
        with pytest.raises(GateUsageError, match=message):
            load_baseline(path)
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(GateUsageError, match="not an okdpipe bench report"):
        load_baseline(tmp_path / "other.json")


def test_junit_has_one_testcase_per_gate_result_with_failures(report):
    results = evaluate_gates(report, ["top1>=0.91", "ensemble:top1>=0.9"])
    root = ET.fromstring(junit_xml(results))
    assert root.tag == "testsuites" and root.get("tests") == "3" and root.get("failures") == "1"
    [suite] = root.findall("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
        "okdpipe.gates",
        "3",
        "1",
        "0",
    )
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("okdpipe.gates.net", "top1>=0.91"),
        ("okdpipe.gates.net-int8", "top1>=0.91"),
        ("okdpipe.gates.ensemble (2 x net)", "ensemble:top1>=0.9"),
    ]
    assert [c.find("failure") is not None for c in cases] == [False, True, False]
    failure = cases[1].find("failure")
    assert failure.get("type") == "GateFailed" and failure.get("message") == "0.9 is not >= 0.91, off by 0.01"


def test_junit_without_gates_is_an_empty_suite():
    root = ET.fromstring(junit_xml([]))
    assert root.get("tests") == "0" and root.find("testsuite").findall("testcase") == []


def test_markdown_states_the_verdict(report):
    report.machine = {
        "cpu_model": "cpu",
        "logical_cpus": 2,
        "cpu_features": {"avx2": True},
        "provider": "cpu",
        "threads": None,
        "peak_gflops": {"gflops": 100.0, "method": "torch fp32 matmul"},
    }
    report.runtime = {"onnxruntime": "1", "torch": "2"}
    report.references[0].of = ["net"]
    text = markdown(report, evaluate_gates(report, ["top1>=0.91"]))
    assert "### Gates: **1 of 2 gates failed**" in text
    assert "| top1>=0.91 | net-int8 | 0.9 | 0.91 | FAIL | 0.9 is not >= 0.91, off by 0.01 |" in text
    assert (
        "- net vs ensemble (2 x net): 2.00x fewer MACs, 2.50x lower p50 latency at batch 1, "
        "top-1 2.00 points below the ensemble"
    ) in text
    assert "all 1 gates pass" in markdown(report, evaluate_gates(report, ["net:top1>=0.91"]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_metric_fails_its_gate(report, value):
    report.artifacts[0].accuracy.top1 = value
    report.artifacts[0].latency[1].p99_ms = value
    for gate in ["net:top1>=0.5", "net:top1<=0.5", "net:p99_ms@1<=1e9"]:
        [result] = evaluate_gates(report, [gate])
        assert not result.passed and "not a finite number" in result.detail
    baseline = copy.deepcopy(report)
    report.artifacts[0].accuracy.top1 = 0.92  # finite now, but the baseline's value is not
    [result] = evaluate_gates(report, ["net:top1>=baseline-0.01"], baseline=baseline)
    assert not result.passed


@pytest.mark.parametrize(
    "gate, passed",
    [
        ("net:top1>=0.92", True),  # equal to the threshold: inclusive operators pass on equality
        ("net:top1<=0.92", True),
        ("net:top1==0.92", True),
        ("net:top1>0.92", False),  # strict operators fail on equality
        ("net:top1<0.92", False),
        ("net:p99_ms@1<=2.0", True),
        ("net:p99_ms@1<2.0", False),
        ("net:top1>=0.9200001", False),
        ("net:top1<=0.9199999", False),
    ],
)
def test_each_operator_at_its_boundary(report, gate, passed):
    [result] = evaluate_gates(report, [gate])
    assert result.passed is passed


def damaged_entry(**changes) -> dict:
    record = entry("net", "onnx", "fp32", 0.92, 2.0)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = record
        for part in parents:
            node = node[part]
        node[leaf] = value
    return record


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"accuracy__top1": 1.5}, "is not top-1/top-5 in [0, 1]"),
        ({"accuracy__top5": -0.1}, "is not top-1/top-5 in [0, 1]"),
        ({"accuracy__samples": 0}, "over a positive sample count"),
        ({"accuracy__top1": "0.9"}, "is not top-1/top-5 in [0, 1]"),
        ({"latency__1__p99_ms": -2.0}, "latency at batch 1 holds a negative, huge or non-numeric figure"),
        ({"latency__1__p50_ms": "fast"}, "latency at batch 1 holds a negative, huge or non-numeric figure"),
        ({"latency__64__batch_size": 8}, "latency at batch 64 has batch_size 8"),
        ({"latency__1__runs": 0}, "and runs 0"),
        ({"macs": -5}, "macs -5 is not a count"),
        ({"params": 1.5}, "params 1.5 is not a count"),
        ({"start_ms": True}, "start_ms True is not a number"),
        ({"kind": "teacher"}, "kind 'teacher' is not one of onnx, pytorch, ensemble"),
    ],
)
def test_a_baseline_with_figures_out_of_range_is_a_usage_error(tmp_path, changes, message):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": 1, "artifacts": [damaged_entry(**changes)]}))
    with pytest.raises(GateUsageError, match=re.escape(message)) as caught:
        load_baseline(path)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_a_baseline_holding_nan_or_infinity_is_refused(tmp_path, token):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": 1, "artifacts": [entry("net", "onnx", "fp32", 0.5, 2.0)]}))
    path.write_text(path.read_text().replace("0.5", token))
    with pytest.raises(GateUsageError, match=f"holds a non-finite number \\({token}\\)"):
        load_baseline(path)
