"""`okdpipe select --precision int8`: every candidate quantized and scored on validation, the best INT8 one
shipped (ties to the smaller), both precisions recorded; the INT8 figure checked against an independent export
scored in a fresh onnxruntime session."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
from torch import nn

from okdpipe.config import DistillConfig
from okdpipe.datasets import load_dataset
from okdpipe.distill.select import Scored, choose, select
from okdpipe.distill.trainer import fit
from okdpipe.errors import GateFailed
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import export_model
from okdpipe.run import RunDir

CFG = dict(arch="resnet8", dataset="synthetic", epochs=1, batch_size=8, lr=0.05, val_split=0.25)


def shipped(top1: float) -> dict:
    return {"precision": "int8", "val_top1": top1}


def test_the_choice_ranks_int8_and_ties_go_to_the_smaller():
    small, big = nn.Linear(2, 2), nn.Linear(20, 2)
    scored = [
        Scored("student:0", big, 0.95, 1.0, 42, 0, shipped=shipped(0.60)),  # best in fp32, worst in int8
        Scored("student:1", big, 0.90, 1.0, 42, 0, shipped=shipped(0.85)),
        Scored("student:2", small, 0.80, 1.0, 6, 0, shipped=shipped(0.85)),
    ]
    assert choose(scored, "auto", "best-student").name == "student:2"
    for candidate in scored:
        candidate.shipped = None
    assert choose(scored, "auto", "best-student").name == "student:0"


@pytest.mark.parametrize("calib_size", [10, 1000])
def test_selection_records_the_images_int8_was_calibrated_on(calib_size):
    """--calib-size is an upper bound: the synthetic split has 48 training images, so 1000 calibrates on 48."""
    from types import SimpleNamespace

    from okdpipe.distill.models import create_model
    from okdpipe.export.select_int8 import Int8Precision

    bundle = load_dataset("synthetic", val_split=0.25, seed=0)
    precision = Int8Precision(ExportConfig(calib_size=calib_size))
    figures = precision.score(create_model("resnet8", 4, 3).eval(), SimpleNamespace(bundle=bundle))
    assert 0.0 <= figures["val_top1"] <= 1.0 and figures["val_samples"] == len(bundle.val) == 16
    assert precision.settings()["calibration"]["samples"] == min(calib_size, len(bundle.train)) == min(calib_size, 48)


@pytest.fixture(scope="module")
def two_students(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "dml"
    fit(DistillConfig(method="dml", students=2, **CFG), RunDir(root), echo=lambda _: None)
    return root


def fresh_int8_top1(onnx_path, val) -> float:
    """Validation top-1 of an exported model in a plain onnxruntime session, preprocessing written out here."""
    card = json.loads((onnx_path.parent / "model.json").read_text())["preprocess"]
    mean = np.float32(card["mean"]).reshape(1, -1, 1, 1)
    std = np.float32(card["std"]).reshape(1, -1, 1, 1)
    inputs = (val.images.numpy().astype(np.float32) * np.float32(card["scale"]) - mean) / std
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": inputs})[0]
    return float(np.mean(logits.argmax(1) == val.labels.numpy()))


@pytest.mark.slow
@pytest.mark.timeout(900)  # each candidate is exported, calibrated and scored: minutes on a loaded 2-core box
def test_select_int8_from_the_cli_ships_the_best_int8_candidate(two_students, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "okdpipe", "select", str(two_students), "--precision", "int8", "--bn-batches", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    selection = json.loads((two_students / "selection.json").read_text())
    assert selection["precision"] == "int8" and selection["int8"]["calibration"]["method"] == "minmax"
    rows = selection["candidates"]
    assert [r["candidate"] for r in rows] == ["student:0", "student:1", "soup"]
    for row in rows:
        assert row["fp32"]["val_top1"] == row["val_top1"] and 0 <= row["int8"]["val_top1"] <= 1
        assert row["int8"]["drop_points"] == pytest.approx((row["val_top1"] - row["int8"]["val_top1"]) * 100)
    best = min(rows, key=lambda r: (-r["int8"]["val_top1"], r["params"], r["candidate"]))
    assert selection["chosen"] == best["candidate"] and [r["chosen"] for r in rows].count(True) == 1
    assert f"int8 {best['int8']['val_top1']:.2%}" in done.stdout
    # independently: export the shipped file at plain INT8 and score it in a fresh session
    config = ExportConfig(quantize="int8", max_accuracy_drop=100.0, tune_budget="0", sensitivity_samples=16)
    export_model(two_students / "model.pt", tmp_path / "export", config)
    val = load_dataset("synthetic", val_split=0.25, seed=0).val
    assert fresh_int8_top1(tmp_path / "export" / "int8" / "model.onnx", val) == pytest.approx(
        best["int8"]["val_top1"], abs=1e-12
    )


class BrokenForStudentZero:
    """An INT8 scorer whose student:0 answers NaN: that candidate must be refused, never ranked."""

    name = "int8"

    def settings(self):
        return {"recipe": "test"}

    def score(self, model, session):
        if model is session.first:
            raise GateFailed("the int8 model of a candidate gives non-finite logits (NaN or inf)")
        return {"val_top1": 0.5, "val_top5": 1.0, "val_samples": 1}


def test_a_candidate_with_non_finite_int8_logits_is_refused(two_students, monkeypatch, tmp_path):
    precision = BrokenForStudentZero()
    from okdpipe.distill import select as select_module

    original = select_module.Selection.score

    def remember_first(session, name, candidate):
        scored = original(session, name, candidate)
        if name == "student:0":
            session.first = scored.model
        return scored

    monkeypatch.setattr(select_module.Selection, "score", remember_first)
    rows, _, chosen, _ = select(two_students, "auto", tmp_path / "m.pt", 2, precision=precision)
    selection = json.loads((two_students / "selection.json").read_text())
    assert [r["candidate"] for r in rows] == ["student:1", "soup"]
    assert selection["refused"] == [
        {"candidate": "student:0", "reason": "int8: the int8 model of a candidate gives non-finite logits (NaN or inf)"}
    ]
    assert chosen.name != "student:0" and chosen.shipped["val_top1"] == 0.5
