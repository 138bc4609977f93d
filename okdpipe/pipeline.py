"""`okdpipe pipeline`: distill -> select -> export -> bench -> gate from one YAML config.

Each stage is skipped when nothing it depends on changed, as a build system would: OUT/pipeline.json records,
per stage, the sha256 of its config section, the sha256 of every input file and the sha256 of every output
file. A stage runs again when its config changed, an input's bytes changed (so a re-trained model invalidates
export, bench and gate), or an output is missing or was replaced. A killed distill stage is resumed from its
last checkpoint rather than trained again.

    OUT/
      distill/      the distill run directory (config.yaml, manifest.json, checkpoints/last.pt)
      model.pt      the selected model
      export/       fp32/ (+ <quantize>/) ONNX artifacts with model cards
      bench.json    the raw benchmark report (kept apart so a gate change does not re-run the benchmark)
      report.json   the benchmark report with the gate results, with report.md, report.png, report.junit.xml
      pipeline.json what each stage read and wrote
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import Field, ValidationError

from okdpipe.config import DistillConfig, Strict, validation_message, read_yaml
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_json, atomic_write_text, file_sha256
from okdpipe.run import RunDir, now_iso

STATE_FILE = "pipeline.json"
STATE_VERSION = 1


class PipelineUsageError(OkdpipeError):
    """A bad pipeline config: reported before anything runs, exit code 2 (bad usage)."""

    exit_code = 2


class SelectSection(Strict):
    strategy: str = "auto"
    bn_batches: int = Field(50, ge=1, description="training batches for BN recalibration of averaged models")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ExportSection(Strict):
    """`okdpipe export` options; the pipeline always writes plain ONNX artifacts (the benchmark reads them)."""

    quantize: Literal["none", "fp16", "int8", "int8-dynamic"] = "none"
    calib_size: int = Field(512, ge=1)
    calib_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    opset: int = Field(18, ge=7)
    max_accuracy_drop: float = Field(1.0, ge=0, description="percentage points of validation top-1")
    data_dir: Optional[str] = None


class BenchSection(Strict):
    """`okdpipe.export.bench.BenchOptions`, field for field."""

    batch_sizes: list[int] = Field([1, 8, 64], min_length=1)
    threads: Optional[int] = Field(None, ge=1)
    provider: str = "cpu"
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    max_samples: Optional[int] = Field(None, ge=1)
    compare_pytorch: bool = True
    compare_ensemble: bool = True
    warmup: int = Field(10, ge=0)
    min_seconds: float = Field(1.0, gt=0, description="seconds of timed runs per batch size")


class PipelineConfig(Strict):
    out: Optional[str] = None
    distill: DistillConfig = Field(default_factory=DistillConfig)
    select: SelectSection = Field(default_factory=SelectSection)
    export: ExportSection = Field(default_factory=ExportSection)
    bench: BenchSection = Field(default_factory=BenchSection)
    gate: list[str] = Field(default_factory=list, description='e.g. ["top1>=0.80", "p99_ms@1<=20"]')


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Parse and check the whole config (names included) before any stage runs; errors are one line, exit 2."""
    try:
        cfg = PipelineConfig(**read_yaml(path))
        check_names(cfg)
    except ValidationError as exc:
        raise PipelineUsageError(f"{path}: {validation_message(exc)}") from None
    except OkdpipeError as exc:
        raise PipelineUsageError(f"{path}: {exc}") from None
    return cfg


def check_names(cfg: PipelineConfig) -> None:
    """Unknown method, backbone, dataset, method parameter, provider or gate fail now, not after minutes of
    training."""
    from okdpipe.config import validate_params
    from okdpipe.datasets import DATASETS
    from okdpipe.distill.methods import METHODS
    from okdpipe.distill.models import MODELS
    from okdpipe.export.bench import PROVIDERS
    from okdpipe.export.gate import validate_gates

    method = METHODS.get(cfg.distill.method)
    validate_params(method.Params, cfg.distill.method_params, cfg.distill.method)
    MODELS.get(cfg.distill.arch)
    DATASETS.get(cfg.distill.dataset)
    if cfg.bench.provider not in PROVIDERS:
        raise OkdpipeError(f"bench.provider {cfg.bench.provider!r} is unknown; choose one of: {', '.join(PROVIDERS)}")
    validate_gates(cfg.gate, None, None, tuple(cfg.bench.batch_sizes))


def section_sha256(section: Any) -> str:
    """Hash of a config section as canonical JSON (key order and YAML formatting do not matter)."""
    data = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def hash_files(out: Path, relpaths: list[str]) -> dict[str, Optional[str]]:
    """relpath -> sha256, or None for a missing file."""
    return {rel: file_sha256(out / rel) if (out / rel).is_file() else None for rel in relpaths}


