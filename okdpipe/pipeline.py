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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, ValidationError, model_validator

from okdpipe.bench.config import BenchConfig
from okdpipe.config import DistillConfig, Strict, read_yaml, validation_message
from okdpipe.contracts.versioned import FileFormat
from okdpipe.distill.select_command import SelectConfig
from okdpipe.errors import OkdpipeError
from okdpipe.export.config import ExportConfig
from okdpipe.files import (
    atomic_write_json,
    check_can_create_folder,
    check_can_write_file,
    file_sha256,
    loads_finite,
    not_ours_to_replace,
)
from okdpipe.plugins import PLUGINS_HELP, PluginNames
from okdpipe.run import RunDir, now_iso

STATE_FILE = "pipeline.json"
LOCK_FILE = ".pipeline.lock"  # held while a pipeline writes OUT: a second one into it fails at once
STATE = FileFormat(
    "okdpipe-pipeline-state",
    2,
    "pipeline state file",
    "re-run the pipeline with --force",
    also_reads=(1,),
    legacy_key="state_version",
)


class PipelineConfig(Strict):
    """Each section is that stage's own config model (the one its command and Python function take)."""

    plugins: PluginNames = Field(default_factory=list, description=PLUGINS_HELP + " (for every stage)")
    out: Optional[str] = None
    distill: DistillConfig = Field(default_factory=DistillConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    gate: list[str] = Field(default_factory=list, description='e.g. ["top1>=0.80", "p99_ms@1<=20"]')

    @model_validator(mode="after")
    def _run_records_plugins(self) -> PipelineConfig:
        """The distill run records the pipeline's plug-ins, so a later `okdpipe select` of it loads them too."""
        if any(p not in self.distill.plugins for p in self.plugins):
            self.distill.plugins = list(dict.fromkeys([*self.plugins, *self.distill.plugins]))
        return self

    @model_validator(mode="after")
    def _gates_in_one_place(self) -> PipelineConfig:
        if self.bench.gates:
            raise ValueError(
                "put the pipeline's gates in its top-level `gate:` list, not bench.gates (a gate "
                "change then re-runs only the gate stage, not the benchmark)"
            )
        if self.export.format != "onnx":
            raise ValueError("the pipeline exports plain ONNX artifacts (its bench reads them); drop export.format")
        return self


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Parse and check the whole config (names included) before any stage runs; errors are one line, exit 2."""
    values = read_yaml(path)  # its errors name the file already
    try:
        cfg = PipelineConfig.model_validate(values)
        check_names(cfg)
    except ValidationError as exc:
        raise OkdpipeError(f"{path}: {validation_message(exc)}") from None
    except OkdpipeError as exc:
        raise OkdpipeError(f"{path}: {exc}") from None
    return cfg


def check_names(cfg: PipelineConfig) -> None:
    """Unknown method, backbone, dataset, method parameter or gate fail now, not after minutes of training."""
    from okdpipe.bench.gate import validate_gates
    from okdpipe.distill.init_weights import check_weights_file
    from okdpipe.distill.methods import METHODS
    from okdpipe.distill.select import candidate_names, pool_names
    from okdpipe.distill.trainer import check_training, resolve_device
    from okdpipe.ortsession import check_provider

    check_training(cfg.distill)
    resolve_device(cfg.select.device)
    if cfg.distill.init:
        check_weights_file(cfg.distill.init)
    pool_names(candidate_names(cfg.distill), cfg.select.strategy, METHODS.get(cfg.distill.method).ships)
    check_provider(cfg.bench.provider)
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


def well_formed(record: Any) -> bool:
    """A stage record as `record` writes it: a config hash and {relative path: sha256 or null} maps."""

    def hashes(value: Any) -> bool:
        return isinstance(value, dict) and all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()
        )

    return (
        isinstance(record, dict)
        and isinstance(record.get("config_sha256"), str)
        and hashes(record.get("inputs"))
        and hashes(record.get("outputs"))
    )


def decide(stage: Stage, record: Optional[dict], out: Path, upstream_runs: Optional[str]) -> Decision:
    """Run when the config, an input or an output differs from the last successful run's record. The gate always
    runs (it only reads bench.json): a verdict is never read back from the state file, which anyone can edit."""
    if stage.name == "gate":
        return Decision(stage, True, "gates are evaluated on every run")
    if record is None:
        return Decision(stage, True, "no successful run recorded")
    if not well_formed(record):
        return Decision(stage, True, f"its record in {STATE_FILE} is damaged")
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
        self.cfg, self.out, self.force, self.echo = cfg, Path(out).resolve(), force, echo
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
            return {**STATE.header(), "stages": {}}
        try:
            state = loads_finite(self.state_path.read_text())
        except ValueError as exc:  # malformed, too deeply nested, not UTF-8 or non-finite
            raise OkdpipeError(f"{self.state_path}: corrupt ({exc}); delete it or re-run with --force") from None
        STATE.check(state, self.state_path)
        if not isinstance(state.get("stages"), dict):
            raise OkdpipeError(f"{self.state_path}: damaged (no stages mapping); re-run with --force")
        current = {key: value for key, value in state.items() if key != STATE.legacy_key}  # v1 -> v2 header
        return {**current, **STATE.header()}

    def record(self, state: dict, stage: Stage, inputs: dict, outputs: list[str], extra: dict) -> None:
        state["stages"][stage.name] = {
            "config_sha256": section_sha256(stage.section),
            "inputs": inputs,
            "outputs": hash_files(self.out, outputs),
            "finished": now_iso(),
            **extra,
        }
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
        """Run or skip each stage in order, deciding on the real files as upstream stages finish; gate's exit code.
        OUT is locked throughout: a stage deletes what it replaces (a distill run starting afresh), so two pipelines
        into one OUT would train into one folder and delete each other's outputs."""
        from okdpipe.locks import exclusive_lock

        self.out.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.out / LOCK_FILE, f"another pipeline is writing {self.out}"):
            state = {**STATE.header(), "stages": {}} if self.force else self.read_state()
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
            self.echo(
                f"  {'pass' if result['passed'] else 'FAIL'}  {result['expression']}  "
                f"(value {result['value']}){'  ' + result['detail'] if result.get('detail') else ''}"
            )
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
        from okdpipe.distill.trainer import resume_view

        if self.force:
            return None
        run = RunDir(self.run_dir)
        try:
            manifest = run.read_manifest() if has_checkpoint(run) else {}
        except OkdpipeError:
            return None
        if not manifest or manifest.get("status") == "finished":
            return None
        if resume_view(manifest.get("config", {})) != resume_view(self.cfg.distill.model_dump(mode="json")):
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
        from okdpipe.export.select_int8 import select_shipping

        _, _, chosen, path = select_shipping(self.run_dir, self.cfg.select, self.out / "model.pt")
        self.echo(f"  chose {chosen.name} (val top-1 {chosen.top1:.2%})")
        return [str(path.relative_to(self.out))], {"chosen": chosen.name, "val_top1": chosen.top1}

    def artifact_dirs(self) -> list[Path]:
        variants = ["fp32"] + ([self.cfg.export.quantize] if self.cfg.export.quantize != "none" else [])
        return [self.out / "export" / name for name in variants]

    def _export(self) -> tuple[list[str], dict]:
        from okdpipe.export.exporter import export_model

        # Not emptied first: export replaces every earlier precision folder itself (a variant from an earlier config,
        # say int8 before fp16, does not linger), all or nothing, so a failed export keeps the earlier one.
        cards = export_model(self.out / "model.pt", self.out / "export", self.cfg.export)
        return files_under(self.out, "export"), {"artifacts": [str(c.directory.relative_to(self.out)) for c in cards]}

    def _bench(self) -> tuple[list[str], dict]:
        from okdpipe.bench.run import run_bench

        report = run_bench(self.artifact_dirs(), self.cfg.bench)
        atomic_write_json(self.out / "bench.json", report.to_dict())
        return ["bench.json"], {}

    def _gate(self) -> tuple[list[str], dict]:
        from dataclasses import replace

        from okdpipe.bench.gate import evaluate_gates
        from okdpipe.bench.report import write_reports
        from okdpipe.contracts.report import read_report

        path = self.out / "bench.json"
        report = read_report(path)
        results = evaluate_gates(report, list(self.cfg.gate))
        written = write_reports(
            replace(report, gates=results), self.out / "report.json", junit=self.out / "report.junit.xml"
        )
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


