"""`okdpipe export` through the command line: flags reach the pipeline, user errors are one line + exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from okdpipe.cli import app
from okdpipe.datasets import load_dataset
from okdpipe.distill.models import create_model
from okdpipe.modelfile import ModelInfo, save_model_file


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    spec = load_dataset("synthetic").spec
    torch.manual_seed(0)
    info = ModelInfo(
        arch="resnet8",
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        labels=spec.labels,
        dataset="synthetic",
        provenance={"data": {"dataset": "synthetic", "val_split": 0.25, "seed": 0}},
    )
    path = tmp_path_factory.mktemp("cli") / "model.pt"
    save_model_file(create_model("resnet8", spec.num_classes, spec.in_channels), info, path)
    return path


def test_export_fp16_writes_two_artifact_directories(model_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(model_file), "--out", str(out), "--quantize", "fp16"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:2] == [str(out / "fp32"), str(out / "fp16")]
    from okdpipe.cpu import cpu_features, fp16_slowness

    assert lines[2:] == [
        f"note: fp16 is for GPUs: on this CPU expect it slower than fp32 ({fp16_slowness(cpu_features())}); "
        "`okdpipe bench` measures both"
    ]
    assert "no native FP16" in fp16_slowness({}) and "few FP16 kernels" in fp16_slowness({"avx512_fp16": True})
    card = json.loads((out / "fp16" / "model.json").read_text())
    assert card["precision"] == "fp16" and card["parity"]["tolerance"] == 5e-2
    assert card["quantization"]["keep_io_types"] is True


def test_foreign_file_is_one_line_exit_2(tmp_path):
    torch.save({"not": "okdpipe"}, tmp_path / "foreign.pt")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2  # bad input (okdpipe/errors.py), not a failed check
    assert result.output.strip().count("\n") == 0
    assert result.output.startswith("error: ") and "not an okdpipe model file" in result.output


def test_bad_quantize_choice_is_rejected(model_file, tmp_path):
    result = CliRunner().invoke(app, ["export", str(model_file), "--out", str(tmp_path), "--quantize", "int4"])
    assert result.exit_code == 2 and "int4" in result.output


@pytest.mark.parametrize("opset", [13, 17])
def test_opset_below_18_is_honoured_and_recorded(model_file, tmp_path, opset):
    import onnx

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(model_file), "--out", str(out), "--opset", str(opset)])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "fp32" / "model.onnx"))
    written = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    card = json.loads((out / "fp32" / "model.json").read_text())
    assert written == card["opset"] == opset


@pytest.mark.parametrize("opset", ["5", "12", "24", "999"])
def test_unsupported_opset_is_refused_in_one_line_exit_2(model_file, tmp_path, opset):
    result = CliRunner().invoke(app, ["export", str(model_file), "--out", str(tmp_path / "o"), "--opset", opset])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "opset" in result.output
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "o").exists()
