"""A DML pair of different architectures as a new user runs it (distill -> select -> export -> bench, real processes),
and the one-line refusals of the combinations that cannot mix architectures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_mixed_archs import params_for
from typer.testing import CliRunner

from okdpipe.cli import app

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
QUICK = ["--batch-sizes", "1", "--threads", "1", "--warmup", "0", "--min-seconds", "0.01", "--max-samples", "16"]
SYNTHETIC = ["--dataset", "synthetic", "--val-split", "0.25", "--set", "batch_size=16", "--lr", "0.05"]


def okdpipe(*args) -> subprocess.CompletedProcess:
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    command = [str(python), "-m", "okdpipe", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, check=False)


def test_dml_pair_of_two_architectures_trains_selects_exports_and_benches(tmp_path):
    run, out = tmp_path / "pair", tmp_path / "out"
    commands = [
        ["distill", "--method", "dml", "--arch", "resnet8,mobilenetv2", *SYNTHETIC, "--epochs", "1", "--out", run],
        ["select", run, "--strategy", "student:1"],
        ["export", run / "model.pt", "--out", out],
        ["bench", out / "fp32", *QUICK, "--no-pytorch", "--report", tmp_path / "report.json"],
    ]
    for args in commands:
        result = okdpipe(*args)
        assert result.returncode == 0, (args, result.stderr[-2000:])
    card = json.loads((out / "fp32" / "model.json").read_text())
    assert card["provenance"]["candidate"] == "student:1" and card["name"] == "mobilenetv2-synthetic"
    report = json.loads((tmp_path / "report.json").read_text())
    (ensemble,) = [row for row in report["references"] if row["kind"] == "ensemble"]
    assert ensemble["name"] == "ensemble (resnet8 + mobilenetv2, dml)"
    assert ensemble["params"] == params_for("resnet8", 4, 3) + params_for("mobilenetv2", 4, 3)  # both students
    assert ensemble["provenance"]["students"] == 2 and ensemble["provenance"]["arch"] == "resnet8,mobilenetv2"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "pcl", "--arch", "resnet8,resnet20,resnet8"], "--method pcl cannot train peers of different"),
        (["--method", "one", "--arch", "resnet8,resnet20"], "--method one cannot train peers of different"),
        (["--method", "ffsd", "--arch", "resnet8,resnet20"], "--method ffsd cannot train peers of different"),
        (["--method", "okdph", "--arch", "resnet8,resnet20"], "averages the students' weights"),
        (["--method", "dml", "--arch", "resnet8,resnet20", "--fused"], "--fused runs peers of one architecture"),
        (["--method", "dml", "--arch", "resnet8,resnet20", "--students", "3"], "arch names 2 architectures"),
        (["--method", "dml", "--arch", "resnet8,resnet9000"], "resnet9000"),
    ],
)
def test_combinations_that_cannot_mix_architectures_are_one_line_exit_2(tmp_path, args, fragment):
    result = CliRunner().invoke(app, ["distill", *args, *SYNTHETIC, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert fragment in result.stderr and "Traceback" not in result.output
