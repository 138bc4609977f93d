"""Deployment gates: `METRIC OP NUMBER` conditions on a bench report, absolute or relative to a baseline report.

Grammar (spaces optional):

    [SELECTOR:]METRIC[@BATCH] OP RHS        OP: >= <= > < ==
    RHS: NUMBER | baseline | baseline+NUMBER | baseline-NUMBER | baseline*NUMBER

SELECTOR picks report entries whose name, precision, kind or directory name equals it (`int8:top1>=0.9`,
`ensemble:top1>=0.8`, `resnet20-fashion-mnist:p99_ms@1<=2`); without one a gate applies to every ONNX artifact
(kind "onnx"), giving one result per artifact. `baseline` is the same metric of the entry with the same kind
and name (else the same kind and precision) in the `--baseline` report: `top1>=baseline-0.005` lets top-1 drop
at most 0.5 points, `p99_ms@1<=baseline*1.10` lets p99 grow at most 10%.

A metric that is not a finite number (a NaN accuracy, an inf latency) fails its gate: it is never compared
as if it were fine.

METRIC -> attribute path in a report Entry (okdpipe.contracts.report):

    top1, top5, samples          accuracy.top1 / accuracy.top5 / accuracy.samples   (test split, fraction 0..1)
    params, macs                 params / macs                                      (macs: per image)
    start_ms                     start_ms                                           (session start)
    peak_rss_mb                  memory.peak_rss_delta_mb
    p50_ms@B p90_ms@B p99_ms@B   latency["B"].p50_ms / ...                          (ms per batch of B)
    mean_ms@B min_ms@B           latency["B"].mean_ms / .min_ms
    images_per_s@B               latency["B"].images_per_s
    gflops_per_s@B               latency["B"].gflops_per_s
    peak_fraction@B              latency["B"].peak_fraction                         (of the measured matmul peak)

A policy file (YAML) holds the same expressions: a list, or {"gates": list}; each item a string or
{"gate": EXPRESSION, "name": TEXT}. Any problem with a gate, the policy or the baseline is a usage error
(GateUsageError, exit code 2), raised before benchmarking where it can be (`validate_gates`).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from okdpipe.contracts.report import BenchReport, Entry, GateResult, is_finite, read_report
from okdpipe.errors import OkdpipeError

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
SCALAR_METRICS = {
    "top1": ("accuracy", "top1"),
    "top5": ("accuracy", "top5"),
    "samples": ("accuracy", "samples"),
    "params": ("params",),
    "macs": ("macs",),
    "start_ms": ("start_ms",),
    "peak_rss_mb": ("memory", "peak_rss_delta_mb"),
}
BATCH_METRICS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "images_per_s", "gflops_per_s", "peak_fraction")
NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
GATE_PATTERN = re.compile(
    r"^\s*(?:(?P<selector>[^:<>=\s][^:<>=]*?)\s*:)?\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:@(?P<batch>[0-9]+))?\s*(?P<op>>=|<=|==|>|<)\s*(?P<rhs>.*?)\s*$",
    re.ASCII,  # digits are 0-9 only: '٣' or '²' is not a number here
)
RHS_PATTERN = re.compile(
    rf"^(?:(?P<number>{NUMBER})|baseline(?:\s*(?P<relation>[-+*])\s*(?P<amount>{NUMBER}))?)$", re.ASCII
)


class GateUsageError(OkdpipeError):
    """A gate that cannot be evaluated (syntax, unknown metric, missing baseline): bad usage, exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class Gate:
    """One parsed expression. `relation` is None for an absolute threshold, else '+', '-', '*' or '=' (baseline)."""

    expression: str
    metric: str
    op: str
    amount: float
    relation: str | None = None
    selector: str | None = None
    batch: int | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.metric if self.batch is None else f"{self.metric}@{self.batch}"

    def threshold(self, baseline_value: float | None) -> float:
        if self.relation is None:
            return self.amount
        assert baseline_value is not None
        return {
            "=": baseline_value,
            "+": baseline_value + self.amount,
            "-": baseline_value - self.amount,
            "*": baseline_value * self.amount,
        }[self.relation]


def parse_gate(text: str, name: str | None = None) -> Gate:
    """'int8:p99_ms@1<=baseline*1.1' -> Gate; raises GateUsageError with the expected form."""
    match = GATE_PATTERN.match(text or "")
    rhs = RHS_PATTERN.match(match["rhs"]) if match else None
    if not match or not rhs:
        raise GateUsageError(
            f"cannot parse gate {text!r}; expected [ARTIFACT:]METRIC[@BATCH] OP NUMBER or "
            "OP baseline[+-*]NUMBER, e.g. 'top1>=0.90', 'p99_ms@1<=baseline*1.10'"
        )
    metric, batch = match["metric"], int(match["batch"]) if match["batch"] else None
    _check_metric(text, metric, batch)
    amount = float(rhs["number"] if rhs["number"] is not None else rhs["amount"] or 0.0)
    if not math.isfinite(amount):
        raise GateUsageError(f"gate {text!r}: {amount} is not a finite number; use a finite threshold")
    relation = None if rhs["number"] is not None else rhs["relation"] or "="
    return Gate(text, metric, match["op"], amount, relation, match["selector"], batch, name)


