"""Bench gates by value (the equality case of every operator, NaN, relative thresholds) and bench vs serve: the
ONNX Runtime session bench times is configured exactly as the one `okdpipe serve` runs for the same artifact."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from okdpipe.bench.gate import OPERATORS, GateUsageError, evaluate_gates, evaluate_plan, failed, parse_gate, plan_gates
from okdpipe.contracts.report import Accuracy, BenchReport, Entry, LatencyPoint, Memory
from okdpipe.ortsession import session_options

# ------------------------------------------------------------------------------------------------ gates


def entry(name="m-fp32", kind="onnx", precision="fp32", top1=0.5, p99=2.5, samples=32, params=1000) -> Entry:
    point = LatencyPoint(
        batch_size=1,
        runs=10,
        p50_ms=p99 / 2,
        p90_ms=p99,
        p99_ms=p99,
        mean_ms=p99 / 2,
        min_ms=p99 / 4,
        images_per_s=400.0,
    )
    return Entry(
        name,
        kind,
        precision,
        f"out/{precision}",
        "synthetic",
        params=params,
        macs=2000,
        start_ms=5.0,
        memory=Memory(1.0, "rss"),
        accuracy=Accuracy("test", top1, 1.0, samples),
        latency={1: point},
    )


def report(*entries: Entry) -> BenchReport:
    return BenchReport("2026-01-01T00:00:00Z", {}, {}, {}, list(entries))


def verdict(gate: str, *entries: Entry, baseline: BenchReport | None = None) -> list[bool]:
    return [result.passed for result in evaluate_gates(report(*entries), [gate], baseline=baseline)]


def test_a_policy_that_can_be_read_only_once_is_checked_and_evaluated_from_one_reading():
    """`--policy <(cat gates.yaml)` is a pipe: a second reading finds it empty, so the gates checked before
    timing must be the gates evaluated after it."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"- gate: top1>=0.9\n  name: accuracy floor\n")
    os.close(write_end)
    try:
        plan = plan_gates(["params<=1000"], f"/proc/self/fd/{read_end}", None, (1,))
        results = evaluate_plan(report(entry(top1=0.5)), plan)
    finally:
        os.close(read_end)
    assert [(r.expression, r.passed, r.name) for r in results] == [
        ("params<=1000", True, None),
        ("top1>=0.9", False, "accuracy floor"),
    ]


@pytest.mark.parametrize(
    ("fp16_p99", "provider", "features", "expected"),
    [
        (3.0, "cpu", {}, "m fp16 is slower than fp32 here (20% slower at batch 1): this CPU has no native FP16"),
        (3.0, "cpu", {"avx512_fp16": True}, "(20% slower at batch 1): ONNX Runtime's CPU provider has few FP16"),
        (2.5, "cpu", {}, None),  # as fast: nothing to say
        (2.0, "cpu", {}, None),
        (3.0, "cuda", {}, None),  # on a GPU FP16 is the point
    ],
)
def test_fp16_slower_than_its_fp32_twin_on_a_cpu_is_said_with_the_reason(fp16_p99, provider, features, expected):
    from okdpipe.bench.run import fp16_notes

    from_model = lambda e, sha: replace(e, provenance={"model_sha256": sha})  # noqa: E731
    artifacts = [from_model(entry("m-fp32", precision="fp32", p99=2.5), "a"), from_model(entry("m"), "a")]
    artifacts[1] = replace(artifacts[1], precision="fp16", latency=entry(p99=fp16_p99).latency)
    other_model = from_model(entry("m", precision="fp16", p99=9.0), "b")  # no fp32 twin: nothing to compare
    notes = fp16_notes([*artifacts, other_model], provider, features)
    assert notes == [] if expected is None else len(notes) == 1 and expected in notes[0]


EQUALITY = {">=": True, "<=": True, ">": False, "<": False, "==": True}


def test_operator_table_is_exactly_the_five_documented():
    assert set(OPERATORS) == set(EQUALITY)


@pytest.mark.parametrize("op, passes", sorted(EQUALITY.items()))
@pytest.mark.parametrize("metric, value", [("top1", 0.5), ("p99_ms@1", 2.5), ("samples", 32), ("params", 1000)])
def test_value_equal_to_threshold_passes_exactly_as_the_operator_says(op, passes, metric, value):
    [result] = evaluate_gates(report(entry()), [f"{metric}{op}{value}"])
    assert result.value == result.threshold == value
    assert result.passed is passes


