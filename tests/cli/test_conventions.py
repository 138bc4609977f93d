"""CLI conventions as a new user meets them, through a real process (`python -m okdpipe ...`): -h, `env`, `--dry-run`
YAML that `--config` reproduces, `--json` as exactly one JSON document on stdout, and the exit-code table
(0 ok, 1 a gate or check failed, 2 bad input: stderr's first line `error: ...`, never a traceback)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
TIMEOUT = 180
QUICK = [
    "--batch-sizes",
    "1",
    "--threads",
    "1",
    "--warmup",
    "0",
    "--min-seconds",
    "0.01",
    "--max-samples",
    "16",
    "--no-pytorch",
    "--no-ensemble",
]


def okdpipe(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(python), "-m", "okdpipe", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd or ROOT,
        env=env,
    )


def assert_usage_error(result: subprocess.CompletedProcess, code: int = 2, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.splitlines()[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr.splitlines()[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from okdpipe.datasets import load_dataset
    from okdpipe.distill.models import create_model
    from okdpipe.modelfile import ModelInfo, save_model_file

    spec = load_dataset("synthetic").spec
    torch.manual_seed(0)
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
    path = tmp_path_factory.mktemp("conventions") / "model.pt"
    save_model_file(create_model("resnet8", spec.num_classes, spec.in_channels), info, path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from okdpipe import api

    run = tmp_path_factory.mktemp("conventions-run") / "run"
    api.fit(api.DistillConfig(method="vanilla", arch="resnet8", dataset="synthetic", epochs=1), run)
    return run


@pytest.fixture(scope="module")
def artifact(model_file):
    from okdpipe.export.config import ExportConfig
    from okdpipe.export.exporter import export_model

    [card] = export_model(model_file, model_file.parent / "out", ExportConfig(opset=13))
    return card.directory


# ------------------------------------------------------------------------------------------ help, env


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["export", "-h"], ["bench", "-h"], ["select", "-h"]])
def test_help_exits_0(args):
    result = okdpipe(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_version():
    from okdpipe import __version__

    result = okdpipe("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"okdpipe {__version__}"


def test_env_prints_versions_and_providers():

    result = okdpipe("env")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("okdpipe ")
    assert "torch" in result.stdout and "onnxruntime" in result.stdout
    assert "CPUExecutionProvider" in result.stdout


def test_env_json_is_one_json_document():
    import onnx
    import onnxruntime

    from okdpipe import __version__

    result = okdpipe("env", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["okdpipe"] == __version__
    assert report["packages"]["torch"] == importlib.metadata.version("torch")
    assert report["packages"]["onnxruntime"] == onnxruntime.__version__
    assert report["packages"]["onnx"] == onnx.__version__
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]
    assert isinstance(report["cpu"]["features"], dict) and "available" in report["cuda"]


# ------------------------------------------------------------------------------------- --dry-run / --config


def _select_config():
    from okdpipe.distill.select_command import SelectConfig

    return SelectConfig


def _export_config():
    from okdpipe.export.config import ExportConfig

    return ExportConfig


def _bench_config():
    from okdpipe.bench.config import BenchConfig

    return BenchConfig


CONFIGS = {"select": _select_config, "export": _export_config, "bench": _bench_config}


@pytest.mark.parametrize(
    "command, flags",
    [
        ("select", ["--strategy", "best", "--bn-batches", "7", "--device", "cpu"]),
        ("export", ["--quantize", "int8", "--calib-method", "entropy", "--opset", "17", "--max-accuracy-drop", "2.5"]),
        (
            "bench",
            ["--batch-sizes", "1,2", "--threads", "1", "--gate", "top1>=0.5", "--no-pytorch", "--min-seconds", "0.5"],
        ),
    ],
)
def test_dry_run_prints_yaml_that_config_reproduces(tmp_path, finished_run, model_file, artifact, command, flags):
    target = {"select": [finished_run], "export": [model_file, "--out", tmp_path / "out"], "bench": [artifact]}[command]
    first = okdpipe(command, *target, *flags, "--dry-run")
    assert first.returncode == 0, first.stderr
    printed = yaml.safe_load(first.stdout)
    assert isinstance(printed, dict)
    assert list(printed) == list(CONFIGS[command]().model_fields)  # every option, in declaration order
    config = tmp_path / "config.yaml"
    config.write_text(first.stdout)
    again = okdpipe(command, *target, "--config", config, "--dry-run")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    defaults = okdpipe(command, *target, "--dry-run")
    assert defaults.stdout != first.stdout  # the flags did change something


def test_dry_run_values_are_the_flags(artifact, model_file, tmp_path):
    dry_run = okdpipe("bench", artifact, "--batch-sizes", "2,1", "--threads", "3", "--dry-run")
    printed = yaml.safe_load(dry_run.stdout)
    assert printed["batch_sizes"] == [2, 1] and printed["threads"] == 3
    dry_run = okdpipe("export", model_file, "--out", tmp_path / "out", "--opset", "17", "--dry-run")
    printed = yaml.safe_load(dry_run.stdout)
    assert printed["opset"] == 17 and printed["quantize"] == "none"
    assert not (tmp_path / "out").exists()


def test_flags_override_the_config_file(tmp_path, model_file):
    config = tmp_path / "export.yaml"
    config.write_text("opset: 17\nquantize: fp16\n")
    command = ["export", model_file, "--out", tmp_path / "out", "--config", config, "--opset", "13", "--dry-run"]
    printed = yaml.safe_load(okdpipe(*command).stdout)
    assert printed["opset"] == 13 and printed["quantize"] == "fp16"


# ---------------------------------------------------------------------------------------------- --json


def test_export_json_is_exactly_one_document(model_file, tmp_path):
    result = okdpipe("export", model_file, "--out", tmp_path / "out", "--opset", "13", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    [artifact] = document["artifacts"]
    assert artifact["directory"] == str(tmp_path / "out" / "fp32")
    assert artifact["opset"] == 13 and artifact["precision"] == "fp32"


def test_bench_json_is_exactly_one_document(artifact, tmp_path):
    result = okdpipe("bench", artifact, *QUICK, "--report", tmp_path / "report.json", "--gate", "top1>=0", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["format"] == "okdpipe-bench-report"
    [entry] = document["artifacts"]
    assert entry["session"]["intra_op_num_threads"] == 1 and [g["passed"] for g in document["gates"]] == [True]
    assert document == json.loads((tmp_path / "report.json").read_text())


def test_failed_gate_exits_1_and_still_prints_one_json_document(artifact, tmp_path):
    result = okdpipe("bench", artifact, *QUICK, "--report", tmp_path / "report.json", "--gate", "top1>=1.01", "--json")
    assert_usage_error(result, 1, "1 of 1 gates failed")
    assert [g["passed"] for g in json.loads(result.stdout)["gates"]] == [False]


def test_quiet_prints_nothing_but_errors(model_file, tmp_path):
    """-q: every stage runs to completion with empty stdout and stderr (files are still written)."""
    run = tmp_path / "run"
    commands = [
        [
            "distill",
            "--method",
            "vanilla",
            "--arch",
            "resnet8",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--out",
            run,
        ],
        ["select", run],
        ["export", run / "model.pt", "--out", tmp_path / "out"],
        ["bench", tmp_path / "out" / "fp32", *QUICK, "--report", tmp_path / "report.json", "--gate", "top1>=0"],
    ]
    for args in commands:
        result = okdpipe("-q", *args)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), args
    assert (tmp_path / "report.json").is_file() and (tmp_path / "out" / "fp32" / "model.json").is_file()


# ------------------------------------------------------------------------------------- deliberate mistakes


def mistake_files(tmp_path: Path) -> dict[str, Path]:
    files = {"list": tmp_path / "list.yaml", "binary": tmp_path / "binary.yaml", "typo": tmp_path / "typo.yaml"}
    files["list"].write_text("- 1\n- 2\n")
    files["binary"].write_bytes(b"\xff\xfe\x00")
    files["typo"].write_text("opsett: 13\n")
    return files


# (args with M = model file, A = artifact, T/... = under tmp_path, @name = a config file; a fragment of line 1)
MISTAKES = [
    (["export", "M", "--out", "T/out", "--quantize", "int4"], "int4"),
    (["export", "M", "--out", "T/out", "--calib-method", "median"], "median"),
    (["export", "M", "--out", "T/out", "--max-accuracy-drop", "nan"], "max-accuracy-drop"),
    (["export", "M", "--out", "T/out", "--max-accuracy-drop", "inf"], "max-accuracy-drop"),
    (["export", "M", "--out", "T/out", "--calib-size", "0"], "calib-size"),
    (["export", "M", "--out", "T/out", "--opset", "5"], "opset"),
    (["export", "M", "--out", "T/out", "--config", "@list"], "mapping"),
    (["export", "M", "--out", "T/out", "--config", "@binary"], "UTF-8"),
    (["export", "M", "--out", "T/out", "--config", "@typo"], "opsett"),
    (["export", "T/absent.pt", "--out", "T/out"], "absent.pt"),
    (["bench", "A", "--batch-sizes", "1,x"], "1,x"),
    (["bench", "A", "--batch-sizes", "0"], "batch"),
    (["bench", "A", "--threads", "0"], "threads"),
    (["bench", "A", "--min-seconds", "nan"], "min-seconds"),
    (["bench", "T/no-such-artifact", *QUICK], "no-such-artifact"),
    (["bench", "A", *QUICK, "--config", "@list"], "mapping"),
    (["bench", "A", *QUICK, "--gate", "top1 high"], "top1 high"),
    (["bench", "A", *QUICK, "--report", "T"], "is a folder"),
    (["bench", "A", *QUICK, "--report", "T/r.json", "--junit", "T"], "is a folder"),
    (["bench", "A", *QUICK, "--report", "T/list.yaml/report.json"], "is a file, not a folder"),
    (["select", "T", "--bn-batches", "0"], "bn"),
    # a device where a folder or file is expected is named for what it is, never "no such" or "a file"
    (["select", "/dev/null"], "/dev/null: is a device, pipe or socket, not a run directory"),
    (["bench", "/dev/null", *QUICK], "/dev/null: is a device, pipe or socket, not an artifact directory"),
    (["export", "/dev/null", "--out", "T/out"], "/dev/null: is a device, pipe or socket, not a model file"),
    (["report", "/dev/null", "--out", "T/r"], "/dev/null: is a device, pipe or socket, not a run directory"),
    (["report", "T", "--out", "/dev/null"], "--out /dev/null: is a device, pipe or socket; give a folder"),
    (["distill", "--dataset", "cifar10", "--data-dir", "/dev/null", "--dry-run"], "not a data directory"),
    (["select", "T", "--config", "@list"], "mapping"),
]


@pytest.mark.parametrize(
    "args, fragment", MISTAKES, ids=[" ".join(a[:1] + a[2:] if a[1] in "MAT" else a) for a, _ in MISTAKES]
)
def test_mistakes_exit_2_with_one_error_line(model_file, artifact, tmp_path, args, fragment):
    files = mistake_files(tmp_path)
    concrete = []
    for arg in args:
        if arg == "M":
            concrete.append(model_file)
        elif arg == "A":
            concrete.append(artifact)
        elif arg == "T" or arg.startswith("T/"):
            concrete.append(tmp_path / arg[2:] if arg != "T" else tmp_path)
        elif arg.startswith("@"):
            concrete.append(files[arg[1:]])
        else:
            concrete.append(arg)
    result = okdpipe(*concrete, cwd=tmp_path)
    assert_usage_error(result, 2, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    "args",
    [["bench", ".", "--threads", "abc"], ["export", "m.pt", "--bogus"], ["export", "m.pt", "--opset", "thirteen"]],
)
def test_click_parse_errors_are_one_error_line(args):
    assert_usage_error(okdpipe(*args), 2)