def _check_metric(text: str, metric: str, batch: int | None) -> None:
    if metric in BATCH_METRICS:
        if batch is None or batch < 1:
            raise GateUsageError(f"gate {text!r}: {metric} is per batch size; write e.g. {metric}@1")
    elif metric in SCALAR_METRICS:
        if batch is not None:
            raise GateUsageError(f"gate {text!r}: {metric} does not depend on the batch size; drop '@{batch}'")
    else:
        known = ", ".join([*SCALAR_METRICS, *(f"{m}@B" for m in BATCH_METRICS)])
        raise GateUsageError(f"gate {text!r}: unknown metric {metric!r}; known metrics: {known}")


def load_policy(path: Path) -> list[tuple[str, str | None]]:
    """(expression, name) pairs from a YAML policy file."""
    from okdpipe.config import parse_yaml

    text = _read_text(path, "--policy")
    try:
        data = parse_yaml(text, f"--policy {path}")
    except OkdpipeError as exc:
        raise GateUsageError(str(exc)) from None
    items = data.get("gates") if isinstance(data, dict) and set(data) == {"gates"} else data
    if not isinstance(items, list):
        raise GateUsageError(
            f"--policy {path}: expected a list of gates (or 'gates: [...]'), got {type(data).__name__}"
        )
    return [_policy_item(path, item) for item in items]


def _read_text(path: Path, flag: str) -> str:
    from okdpipe.config import read_text_file

    try:
        return read_text_file(path, flag)
    except OkdpipeError as exc:
        raise GateUsageError(str(exc)) from None


def _policy_item(path: Path, item: Any) -> tuple[str, str | None]:
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict) and "gate" in item and set(item) <= {"gate", "name"}:
        return str(item["gate"]), None if item.get("name") is None else str(item["name"])
    raise GateUsageError(f"--policy {path}: each gate is a string or {{gate: EXPRESSION, name: TEXT}}, got {item!r}")


def parse_gates(gates: list[str], policy: Path | None = None) -> list[Gate]:
    """Command-line gates then policy gates, in order."""
    pairs = [(text, None) for text in gates] + (load_policy(policy) if policy is not None else [])
    return [parse_gate(text, name) for text, name in pairs]


def load_baseline(path: Path | None) -> BenchReport | None:
    """A previous report.json (None when not given)."""
    if path is None:
        return None
    try:
        return read_report(path, "--baseline")
    except OkdpipeError as exc:
        raise GateUsageError(str(exc)) from None


def validate_gates(
    gates: list[str], policy: Path | None, baseline: BenchReport | None, batch_sizes: tuple[int, ...]
) -> list[Gate]:
    """Everything that can be checked before benchmarking: syntax, metrics, batch sizes, baseline presence."""
    parsed = parse_gates(gates, policy)
    for gate in parsed:
        if gate.batch is not None and gate.batch not in batch_sizes:
            raise GateUsageError(
                f"gate {gate.expression!r}: batch size {gate.batch} is not benchmarked; add it to "
                f"--batch-sizes (now {','.join(map(str, batch_sizes))})"
            )
        _require_baseline(gate, baseline)
    return parsed


def _require_baseline(gate: Gate, baseline: BenchReport | None) -> None:
    if gate.relation is not None and baseline is None:
        raise GateUsageError(f"gate {gate.expression!r} compares with a baseline; pass --baseline OLD_REPORT.json")


@dataclass(frozen=True)
class GatePlan:
    """The gates to evaluate and the baseline they compare with, each file read once: a policy or baseline given
    as `<(...)` can only be read once, and one reading means the gates checked are the gates evaluated."""

    gates: list[Gate]
    baseline: BenchReport | None = None


def plan_gates(gates: list[str], policy: Path | None, baseline: Path | None, batch_sizes: tuple[int, ...]) -> GatePlan:
    """Read the policy and the baseline report, and check every gate against them, before any timing."""
    previous = load_baseline(baseline)
    return GatePlan(validate_gates(gates, policy, previous, batch_sizes), previous)


def evaluate_gates(
    report: BenchReport, gates: list[str], policy: Path | None = None, baseline: BenchReport | None = None
) -> list[GateResult]:
    """Every gate on every entry it selects; raises GateUsageError for gates that cannot be evaluated."""
    return evaluate_plan(report, GatePlan(parse_gates(gates, policy), baseline))