@pytest.mark.parametrize(
    "op, below, above",
    [(">=", False, True), ("<=", True, False), (">", False, True), ("<", True, False), ("==", False, False)],
)
def test_value_just_off_the_threshold(op, below, above):
    assert verdict(f"top1{op}0.5", entry(top1=math.nextafter(0.5, 0))) == [below]
    assert verdict(f"top1{op}0.5", entry(top1=math.nextafter(0.5, 1))) == [above]


@pytest.mark.parametrize("op", sorted(EQUALITY))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_fails_every_operator(op, bad):
    for gate, target in ((f"top1{op}0.5", entry(top1=bad)), (f"p99_ms@1{op}2.5", entry(p99=bad))):
        [result] = evaluate_gates(report(target), [gate])
        assert result.passed is False and "not a finite number" in result.detail


@pytest.mark.parametrize("op", sorted(EQUALITY))
def test_a_nan_baseline_fails_every_operator(op):
    baseline = report(entry(top1=math.nan))
    assert verdict(f"top1{op}baseline", entry(top1=0.5), baseline=baseline) == [False]


@pytest.mark.parametrize(
    "gate, baseline_p99, value, threshold, passes",
    [
        ("p99_ms@1<=baseline*1.5", 4.0, 6.0, 6.0, True),
        ("p99_ms@1<baseline*1.5", 4.0, 6.0, 6.0, False),
        ("p99_ms@1<=baseline*1.5", 4.0, 6.5, 6.0, False),
        ("p99_ms@1<=baseline*1.1", 2.0, 2.0, 2.0 * 1.1, True),
        ("p99_ms@1<=baseline+0.5", 2.0, 2.5, 2.5, True),
        ("p99_ms@1<baseline+0.5", 2.0, 2.5, 2.5, False),
        ("p99_ms@1>=baseline-0.25", 2.0, 1.75, 1.75, True),
        ("p99_ms@1>baseline-0.25", 2.0, 1.75, 1.75, False),
        ("p99_ms@1==baseline", 2.0, 2.0, 2.0, True),
        ("p99_ms@1<=baseline", 2.0, 2.25, 2.0, False),
    ],
)
def test_relative_gates_by_value(gate, baseline_p99, value, threshold, passes):
    baseline = report(entry(p99=baseline_p99))
    [result] = evaluate_gates(report(entry(p99=value)), [gate], baseline=baseline)
    assert result.threshold == threshold
    assert result.passed is passes
    assert f"baseline {baseline_p99:.4g}" in result.detail


def test_relative_gate_matches_the_baseline_entry_by_name_then_precision():
    baseline = report(entry("m-fp32", p99=1.0), entry("m-int8", precision="int8", p99=10.0))
    results = evaluate_gates(
        report(entry("m-fp32", p99=1.0), entry("m-int8", precision="int8", p99=10.0)),
        ["p99_ms@1<=baseline*1.0"],
        baseline=baseline,
    )
    assert [(r.artifact, r.threshold, r.passed) for r in results] == [("m-fp32", 1.0, True), ("m-int8", 10.0, True)]
    renamed = report(entry("other-int8", precision="int8", p99=10.0))
    [result] = evaluate_gates(renamed, ["p99_ms@1<=baseline"], baseline=baseline)
    assert result.threshold == 10.0


def test_a_selector_picks_its_entries_and_an_unselected_gate_covers_only_onnx():
    entries = (
        entry("m-fp32", top1=0.9),
        entry("m-int8", precision="int8", top1=0.4),
        entry("m-torch", kind="pytorch", top1=0.1),
    )
    assert verdict("top1>=0.5", *entries) == [True, False]
    assert verdict("int8:top1>=0.5", *entries) == [False]
    assert verdict("pytorch:top1>=0.05", *entries) == [True]
    assert len(failed(evaluate_gates(report(*entries), ["top1>=0.5"]))) == 1


@pytest.mark.parametrize("text", ["top1 >= 0.5", " top1>=0.5 ", "top1>=5e-1", "top1>=.5"])
def test_gate_spellings_parse_to_the_same_threshold(text):
    gate = parse_gate(text)
    assert (gate.metric, gate.op, gate.amount, gate.relation) == ("top1", ">=", 0.5, None)