def files_under(out: Path, folder: str) -> list[str]:
    """Every file under OUT/folder, relative to OUT, skipping hidden staging directories."""
    root = out / folder
    visible = lambda path: not any(part.startswith(".") for part in path.relative_to(root).parts)  # noqa: E731
    return sorted(str(p.relative_to(out)) for p in root.rglob("*") if p.is_file() and visible(p))


@dataclass
class Stage:
    """One step: its config section, the files it reads, and `run` which returns (output files, record extras)."""

    name: str
    section: Any
    inputs: Callable[[], list[str]]
    run: Callable[[], tuple[list[str], dict[str, Any]]]
    note: Callable[[], str] = lambda: ""


@dataclass
class Decision:
    stage: Stage
    run: bool
    reason: str


def first_mismatch(recorded: dict[str, Optional[str]], current: dict[str, Optional[str]]) -> Optional[str]:
    return next((rel for rel in sorted(set(recorded) | set(current)) if recorded.get(rel) != current.get(rel)), None)


def decide(stage: Stage, record: Optional[dict], out: Path, upstream_runs: Optional[str]) -> Decision:
    """Run when the config, an input or an output differs from the last successful run's record."""
    if record is None:
        return Decision(stage, True, "no successful run recorded")
    if record["config_sha256"] != section_sha256(stage.section):
        return Decision(stage, True, f"its config section ({stage.name}) changed")
    if upstream_runs:
        return Decision(stage, True, f"upstream stage {upstream_runs} runs first and may change its inputs")
    changed = first_mismatch(record["inputs"], hash_files(out, stage.inputs()))
    if changed:
        return Decision(stage, True, f"input {changed} changed")
    damaged = first_mismatch(record["outputs"], hash_files(out, list(record["outputs"])))
    if damaged:
        return Decision(stage, True, f"output {damaged} is missing or was replaced")
    return Decision(stage, False, "config, inputs and outputs unchanged")