def evaluate_plan(report: BenchReport, plan: GatePlan) -> list[GateResult]:
    results = []
    for gate in plan.gates:
        _require_baseline(gate, plan.baseline)
        for target in select_entries(report, gate):
            results.append(evaluate_one(gate, target, plan.baseline))
    return results


def evaluate_one(gate: Gate, target: Entry, baseline: BenchReport | None) -> GateResult:
    value = metric_value(target, gate, "report")
    reference = metric_value(baseline_entry(baseline, target, gate), gate, "baseline") if gate.relation else None
    threshold = gate.threshold(reference)
    if not (is_finite(value) and is_finite(threshold)):
        detail = f"{gate.label} is {fmt(value)} against {fmt(threshold)}: not a finite number, so it fails"
        recorded = [number if is_finite(number) else None for number in (value, threshold)]  # JSON has no NaN
        return GateResult(gate.expression, gate.label, *recorded, False, detail, target.name, gate.name)
    passed = OPERATORS[gate.op](value, threshold)
    return GateResult(
        gate.expression,
        gate.label,
        value,
        threshold,
        passed,
        describe(gate, value, threshold, reference, passed),
        target.name,
        gate.name,
    )


def describe(gate: Gate, value: float, threshold: float, reference: float | None, passed: bool) -> str:
    """'0.8512 < 0.9 (short by 0.0488)'; relative gates name the baseline value too."""
    against = f"{fmt(threshold)}" if reference is None else f"{fmt(threshold)} (baseline {fmt(reference)})"
    if passed:
        return f"{fmt(value)} {gate.op} {against}, margin {fmt(abs(value - threshold))}"
    return f"{fmt(value)} is not {gate.op} {against}, off by {fmt(abs(value - threshold))}"


def fmt(number: float | None) -> str:
    """4 significant digits, thousands separated above 10 000 (images/s, MACs)."""
    if number is None:
        return "-"
    if not math.isfinite(number):
        return str(number)
    return f"{number:,.0f}" if abs(number) >= 10_000 else f"{number:.4g}"


def select_entries(report: BenchReport, gate: Gate) -> list[Entry]:
    """The entries a gate applies to: its selector's matches, or every ONNX artifact."""
    if gate.selector is None:
        chosen = [e for e in report.entries() if e.kind == "onnx"]
    else:
        chosen = [e for e in report.entries() if gate.selector in e.labels()]
    if not chosen:
        names = ", ".join(e.name for e in report.entries()) or "none"
        raise GateUsageError(
            f"gate {gate.expression!r} selects no report entry (entries: {names}); use a name, "
            "precision (fp32/int8/fp16), kind (onnx/pytorch/ensemble) or directory name"
        )
    return chosen


def metric_value(entry: Entry, gate: Gate, where: str) -> float:
    """The metric at its documented path; a missing value is a usage error naming the entry and the metric."""
    if gate.batch is not None:
        point = entry.latency.get(gate.batch)
        value, path = getattr(point, gate.metric, None), f"latency[{gate.batch}].{gate.metric}"
    else:
        value = entry
        for attribute in SCALAR_METRICS[gate.metric]:
            value = getattr(value, attribute, None)
        path = ".".join(SCALAR_METRICS[gate.metric])
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise GateUsageError(
            f"gate {gate.expression!r}: the {where} has no {gate.label} for {entry.name!r} "
            f"(path {path}); benchmark it or drop the gate"
        )
    return float(value)


def baseline_entry(baseline: BenchReport | None, target: Entry, gate: Gate) -> Entry:
    """Same kind and name in the baseline report, else same kind and precision; more than one match is an error."""
    candidates = baseline.entries() if baseline else []
    same_name = [e for e in candidates if e.kind == target.kind and e.name == target.name]
    same_precision = [e for e in candidates if e.kind == target.kind and e.precision == target.precision]
    found = same_name or same_precision
    if len(found) > 1:  # taking the first would gate against an arbitrary entry
        names = ", ".join(e.name for e in found)
        raise GateUsageError(
            f"gate {gate.expression!r}: the baseline has several {target.kind} entries that could match "
            f"{target.name!r} ({names}); bench one of them per baseline, or refresh the baseline"
        )
    if not found:
        names = ", ".join(e.name for e in candidates) or "none"
        raise GateUsageError(
            f"gate {gate.expression!r}: the baseline has no entry matching {target.name!r} "
            f"(it has: {names}); gate it with a selector or refresh the baseline"
        )
    return found[0]


def failed(results: list[GateResult]) -> list[GateResult]:
    return [result for result in results if not result.passed]
