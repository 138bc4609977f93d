"""okdpipe.export end to end on tiny models and the synthetic dataset: parity, dynamic batch, cards, failures."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from okdpipe.contracts.card import read_card, write_card
from okdpipe.datasets import load_dataset
from okdpipe.distill.models import MODELS, create_model
from okdpipe.errors import OkdpipeError
from okdpipe.export import onnx_export
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import LOCK_FILE, export_model
from okdpipe.export.triton import triton_config
from okdpipe.modelfile import ModelInfo, save_model_file
from okdpipe.ortsession import create_session

OPSET = ExportConfig().opset


def written(out):
    """What an export left in OUT besides its (released) advisory lock file (a failed export into a new OUT
    leaves no folder at all)."""
    return [p for p in out.iterdir() if p.name != LOCK_FILE] if out.exists() else []


def cpu_session(path):
    """A fresh session built by the one factory export, bench and serve share."""
    return create_session(path)[0]


FAST_MODELS = {"resnet8", "resnet20"}  # the rest export in 3-15 s each on 2 cores: slow-marked


def make_model_file(path, arch="resnet8", seed=0):
    """A MODEL.pt for the synthetic dataset (3x16x16, 4 classes), as `okdpipe select` would write it."""
    spec = load_dataset("synthetic").spec
    torch.manual_seed(seed)
    # an unknown arch gets real (resnet8) weights: a file from a newer okdpipe, say, not an empty one
    model = create_model(arch if arch in MODELS else "resnet8", spec.num_classes, spec.in_channels)
    info = ModelInfo(
        arch=arch,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        labels=spec.labels,
        dataset="synthetic",
        provenance={
            "data": {"dataset": "synthetic", "val_split": 0.25, "seed": 0},
            "run_dir": "runs/x",
            "candidate": "s0",
            "method": "dml",
        },
    )
    save_model_file(model, info, path)
    return path, model.eval(), spec


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One int8 export shared by the read-only tests below (export is the slow part)."""
    root = tmp_path_factory.mktemp("export")
    model_path, model, spec = make_model_file(root / "model.pt")
    cards = export_model(model_path, root / "out", ExportConfig(quantize="int8", max_accuracy_drop=100.0))
    dirs = [card.directory for card in cards]
    return {"dirs": dirs, "model": model, "spec": spec, "model_path": model_path, "out": root / "out"}


def test_writes_fp32_and_int8_artifact_directories(exported):
    out = exported["out"]
    assert exported["dirs"] == [out / "fp32", out / "int8"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "fp32", "int8"]  # no staging leftovers
    assert sorted(p.name for p in (out / "fp32").iterdir()) == ["model.json", "model.onnx"]


def test_card_schema(exported):
    card = read_card(exported["out"] / "fp32").raw
    spec = exported["spec"]
    assert list(card) == [
        "format",
        "format_version",
        "name",
        "file",
        "precision",
        "input",
        "output",
        "preprocess",
        "labels",
        "dataset",
        "opset",
        "parity",
        "quantization",
        "accuracy",
        "runtime",
        "provenance",
        "sha256",
    ]
    assert card["name"] == "resnet8-synthetic" and card["precision"] == "fp32" and card["quantization"] is None
    assert card["input"] == {"name": "input", "shape": [None, 3, 16, 16], "dtype": "float32", "layout": "NCHW"}
    assert card["output"] == {"name": "logits", "shape": [None, 4], "dtype": "float32"}
    assert card["preprocess"] == {
        "size": [16, 16],
        "channels": 3,
        "scale": 1 / 255,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "resize": "stretch",  # the synthetic images already have the input size; stretch is the default policy
    }
    assert card["labels"] == list(spec.labels) and card["opset"] == 18
    assert card["provenance"]["candidate"] == "s0" and len(card["provenance"]["model_sha256"]) == 64
    assert set(card["runtime"]) == {"torch", "onnx", "onnxruntime", "okdpipe"}


def test_fp32_parity_recorded_and_within_tolerance(exported):
    parity = read_card(exported["out"] / "fp32").raw["parity"]
    val_size = len(load_dataset("synthetic", val_split=0.25).val)
    assert parity["batches"] == [1, min(32, val_size)]
    assert parity["tolerance"] == 1e-4 and parity["reference"] == "pytorch-fp32"
    assert parity["max_abs_diff"] < 1e-5 and parity["top1_agreement"] == 1.0


