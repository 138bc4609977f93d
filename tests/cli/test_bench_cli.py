"""`okdpipe bench` through the command line: exit codes 0/1/2, reports, JUnit, baselines and policies."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from typer.testing import CliRunner

from okdpipe.cli import app
from okdpipe.datasets import load_dataset
from okdpipe.distill.models import create_model
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import export_model
from okdpipe.modelfile import ModelInfo, save_model_file

QUICK = ["--batch-sizes", "1,2", "--threads", "1", "--warmup", "1", "--min-seconds", "0.01", "--no-pytorch"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """An untrained resnet8 on `synthetic`, exported to fp32 ONNX (no run directory: no ensemble row)."""
    root = tmp_path_factory.mktemp("bench-cli")
    spec = load_dataset("synthetic").spec
    torch.manual_seed(1)
    network = create_model("resnet8", spec.num_classes, spec.in_channels)
    save_model_file(
        network,
        ModelInfo(
            "resnet8",
            spec.num_classes,
            spec.in_channels,
            spec.input_size,
            spec.mean,
            spec.std,
            spec.labels,
            "synthetic",
            provenance={"data": {"dataset": "synthetic", "val_split": 0.25, "seed": 0}},
        ),
        root / "model.pt",
    )
    [card] = export_model(root / "model.pt", root / "out", ExportConfig())
    return card.directory


def bench(artifact, tmp_path, *extra: str):
    args = ["bench", str(artifact), *QUICK, "--report", str(tmp_path / "report.json"), *extra]
    return CliRunner().invoke(app, args)


def test_passing_gates_exit_0_and_write_every_report(artifact, tmp_path):
    result = bench(
        artifact, tmp_path, "--gate", "top1>=0", "--gate", "p99_ms@1<=100000", "--junit", str(tmp_path / "junit.xml")
    )
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "report.png", "junit.xml"):
        assert (tmp_path / name).is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [g["passed"] for g in report["gates"]] == [True, True]
    assert report["notes"] == ["resnet8-synthetic: the card records no run directory; ensemble row skipped"]
    assert "gates" in result.output and "pass" in result.output
    assert ET.parse(tmp_path / "junit.xml").getroot().get("failures") == "0"


def test_failing_gate_exits_1_with_a_table_and_one_error_line(artifact, tmp_path):
    result = bench(
        artifact, tmp_path, "--gate", "top1>=1.01", "--gate", "p99_ms@2<=100000", "--junit", str(tmp_path / "junit.xml")
    )
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 2 gates failed: resnet8-synthetic: top1>=1.01 (")
    assert "FAIL" in result.output and "off by" in errors[0]
    cases = ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")
    assert [case.find("failure") is not None for case in cases] == [True, False]
    assert "**1 of 2 gates failed**" in (tmp_path / "report.md").read_text()  # reports are written before exit 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gate", "top1 high"], "cannot parse gate 'top1 high'"),
        (["--gate", "latency<=2"], "unknown metric 'latency'"),
        (["--gate", "top1>=baseline-0.005"], "pass --baseline OLD_REPORT.json"),
        (["--gate", "p99_ms@64<=2"], "batch size 64 is not benchmarked"),
    ],
)
def test_bad_gates_exit_2_before_benchmarking(artifact, tmp_path, extra, message):
    result = bench(artifact, tmp_path, *extra)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and result.output.startswith("error: ") and message in result.output
    assert not (tmp_path / "report.json").exists()


def test_bad_batch_sizes_exit_2(artifact, tmp_path):
    result = CliRunner().invoke(app, ["bench", str(artifact), "--batch-sizes", "1,x"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "positive integers" in result.output


def test_baseline_relative_gates_pass_and_fail(artifact, tmp_path):
    first = tmp_path / "old"
    first.mkdir()
    assert bench(artifact, first).exit_code == 0
    baseline = ["--baseline", str(first / "report.json")]
    same = bench(artifact, tmp_path, *baseline, "--gate", "top1>=baseline-0.005", "--gate", "macs==baseline")
    assert same.exit_code == 0, same.output
    shrunk = bench(artifact, tmp_path, *baseline, "--gate", "images_per_s@1>=baseline*1000")
    assert shrunk.exit_code == 1 and "(baseline " in shrunk.output


def test_policy_names_become_junit_testcases(artifact, tmp_path):
    policy = tmp_path / "gate.yaml"
    policy.write_text("gates:\n  - {name: accuracy floor, gate: 'fp32:top1>=0'}\n  - 'top5>=0'\n")
    result = bench(artifact, tmp_path, "--policy", str(policy), "--junit", str(tmp_path / "j.xml"))
    assert result.exit_code == 0, result.output
    names = [case.get("name") for case in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")]
    assert names == ["accuracy floor", "top5>=0"]
