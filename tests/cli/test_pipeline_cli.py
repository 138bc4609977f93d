"""`okdpipe pipeline` end to end on the synthetic smoke config: every stage runs once, a re-run skips them all,
a changed section re-runs exactly the stages downstream of it, and the exit code is the gate's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from okdpipe.cli_support import friendly_errors
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.files import file_sha256
from okdpipe.pipeline_command import pipeline_command
from okdpipe.run import RunDir

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "pipeline-smoke.yaml"
STAGES = ["distill", "select", "export", "bench", "gate"]


def pipeline_app() -> typer.Typer:
    """The real CLI, with `pipeline` registered as the lead registers it if that has not happened yet."""
    from okdpipe.cli import app

    if "pipeline" not in {command.name for command in app.registered_commands}:
        app.command("pipeline")(friendly_errors(pipeline_command))
    return app


def smoke_config(directory: Path, **sections) -> Path:
    """The smoke config with some sections replaced (dicts are merged into the section)."""
    data = yaml.safe_load(SMOKE.read_text())
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(config: Path, out: Path, *flags: str):
    return CliRunner().invoke(pipeline_app(), ["pipeline", str(config), "--out", str(out), *flags])


def stage_lines(output: str) -> list[str]:
    """'run   export   its config ...' -> 'run export'; one per stage, in order."""
    words = [line.split() for line in output.splitlines() if line[:4] in ("run ", "skip")]
    return [f"{w[0]} {w[1]}" for w in words]


def records(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text())["stages"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One complete smoke pipeline; tests that change it work on a copy."""
    work = tmp_path_factory.mktemp("pipeline")
    result = invoke(smoke_config(work), work / "out")
    assert result.exit_code == 0, result.output
    assert stage_lines(result.output) == [f"run {name}" for name in STAGES]
    return work / "out"


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "out"))


@pytest.mark.slow
def test_end_to_end_writes_every_stage_output(finished):
    for rel in [
        "distill/checkpoints/last.pt",
        "model.pt",
        "export/fp32/model.onnx",
        "export/int8/model.onnx",
        "bench.json",
        "report.json",
        "report.md",
        "report.png",
        "report.junit.xml",
    ]:
        assert (finished / rel).is_file(), rel
    state = records(finished)
    assert list(state) == STAGES
    checkpoint = "distill/checkpoints/last.pt"
    assert state["select"]["inputs"] == {checkpoint: file_sha256(finished / checkpoint)}
    assert state["export"]["artifacts"] == ["export/fp32", "export/int8"]
    gates = json.loads((finished / "report.json").read_text())["gates"]
    assert {g["artifact"] for g in gates} == {"resnet8-synthetic", "resnet8-synthetic-int8"}
    assert state["gate"]["passed"] is True and all(g["passed"] for g in gates)


@pytest.mark.slow
def test_rerun_skips_every_stage_but_the_gate(finished):
    before = records(finished)
    result = invoke(smoke_config(finished.parent), finished)
    assert result.exit_code == 0, result.output
    assert stage_lines(result.output) == [f"skip {name}" for name in STAGES[:-1]] + ["run gate"]
    assert "gate passed" in result.output
    after = records(finished)
    assert all(after[name] == before[name] for name in STAGES[:-1])  # only the gate (re-evaluated) is rewritten


@pytest.mark.slow
def test_changing_quantize_reruns_export_bench_and_gate_only(copy, tmp_path):
    before = records(copy)
    result = invoke(smoke_config(tmp_path, export={"quantize": "fp16"}), copy)
    assert result.exit_code == 0, result.output
    assert stage_lines(result.output) == ["skip distill", "skip select", "run export", "run bench", "run gate"]
    assert "run   bench    input export/fp16/model.json changed" in result.output
    after = records(copy)
    assert after["distill"] == before["distill"] and after["select"] == before["select"]
    assert after["export"]["artifacts"] == ["export/fp32", "export/fp16"] and not (copy / "export/int8").exists()


@pytest.mark.slow
def test_failed_gate_exits_1_without_rerunning_the_benchmark(copy, tmp_path):
    result = invoke(smoke_config(tmp_path, gate=["top1>=1.01"]), copy)
    assert result.exit_code == 1, result.output
    assert stage_lines(result.output) == [f"skip {name}" for name in STAGES[:-1]] + ["run gate"]
    assert "FAIL  top1>=1.01" in result.output and "gate FAILED" in result.output
    assert records(copy)["gate"]["passed"] is False
    rerun = invoke(smoke_config(tmp_path, gate=["top1>=1.01"]), copy)
    assert rerun.exit_code == 1 and stage_lines(rerun.output)[-1] == "run gate"  # re-evaluated, still failing


@pytest.mark.slow
def test_force_reruns_every_stage_to_the_same_weights(copy, tmp_path):
    weights = load_checkpoint(RunDir(copy / "distill"))["students"]
    result = invoke(smoke_config(tmp_path), copy, "--force")
    assert result.exit_code == 0, result.output
    assert stage_lines(result.output) == [f"run {name}" for name in STAGES]
    assert result.output.count("--force") == len(STAGES)
    again = load_checkpoint(RunDir(copy / "distill"))["students"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # CPU training is deterministic


@pytest.mark.slow
def test_dry_run_reports_the_plan_and_runs_nothing(finished, tmp_path):
    before = (finished / "pipeline.json").read_bytes()
    result = invoke(smoke_config(tmp_path, export={"quantize": "fp16"}), finished, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "skip  distill  config, inputs and outputs unchanged",
        "skip  select   config, inputs and outputs unchanged",
        "run   export   its config section (export) changed",
        "run   bench    upstream stage export runs first and may change its inputs",
        "run   gate     gates are evaluated on every run",
    ]
    assert (finished / "pipeline.json").read_bytes() == before and not (finished / "export/fp16").exists()


def test_dry_run_of_a_new_directory_creates_nothing(tmp_path):
    result = invoke(smoke_config(tmp_path), tmp_path / "new", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "run   distill  no successful run recorded; trains from scratch"
    assert stage_lines(result.output) == [f"run {name}" for name in STAGES] and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_relative_out_folder_runs_every_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(smoke_config(tmp_path), Path("relative-out"))
    assert result.exit_code == 0, result.output
    assert stage_lines(result.output) == [f"run {name}" for name in STAGES]
    outputs = records(tmp_path / "relative-out")["export"]["outputs"]
    assert "export/fp32/model.onnx" in outputs and all((tmp_path / "relative-out" / p).is_file() for p in outputs)


@pytest.mark.parametrize(
    "sections, fragment",
    [
        ({"export": {"quantise": "int8"}}, "export.quantise: Extra inputs are not permitted"),
        ({"gate": ["p99_ms@2<=20"]}, "batch size 2 is not benchmarked"),
        ({"gate": ["latency<=20"]}, "latency"),
        ({"bench": {"provider": "tpu"}}, "bench.provider: unknown provider 'tpu'"),
    ],
)
def test_bad_config_is_one_line_exit_2_before_anything_runs(tmp_path, sections, fragment):
    result = invoke(smoke_config(tmp_path, **sections), tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert not (tmp_path / "out").exists()