def test_onnx_matches_pytorch_at_dynamic_batch_sizes_in_fresh_sessions(exported):
    model = exported["model"]
    for batch in (1, 7, 64):
        session = cpu_session(exported["out"] / "fp32" / "model.onnx")  # fresh: no shape caching
        inputs = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        logits = onnx_export.run_session(session, inputs)
        assert logits.shape == (batch, 4)
        np.testing.assert_allclose(logits, onnx_export.torch_logits(model, inputs), rtol=0, atol=1e-4)


def test_int8_accuracy_drop_is_measured_on_the_validation_split(exported):
    fp32, int8 = read_card(exported["out"] / "fp32").raw, read_card(exported["out"] / "int8").raw
    accuracy = int8["accuracy"]
    assert accuracy["val_samples"] == len(load_dataset("synthetic", val_split=0.25).val)
    assert accuracy["fp32_val_top1"] == fp32["accuracy"]["val_top1"]
    assert accuracy["drop_points"] == pytest.approx((accuracy["fp32_val_top1"] - accuracy["val_top1"]) * 100)
    assert int8["name"] == "resnet8-synthetic-int8" and int8["parity"]["tolerance"] is None
    assert int8["quantization"]["calibration"]["samples"] == len(load_dataset("synthetic", val_split=0.25).train)


def test_tampered_onnx_fails_sha256_check(exported, tmp_path):
    directory = tmp_path / "art"
    directory.mkdir()
    (directory / "model.onnx").write_bytes((exported["out"] / "fp32" / "model.onnx").read_bytes())
    fields = read_card(exported["out"] / "fp32").raw  # a valid card: write_card refuses invalid ones
    write_card(directory, {k: v for k, v in fields.items() if k not in ("format", "format_version", "sha256")})
    assert read_card(directory).raw["sha256"]["model.onnx"]
    with open(directory / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(OkdpipeError, match=r"model.onnx sha256 is .* the card says .* \(file changed\)"):
        read_card(directory)


def test_card_format_version_and_missing_card_are_errors(exported, tmp_path):
    with pytest.raises(OkdpipeError, match="no model.json in .*pass the folder `okdpipe export` wrote"):
        read_card(tmp_path)
    card = json.loads((exported["out"] / "fp32" / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**card, "format_version": 2}))
    with pytest.raises(OkdpipeError, match="format_version 2 is not supported"):
        read_card(tmp_path)