class Pipeline:
    """The five stages of one config over one output directory."""

    def __init__(self, cfg: PipelineConfig, out: Path, force: bool = False, echo: Callable[[str], None] = print):
        self.cfg, self.out, self.force, self.echo = cfg, Path(out), force, echo
        self.state_path = self.out / STATE_FILE
        self.stages = [
            Stage("distill", cfg.distill, lambda: [], self._distill, self._distill_note),
            Stage("select", cfg.select, lambda: ["distill/checkpoints/last.pt"], self._select),
            Stage("export", cfg.export, lambda: ["model.pt"], self._export),
            Stage("bench", cfg.bench, lambda: ["model.pt", *files_under(self.out, "export")], self._bench),
            Stage("gate", cfg.gate, lambda: ["bench.json"], self._gate),
        ]

    # -- state ------------------------------------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"state_version": STATE_VERSION, "stages": {}}
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as exc:
            raise OkdpipeError(f"{self.state_path}: corrupt ({exc.msg}); delete it or re-run with --force") from None
        if state.get("state_version") != STATE_VERSION:
            raise OkdpipeError(f"{self.state_path}: written by another okdpipe version; re-run with --force")
        return state

    def record(self, state: dict, stage: Stage, inputs: dict, outputs: list[str], extra: dict) -> None:
        state["stages"][stage.name] = {
            "config_sha256": section_sha256(stage.section), "inputs": inputs,
            "outputs": hash_files(self.out, outputs), "finished": now_iso(), **extra}
        state["updated"] = now_iso()
        atomic_write_json(self.state_path, state)

    # -- planning and running -------------------------------------------------------------------------------------

    def decide(self, stage: Stage, records: dict, upstream_runs: Optional[str]) -> Decision:
        if self.force:
            return Decision(stage, True, "--force")
        return decide(stage, records.get(stage.name), self.out, upstream_runs)

    def plan(self) -> list[Decision]:
        """What a run would do, without running anything: once a stage runs, every later stage runs too."""
        records = {} if self.force else self.read_state()["stages"]
        decisions, upstream = [], None
        for stage in self.stages:
            decision = self.decide(stage, records, upstream)
            upstream = upstream or (stage.name if decision.run else None)
            decisions.append(decision)
        return decisions

    def run(self) -> int:
        """Run or skip each stage in order, deciding on the real files as upstream stages finish; gate's exit code."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"state_version": STATE_VERSION, "stages": {}} if self.force else self.read_state()
        for stage in self.stages:
            decision = self.decide(stage, state["stages"], None)
            self.echo(describe(decision))
            if decision.run:
                inputs = hash_files(self.out, stage.inputs())
                outputs, extra = stage.run()
                self.record(state, stage, inputs, outputs, extra)
        return self.finish(state["stages"]["gate"])

    def finish(self, gate_record: dict) -> int:
        for result in gate_record["results"]:
            self.echo(f"  {'pass' if result['passed'] else 'FAIL'}  {result['expression']}  "
                      f"(value {result['value']}){'  ' + result['detail'] if result.get('detail') else ''}")
        passed = gate_record["passed"]
        self.echo(f"gate {'passed' if passed else 'FAILED'}; report: {self.out / 'report.json'}")
        return 0 if passed else 1

    # -- stages ---------------------------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.out / "distill"

    def resumable_epochs(self) -> Optional[int]:
        """Finished epochs of a killed distill run with the same settings, or None (then it starts afresh)."""
        from okdpipe.distill.checkpoint import has_checkpoint
        from okdpipe.distill.trainer import RESUME_MAY_CHANGE

        if self.force:
            return None
        run = RunDir(self.run_dir)
        try:
            manifest = run.read_manifest() if has_checkpoint(run) else {}
        except OkdpipeError:
            return None
        if not manifest or manifest.get("status") == "finished":
            return None
        same = lambda cfg: {k: v for k, v in cfg.items() if k not in RESUME_MAY_CHANGE}  # noqa: E731
        if same(manifest.get("config", {})) != same(self.cfg.distill.model_dump(mode="json")):
            return None
        return len(manifest.get("epochs", []))

    def _distill_note(self) -> str:
        epochs = self.resumable_epochs()
        return "trains from scratch" if epochs is None else f"resumes the killed run after epoch {epochs}"

    def _distill(self) -> tuple[list[str], dict]:
        from okdpipe.distill.trainer import fit

        resume = self.resumable_epochs() is not None
        if not resume:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        fit(self.cfg.distill, RunDir(self.run_dir), resume=resume, echo=self.echo)
        return ["distill/checkpoints/last.pt"], {"resumed": resume}

    def _select(self) -> tuple[list[str], dict]:
        from okdpipe.distill.select import select

        section = self.cfg.select
        _, _, chosen, path = select(self.run_dir, section.strategy, self.out / "model.pt", section.bn_batches,
                                    section.device)
        self.echo(f"  chose {chosen.name} (val top-1 {chosen.top1:.2%})")
        return [str(path.relative_to(self.out))], {"chosen": chosen.name, "val_top1": chosen.top1}

    def artifact_dirs(self) -> list[Path]:
        variants = ["fp32"] + ([self.cfg.export.quantize] if self.cfg.export.quantize != "none" else [])
        return [self.out / "export" / name for name in variants]

    def _export(self) -> tuple[list[str], dict]:
        from okdpipe.export.pipeline import ExportOptions, export_model

        # A fresh directory: a variant from an earlier config (say int8 before fp16) must not linger.
        shutil.rmtree(self.out / "export", ignore_errors=True)
        written = export_model(self.out / "model.pt", self.out / "export",
                               ExportOptions(format="onnx", **self.cfg.export.model_dump()))
        return files_under(self.out, "export"), {"artifacts": [str(p.relative_to(self.out)) for p in written]}

    def _bench(self) -> tuple[list[str], dict]:
        from okdpipe.export.bench import BenchOptions, run_bench

        options = self.cfg.bench.model_dump()
        options["batch_sizes"] = tuple(options["batch_sizes"])
        report = run_bench(self.artifact_dirs(), BenchOptions(**options))
        atomic_write_text(self.out / "bench.json", json.dumps(report, indent=2, default=str) + "\n")
        return ["bench.json"], {}

    def _gate(self) -> tuple[list[str], dict]:
        from okdpipe.export.gate import evaluate_gates
        from okdpipe.export.report import write_reports

        report = json.loads((self.out / "bench.json").read_text())
        results = evaluate_gates(report, list(self.cfg.gate))
        written = write_reports(report, results, self.out / "report.json", junit=self.out / "report.junit.xml")
        rows = [gate_row(result) for result in results]
        outputs = sorted(str(Path(p).relative_to(self.out)) for p in written.values())
        return outputs, {"passed": all(row["passed"] for row in rows), "results": rows}


def gate_row(result) -> dict[str, Any]:
    """A GateResult as JSON, so a skipped gate stage can still report and return its exit code."""
    names = ("expression", "metric", "value", "threshold", "passed", "detail")
    row = {name: getattr(result, name) for name in names}
    row["passed"] = bool(row["passed"])
    return json.loads(json.dumps(row, default=str))


def describe(decision: Decision) -> str:
    action = "run " if decision.run else "skip"
    note = decision.stage.note() if decision.run else ""
    return f"{action}  {decision.stage.name:<8} {decision.reason}{'; ' + note if note else ''}"


def default_out(config_path: Path) -> Path:
    return Path("runs") / config_path.stem


def run_pipeline(config_path: Path, out: Optional[Path] = None, force: bool = False, dry_run: bool = False,
                 echo: Callable[[str], None] = print) -> int:
    """Load and check the config, then plan (--dry-run) or run; returns the exit code (the gate's)."""
    cfg = load_pipeline_config(config_path)
    out = Path(out or cfg.out or default_out(Path(config_path)))
    pipeline = Pipeline(cfg, out, force, echo)
    if dry_run:
        for decision in pipeline.plan():
            echo(describe(decision))
        return 0
    return pipeline.run()