def check_pipeline_files(out: Path) -> None:
    """The files the stages write directly into OUT can be written (no FIFO or folder in their place), and their
    folders are real folders, checked before the first stage trains rather than after it."""
    from okdpipe.bench.report import report_paths

    reports = report_paths(out / "report.json", out / "report.junit.xml").values()
    for path in [out / STATE_FILE, out / LOCK_FILE, out / "model.pt", out / "bench.json", *reports]:
        check_can_write_file(path, "the pipeline's output")
    for stage_folder in (out / "distill", out / "export"):  # a link would send a stage's output outside OUT
        if not_ours_to_replace(stage_folder, folder=True):
            raise OkdpipeError(
                f"{stage_folder}: not a folder of this pipeline (a file, link or pipe); remove it or choose another out"
            )


def default_out(config_path: Path) -> Path:
    return Path("runs") / config_path.stem


def run_pipeline(
    config_path: Path,
    out: Optional[Path] = None,
    force: bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Load and check the config, then plan (--dry-run) or run; returns the exit code (the gate's)."""
    cfg = load_pipeline_config(config_path)
    out = Path(out or cfg.out or default_out(Path(config_path)))
    check_can_create_folder(out, "the pipeline's out folder")
    check_pipeline_files(out)
    pipeline = Pipeline(cfg, out, force, echo)
    if dry_run:
        for decision in pipeline.plan():
            echo(describe(decision))
        return 0
    return pipeline.run()