@pytest.mark.parametrize(
    "text",
    ["top1=>0.5", "top1>=nan", "top1>=inf", "p99_ms<=2", "top1@1>=0.5", "top1>=", "top1>=baseline/2", "latency<=1"],
)
def test_unparseable_gates_are_usage_errors(text):
    with pytest.raises(GateUsageError) as error:
        parse_gate(text)
    assert "\n" not in str(error.value) and error.value.exit_code == 2


# -------------------------------------------------------------------------------------- bench vs serve


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from okdpipe.datasets import load_dataset
    from okdpipe.distill.models import create_model
    from okdpipe.export.config import ExportConfig
    from okdpipe.export.exporter import export_model
    from okdpipe.modelfile import ModelInfo, save_model_file

    root = tmp_path_factory.mktemp("bench-session")
    spec = load_dataset("synthetic").spec
    torch.manual_seed(2)
    info = ModelInfo(
        "resnet8",
        spec.num_classes,
        spec.in_channels,
        spec.input_size,
        spec.mean,
        spec.std,
        spec.labels,
        "synthetic",
        provenance={"data": {"dataset": "synthetic", "val_split": 0.25, "seed": 0}},
    )
    save_model_file(create_model("resnet8", spec.num_classes, spec.in_channels), info, root / "model.pt")
    [card] = export_model(root / "model.pt", root / "out", ExportConfig(opset=13))
    return card.directory


def bench_config(threads):
    from okdpipe.bench.config import BenchConfig

    return BenchConfig(
        batch_sizes=[1, 2],
        threads=threads,
        warmup=0,
        min_seconds=0.01,
        max_samples=16,
        compare_pytorch=False,
        compare_ensemble=False,
    )


def ort_settings(session) -> dict:
    """What an onnxruntime session was really built with (not what a description says)."""
    options = session.get_session_options()
    return {
        "intra_op_num_threads": options.intra_op_num_threads,
        "inter_op_num_threads": options.inter_op_num_threads,
        "execution_mode": str(options.execution_mode),
        "graph_optimization_level": str(options.graph_optimization_level),
        "allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning"),
        "providers": session.get_providers(),
    }


@pytest.mark.parametrize("threads", [1, 2, None])
def test_bench_times_the_session_serve_runs(artifact, threads, monkeypatch):
    from okdpipe.bench import run as bench_run
    from okdpipe.serve.app import ServeSettings, load_classifier

    sessions = []
    original = bench_run.create_session

    def spy(*args, **kwargs):
        session, description = original(*args, **kwargs)
        sessions.append(session)
        return session, description

    monkeypatch.setattr(bench_run, "create_session", spy)
    result = bench_run.run_bench([artifact], bench_config(threads))
    [measured] = result.artifacts
    expected = session_options(threads)
    assert measured.session == expected
    assert measured.session["intra_op_num_threads"] == (threads or 0)
    assert measured.session["config_entries"] == {"session.intra_op.allow_spinning": "0"}

    classifier = load_classifier(ServeSettings(artifact_dir=artifact, intra_op_threads=threads))
    assert classifier.session_options == measured.session
    [bench_session] = sessions
    assert ort_settings(bench_session) == ort_settings(classifier.session)
    assert ort_settings(classifier.session)["allow_spinning"] == "0"
    assert ort_settings(classifier.session)["inter_op_num_threads"] == 1
    # and the report carries it through JSON
    again = BenchReport.from_dict(result.to_dict(), "report.json")
    assert again.artifacts[0].session == expected


def test_session_options_is_the_documented_description():
    assert session_options(3) == {
        "providers": ["CPUExecutionProvider"],
        "intra_op_num_threads": 3,
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "graph_optimization_level": "all",
        "config_entries": {"session.intra_op.allow_spinning": "0"},
    }
    assert session_options(None) == session_options(0)
    assert session_options(2, "cuda")["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("threads", [-1, True, 1.5, "2"])
def test_session_options_refuses_bad_threads(threads):
    from okdpipe.errors import OkdpipeError

    with pytest.raises(OkdpipeError):
        session_options(threads)
