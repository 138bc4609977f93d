"""The bench report: what `okdpipe bench` measured, as dataclasses. Bench builds it, the gates read it by
attribute, the Markdown/PNG/JUnit writers render it, and `--baseline` reads an earlier one back.

JSON form (`format: okdpipe-bench-report`, version 2; version 1, keyed `schema_version`, is still read):

    {"format", "format_version", "created": ISO-8601 UTC, "options": the resolved bench config,
     "machine": {...}, "runtime": {...}, "artifacts": [ENTRY...], "references": [ENTRY...], "notes": [...],
     "gates": [gate results]}
    ENTRY = {"name", "kind": "onnx" | "pytorch" | "ensemble", "precision", "path", "dataset", "of", "provenance",
             "device", "session": ONNX Runtime session options timed (onnx entries) or null,
             "params", "macs" (per image), "start_ms", "memory": {"peak_rss_delta_mb", "method"},
             "accuracy": {"split", "top1", "top5", "samples"},
             "latency": {"<batch>": {"batch_size", "runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms",
                                     "images_per_s", "gflops_per_s", "peak_fraction"}},
             "sensitivity": INT8 artifacts: the card's per-node ranking, [{"rank", "node", "op_type", "error",
                            "top1_drop_points", "fp32": kept in FP32}] (empty otherwise; absent in older reports)}

Every key is always present, null where not measured. Latency keys are strings in JSON (batch sizes here).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

# what a gate may compare and a report record as measured: a real, finite number (a bool is not one)
from okdpipe.contracts.inputs import is_finite_number as is_finite
from okdpipe.contracts.inputs import is_int
from okdpipe.contracts.versioned import FileFormat
from okdpipe.errors import OkdpipeError
from okdpipe.files import loads_finite, read_user_file

REPORT = FileFormat(
    "okdpipe-bench-report",
    2,
    "bench report",
    "re-run `okdpipe bench` to write a current one",
    also_reads=(1,),
    legacy_key="schema_version",
)
KINDS = ("onnx", "pytorch", "ensemble")
MAX_REPORT_BYTES = 64 << 20  # a report is kilobytes; many entries with their sensitivity tables stay far below
MAX_FIGURE = 1e9  # a latency of 11 days in ms, a billion images per second: beyond any real measurement


@dataclass
class LatencyPoint:
    batch_size: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float
    gflops_per_s: float | None = None
    peak_fraction: float | None = None


@dataclass
class Accuracy:
    split: str
    top1: float
    top5: float
    samples: int


@dataclass
class Memory:
    peak_rss_delta_mb: float | None = None
    method: str | None = None


@dataclass
class Entry:
    """One row: an ONNX artifact, or a reference it stands behind (its PyTorch model, the peer ensemble)."""

    name: str
    kind: str
    precision: str
    path: str
    dataset: str
    of: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    session: dict[str, Any] | None = None
    params: int | None = None
    macs: int | None = None
    start_ms: float | None = None
    memory: Memory = field(default_factory=Memory)
    accuracy: Accuracy | None = None
    latency: dict[int, LatencyPoint] = field(default_factory=dict)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    def labels(self) -> set[str]:
        """What a gate selector may call this entry: name, kind, precision or directory name."""
        return {self.name, self.kind, str(self.precision), self.path.rstrip("/").rsplit("/", 1)[-1]}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency"] = {str(batch): asdict(point) for batch, point in self.latency.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entry:
        data = dict(data)
        data["memory"] = Memory(**(data.get("memory") or {}))
        data["accuracy"] = Accuracy(**data["accuracy"]) if data.get("accuracy") else None
        data["latency"] = {int(batch): LatencyPoint(**point) for batch, point in (data.get("latency") or {}).items()}
        data.setdefault("session", None)
        return cls(**data)


@dataclass
class GateResult:
    """The outcome of one gate on one report entry (`artifact`); `detail` says by how much it passed or failed."""

    expression: str
    metric: str
    value: float | None  # None: the metric or threshold was not a finite number (such a gate fails)
    threshold: float | None
    passed: bool
    detail: str
    artifact: str = ""
    name: str | None = None


@dataclass
class BenchReport:
    created: str
    options: dict[str, Any]
    machine: dict[str, Any]
    runtime: dict[str, Any]
    artifacts: list[Entry]
    references: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)

    def entries(self) -> list[Entry]:
        return self.artifacts + self.references

    def to_dict(self) -> dict[str, Any]:
        return {
            **REPORT.header(),
            "created": self.created,
            "options": self.options,
            "machine": self.machine,
            "runtime": self.runtime,
            "artifacts": [e.to_dict() for e in self.artifacts],
            "references": [e.to_dict() for e in self.references],
            "notes": list(self.notes),
            "gates": [asdict(g) for g in self.gates],
        }

    @classmethod
    def from_dict(cls, data: Any, where: object) -> BenchReport:
        """Read a report written by this or an earlier okdpipe; a malformed one is a one-line error."""
        REPORT.check(data, where)
        try:
            # a v1 report may carry no more than its artifacts; everything descriptive defaults to empty
            report = cls(
                created=str(data.get("created", "")),
                options=dict(data.get("options") or {}),
                machine=dict(data.get("machine") or {}),
                runtime=dict(data.get("runtime") or {}),
                artifacts=[Entry.from_dict(e) for e in data["artifacts"]],
                references=[Entry.from_dict(e) for e in data.get("references", [])],
                notes=list(data.get("notes", [])),
                gates=[GateResult(**g) for g in data.get("gates", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OkdpipeError(f"{where}: a damaged bench report ({type(exc).__name__}: {exc}); {REPORT.fix}") from None
        problem = next(filter(None, map(entry_problem, report.entries())), None)
        if problem:
            raise OkdpipeError(f"{where}: a damaged bench report ({problem}); {REPORT.fix}")
        return report


def read_report(path: str | os.PathLike, what: str = "bench report") -> BenchReport:
    """A report.json from disk (a `--baseline`, the pipeline's bench.json): strict JSON, every figure in range."""
    where = f"{path}"
    try:
        data = loads_finite(read_user_file(path, what, MAX_REPORT_BYTES).decode("utf-8"))
    except UnicodeDecodeError:
        raise OkdpipeError(f"{where}: the {what} is not UTF-8 JSON; {REPORT.fix}") from None
    except json.JSONDecodeError as exc:
        raise OkdpipeError(f"{where}: the {what} is not valid JSON ({exc.msg}); {REPORT.fix}") from None
    except ValueError as exc:  # NaN or Infinity: never a figure to gate against
        raise OkdpipeError(f"{where}: the {what} holds a {exc}; {REPORT.fix}") from None
    return BenchReport.from_dict(data, where)


def entry_problem(entry: Entry) -> str | None:
    """What is out of range in an entry read back (a baseline is gated against: its figures must be real ones)."""
    where = f"entry {str(entry.name)[:60]!r}"
    if not isinstance(entry.name, str) or entry.kind not in KINDS:
        return f"{where}: kind {entry.kind!r} is not one of {', '.join(KINDS)}"
    accuracy = entry.accuracy
    if accuracy is not None and not (
        is_int(accuracy.samples)
        and accuracy.samples > 0
        and all(_within(v, 0, 1) for v in (accuracy.top1, accuracy.top5))
    ):
        return f"{where}: accuracy {asdict(accuracy)} is not top-1/top-5 in [0, 1] over a positive sample count"
    for batch, point in entry.latency.items():
        if not (is_int(point.batch_size) and point.batch_size == batch > 0 and is_int(point.runs) and point.runs > 0):
            return f"{where}: latency at batch {batch} has batch_size {point.batch_size!r} and runs {point.runs!r}"
        timings = [v for k, v in asdict(point).items() if k not in ("batch_size", "runs") and v is not None]
        if not all(_within(v, 0, MAX_FIGURE) for v in timings):
            return f"{where}: latency at batch {batch} holds a negative, huge or non-numeric figure"
    for key, value in (("params", entry.params), ("macs", entry.macs)):
        if value is not None and not (is_int(value) and value >= 0):
            return f"{where}: {key} {value!r} is not a count"
    for key, value in (("start_ms", entry.start_ms), ("memory.peak_rss_delta_mb", entry.memory.peak_rss_delta_mb)):
        if value is not None and not is_finite(value):
            return f"{where}: {key} {value!r} is not a number"
    return None


def _within(value: Any, low: float, high: float) -> bool:
    return is_finite(value) and low <= value <= high