def test_card_module_does_not_import_torch():
    code = "import sys, okdpipe.contracts.card; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parity_failure_raises_and_writes_no_artifact(tmp_path, monkeypatch):
    model_path, _, _ = make_model_file(tmp_path / "model.pt")
    real_export = onnx_export.export_onnx

    def export_broken_model(model, *args, **kwargs):
        broken = create_model("resnet8", 4, 3).eval()  # other weights: a wrong graph the check must catch
        return real_export(broken, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", export_broken_model)
    with pytest.raises(OkdpipeError, match="parity check failed") as error:
        export_model(model_path, tmp_path / "out", ExportConfig())
    assert "\n" not in str(error.value) and error.value.exit_code == 1  # a failed check, not bad input
    assert written(tmp_path / "out") == []


def test_accuracy_drop_over_limit_fails_and_writes_nothing(exported, tmp_path):
    # ExportConfig refuses a negative limit; built unvalidated here so that any variant is over it
    with pytest.raises(OkdpipeError, match="over --max-accuracy-drop -100") as error:
        export_model(
            exported["model_path"],
            tmp_path / "out",
            ExportConfig.model_construct(quantize="int8-dynamic", max_accuracy_drop=-100.0),
        )
    assert error.value.exit_code == 1
    assert written(tmp_path / "out") == []


def test_triton_repository(exported, tmp_path):
    cards = export_model(exported["model_path"], tmp_path / "repo", ExportConfig(format="triton"))
    model_dir = tmp_path / "repo" / "resnet8-synthetic"
    assert [card.directory for card in cards] == [model_dir / "1"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.json", "model.onnx"]
    assert read_card(model_dir / "1").name == "resnet8-synthetic"
    config = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "max_batch_size: 64" in config
    assert "dims: [ 3, 16, 16 ]" in config and "dims: [ 4 ]" in config
    assert "kind: KIND_CPU" in config and "dynamic_batching { }" in config


def test_triton_config_text():
    card = {
        "input": {"name": "input", "shape": [None, 1, 28, 28], "dtype": "float32"},
        "output": {"name": "logits", "shape": [None, 10], "dtype": "float32"},
    }
    assert triton_config("m", card, max_batch_size=8, instance="gpu") == (
        'name: "m"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
        'input [\n  {\n    name: "input"\n    data_type: TYPE_FP32\n    dims: [ 1, 28, 28 ]\n  }\n]\n'
        'output [\n  {\n    name: "logits"\n    data_type: TYPE_FP32\n    dims: [ 10 ]\n  }\n]\n'
        "dynamic_batching { }\n"
        "instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]\n"
    )
    with pytest.raises(OkdpipeError, match="max-batch-size must be >= 1"):
        triton_config("m", card, max_batch_size=0)


def test_not_an_okdpipe_file(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(OkdpipeError, match="not an okdpipe model file"):
        export_model(tmp_path / "foreign.pt", tmp_path / "out", ExportConfig())


def test_corrupt_file(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(OkdpipeError, match="not a readable okdpipe model file"):
        export_model(tmp_path / "corrupt.pt", tmp_path / "out", ExportConfig())


def test_unknown_architecture(tmp_path):
    model_path, _, _ = make_model_file(tmp_path / "model.pt", arch="resnet9000")
    with pytest.raises(OkdpipeError, match="resnet9000"):
        export_model(model_path, tmp_path / "out", ExportConfig())


def test_unwritable_out(tmp_path):
    model_path, _, _ = make_model_file(tmp_path / "model.pt")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OkdpipeError, match="a_file is a file, not a folder; choose another path") as error:
        export_model(model_path, tmp_path / "a_file" / "out", ExportConfig())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "arch", [name if name in FAST_MODELS else pytest.param(name, marks=pytest.mark.slow) for name in MODELS.names()]
)
def test_every_backbone_exports_with_parity(arch, tmp_path):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=4, in_channels=3).eval()
    onnx_export.export_onnx(model, (3, 16, 16), tmp_path / "m.onnx", OPSET)
    inputs = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    report = onnx_export.parity_report(
        lambda x: onnx_export.torch_logits(model, x),
        lambda x: onnx_export.run_session(cpu_session(tmp_path / "m.onnx"), x),
        [inputs[:1], inputs],
        onnx_export.FP32_TOLERANCE,
        "pytorch-fp32",
    )
    assert report["top1_agreement"] == 1.0 and report["batches"] == [1, 3]


def test_graph_precision_is_read_from_the_graph_not_the_card(exported, tmp_path):
    from okdpipe.contracts.card import check_graph_precision, graph_precision

    out = exported["out"]
    assert [graph_precision(out / p / "model.onnx") for p in ("fp32", "int8")] == ["fp32", "int8"]
    swapped = tmp_path / "swapped"
    shutil.copytree(out / "fp32", swapped)
    shutil.copy(out / "int8" / "model.onnx", swapped / "model.onnx")
    card = json.loads((swapped / "model.json").read_text())
    card["sha256"] = {"model.onnx": hashlib.sha256((swapped / "model.onnx").read_bytes()).hexdigest()}
    (swapped / "model.json").write_text(json.dumps(card))
    with pytest.raises(OkdpipeError, match="model.onnx computes in int8 but its card says fp32"):
        check_graph_precision(read_card(swapped))


def test_a_new_export_replaces_every_earlier_precision(exported, tmp_path):
    """OUT held model A's fp32 + int8; exporting fp32 alone into it must not leave A's int8 beside the new fp32."""
    out = tmp_path / "out"
    shutil.copytree(exported["out"], out)
    cards = export_model(exported["model_path"], out, ExportConfig())
    assert [card.precision for card in cards] == ["fp32"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["fp32"]


def test_a_graph_whose_output_is_not_the_cards_classes_is_refused(tmp_path, monkeypatch):
    """The file says 4 classes; a backbone whose forward() gives 5 columns would pass parity (PyTorch agrees with
    itself) and ship a card that lies: export refuses it in one line, writing nothing."""
    model_path, _, _ = make_model_file(tmp_path / "model.pt")
    real_export = onnx_export.export_onnx
    monkeypatch.setattr(
        onnx_export, "export_onnx", lambda model, *args, **kwargs: real_export(create_model("resnet8", 5, 3), *args)
    )
    with pytest.raises(OkdpipeError) as error:
        export_model(model_path, tmp_path / "out", ExportConfig(quantize="none"))
    assert str(error.value) == (
        "the exported graph's output 'logits' has shape ['batch', 5] and answers a batch of 16 with shape [16, 5], "
        "but the model file says 4 classes (expected [batch, 4]); fix the backbone's forward() so that it returns one "
        "logit per class"
    )
    assert written(tmp_path / "out") == []
