"""Accuracy-aware INT8 (okdpipe.export.tune): the budget, the search's order and stopping rule on a scripted
workbench, and end to end on a model whose plain INT8 loses badly (outlier activation channels), checked in a
fresh onnxruntime session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from okdpipe.contracts.card import read_card
from okdpipe.datasets import load_dataset
from okdpipe.distill.models import create_model
from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.export import tune
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import export_model
from okdpipe.export.quantize import Recipe
from okdpipe.modelfile import ModelInfo, save_model_file

# ---------------------------------------------------------------- the budget


@pytest.mark.parametrize(
    "text, trials, seconds, off",
    [("20", 20, None, False), ("120s", None, 120.0, False), ("0", 0, None, True), ("0s", None, 0.0, True)],
)
def test_budget_is_trials_or_seconds(text, trials, seconds, off):
    budget = tune.TuneBudget.parse(text)
    assert (budget.trials, budget.seconds, budget.off) == (trials, seconds, off)


@pytest.mark.parametrize("text", ["2m", "-1", "1.5", "", "s", "３０", "٣s", "²", "007", "00s", "1e3", "nan", "10 s"])
def test_a_bad_budget_is_refused_with_the_fix(text):
    with pytest.raises(OkdpipeError, match="number of trials"):
        tune.TuneBudget.parse(text)
    with pytest.raises(ValueError, match="number of trials"):
        ExportConfig(tune_budget=text)


# ---------------------------------------------------------------- the search, scripted


class ScriptedWorkbench:
    """Quantizes nothing: records the recipes asked for, in order."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.asked: list[Recipe] = []

    def quantize(self, recipe, out_path, only=None):
        self.asked.append(recipe)
        Path(out_path).write_text(json.dumps(recipe.record()))


def scripted_accuracy(path: Path) -> float:
    """Validation top-1 by recipe: only keeping both A and B in FP32 reaches FP32's 0.90; entropy gives NaN."""
    recipe = json.loads(Path(path).read_text())
    if recipe["calibration"]["method"] == "entropy":
        raise GateFailed("the int8 tuning trial gives non-finite logits (NaN or inf) for 3 of 10 images")
    kept = set(recipe["fp32_nodes"])
    if {"A", "B"} <= kept:
        return 0.90
    return 0.80 if recipe["calibration"].get("percentile") == 99.9 else 0.70


def run_scripted_search(tmp_path, monkeypatch, budget: str):
    ranking = {"nodes": [{"rank": 1, "node": "A"}, {"rank": 2, "node": "C"}, {"rank": 3, "node": "B"}]}
    measured_with = []

    def fake_analyse(workbench, recipe, *args):
        measured_with.append(recipe)
        return ranking

    monkeypatch.setattr(tune, "analyse", fake_analyse)
    workbench = ScriptedWorkbench(tmp_path)
    plain = tune.Trial(0, "plain", Recipe("minmax"), 0.70, 20.0, False, 0.0)
    tuner = tune.Int8Tuner(
        workbench, lambda path: None, scripted_accuracy, 0.90, 0.0, tune.TuneBudget.parse(budget), probe=None
    )
    return tuner.run(plain), workbench, measured_with


def test_search_order_stops_at_the_first_trial_within_the_limit(tmp_path, monkeypatch):
    outcome, workbench, measured_with = run_scripted_search(tmp_path, monkeypatch, "30")
    seen = [
        (t.phase, t.recipe.method, t.recipe.percentile, t.recipe.per_channel, t.recipe.fp32_nodes)
        for t in outcome.trials
    ]
    assert seen == [
        ("plain", "minmax", None, True, ()),
        ("calibration", "entropy", None, True, ()),
        ("calibration", "percentile", 99.999, True, ()),
        ("calibration", "percentile", 99.99, True, ()),
        ("calibration", "percentile", 99.9, True, ()),
        ("granularity", "percentile", 99.9, False, ()),
        ("fallback", "percentile", 99.9, True, ("A",)),
        ("fallback", "percentile", 99.9, True, ("A", "C")),
        ("fallback", "percentile", 99.9, True, ("A", "C", "B")),
    ]
    # the ranking is measured on the most accurate recipe found before the fallback (percentile 99.9, per-channel)
    assert measured_with == [Recipe("percentile", 99.9, True)]
    assert outcome.chosen is outcome.trials[-1] and outcome.chosen.meets and outcome.stopped == "met the limit"
    assert [t.meets for t in outcome.trials] == [False] * 8 + [True]
    # a non-finite trial is a failure, never an accuracy
    entropy = outcome.trials[1].record()
    assert entropy["val_top1"] is None and entropy["drop_points"] is None and "non-finite" in entropy["failure"]
    assert outcome.trials[4].record()["drop_points"] == pytest.approx(10.0)
    assert [r.fp32_nodes for r in workbench.asked] == [t.recipe.fp32_nodes for t in outcome.trials[1:]]


def test_a_trial_budget_bounds_the_search(tmp_path, monkeypatch):
    outcome, workbench, measured_with = run_scripted_search(tmp_path, monkeypatch, "3")
    assert outcome.chosen is None and outcome.stopped == "budget spent"
    assert len(outcome.trials) == 1 + 3 and len(workbench.asked) == 3 and measured_with == []
    assert outcome.record()["budget"] == {"trials": 3} and outcome.record()["chosen_trial"] is None


def test_a_drop_of_exactly_the_limit_meets_it(tmp_path, monkeypatch):
    """29 of 100 against FP32's 30 of 100 is a drop of exactly 1 point; (0.30 - 0.29) * 100 in floats is not."""
    assert (0.30 - 0.29) * 100.0 > 1.0  # the float trap this guards against
    workbench = ScriptedWorkbench(tmp_path)
    budget = tune.TuneBudget.parse("1")
    tuner = tune.Int8Tuner(workbench, lambda path: None, lambda path: 0.29, 0.30, 1.0, budget, probe=None)
    trial = tuner.trial(1, "calibration", Recipe("entropy"))
    assert trial.meets and trial.drop_points == 1.0


def test_the_best_trial_ties_to_the_earlier_and_skips_failures(tmp_path):
    def trial(number, top1):
        return tune.Trial(number, "calibration", Recipe("minmax"), top1, None, False, 0.0)

    tuner = tune.Int8Tuner(ScriptedWorkbench(tmp_path), None, None, 0.9, 0.0, tune.TuneBudget.parse("5"), None)
    tuner.trials = [trial(0, 0.5), trial(1, None), trial(2, 0.7), trial(3, 0.7), trial(4, 0.6)]
    assert tuner.best().number == 2
    tuner.trials = [trial(0, None), trial(1, None)]
    assert tuner.best().number == 0


def test_the_ranking_puts_the_most_sensitive_node_first():
    from okdpipe.export.sensitivity import ranked

    rows = [
        {"node": "small", "error": 0.01},
        {"node": "nan", "error": None},
        {"node": "big", "error": 0.5},
        {"node": "b-tie", "error": 0.2},
        {"node": "a-tie", "error": 0.2},
    ]
    order = [(row["rank"], row["node"]) for row in ranked(rows)]
    assert order == [(1, "nan"), (2, "big"), (3, "a-tie"), (4, "b-tie"), (5, "small")]


def test_the_relative_logit_error_by_value():
    from okdpipe.export.sensitivity import relative_error

    reference = np.array([[3.0, -4.0], [0.0, 5.0]])  # mean square (9 + 16 + 0 + 25) / 4 = 12.5
    assert relative_error(reference, reference) == 0.0
    shifted = reference + np.array([[1.0, 0.0], [0.0, -2.0]])  # mean squared error (1 + 4) / 4 = 1.25
    assert relative_error(shifted, reference) == pytest.approx(0.1)


def test_the_card_record_names_the_recipe_shipped():
    from okdpipe.export.quantize import static_record

    recipe = Recipe("percentile", 99.99, per_channel=False, fp32_nodes=("conv_a", "gemm"))
    settings = {"activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True, "reduce_range": True}
    record = static_record(recipe, 40, settings)
    assert record["fp32_nodes"] == ["conv_a", "gemm"] and record["per_channel"] is False
    assert record["calibration"] == {"method": "percentile", "percentile": 99.99, "samples": 40, "split": "train"}
    assert record["reduce_range"] is True and record["method"] == "static" and record["format"] == "QDQ"


def hand_made_qdq(path: Path) -> Path:
    """conv_q reads an int8 weight through a DequantizeLinear, conv_f a float weight; relu reads conv_f."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [
        numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "w_int8"),
        numpy_helper.from_array(np.float32(0.1), "w_scale"),
        numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w_float"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_int8", "w_scale"], ["w_dq"], name="dq"),
        helper.make_node("Conv", ["x", "w_dq"], ["a"], name="conv_q"),
        helper.make_node("Conv", ["a", "w_float"], ["b"], name="conv_f"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None, 4, 4])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [tensor("x")], [tensor("y")], initializers)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_a_claim_of_fp32_nodes_is_checked_on_the_graph(tmp_path):
    from okdpipe.export.exporter import check_fp32_claim
    from okdpipe.export.quantize import quantized_claims

    path = hand_made_qdq(tmp_path / "m.onnx")
    assert quantized_claims(path, ["conv_f", "relu"]) == []
    assert quantized_claims(path, ["conv_f", "conv_q", "ghost"]) == ["conv_q", "ghost"]
    check_fp32_claim(path, ["conv_f"], "the search kept")
    with pytest.raises(GateFailed, match="the search kept conv_q in FP32, but the int8 graph") as refused:
        check_fp32_claim(path, ["conv_q"], "the search kept")
    assert "\n" not in str(refused.value)


def test_bench_refuses_a_card_claiming_fp32_nodes_the_model_quantizes(tmp_path):
    from types import SimpleNamespace

    from okdpipe.bench.run import check_fp32_claim

    path = hand_made_qdq(tmp_path / "m.onnx")

    def card(nodes):
        return SimpleNamespace(raw={"quantization": {"fp32_nodes": nodes}}, model_path=path, directory=tmp_path)

    check_fp32_claim(card(["conv_f"]))
    check_fp32_claim(SimpleNamespace(raw={"quantization": None}, model_path=path, directory=tmp_path))
    with pytest.raises(OkdpipeError, match="node 'conv_q' runs in FP32, but the model") as refused:
        check_fp32_claim(card(["conv_f", "conv_q"]))
    assert "\n" not in str(refused.value) and str(refused.value).endswith("re-export")


# ---------------------------------------------------------------- end to end: a model plain INT8 breaks

DATA = {"dataset": "synthetic", "val_split": 0.5, "seed": 0, "options": {"n_train": 320, "n_test": 0}}
OUTLIER_SCALE = 1000.0


def insert_outlier_channels(model) -> None:
    """Scale channel 0 of each block's inner activation by OUTLIER_SCALE and its consumer's weights by the
    inverse: the FP32 function is unchanged (ReLU commutes with a positive scale), but one channel now spans a
    range a thousand times wider than the others, so a per-tensor uint8 activation zeroes all the rest."""
    with torch.no_grad():
        for stage in model.stages:
            norm, consumer = stage[0].residual[0][1], stage[0].residual[1][0]
            norm.weight[0] *= OUTLIER_SCALE
            norm.bias[0] *= OUTLIER_SCALE
            consumer.weight[:, 0] /= OUTLIER_SCALE


def normalised(images: torch.Tensor, mean, std) -> np.ndarray:
    """The card's formula, written out independently: (pixel / 255 - mean) / std per channel."""
    pixels = images.numpy().astype(np.float32) / np.float32(255.0)
    return (pixels - np.float32(mean).reshape(1, -1, 1, 1)) / np.float32(std).reshape(1, -1, 1, 1)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """A ResNet-8 trained briefly on the synthetic dataset, then given outlier channels (a MODEL.pt)."""
    bundle = load_dataset("synthetic", val_split=0.5, seed=0, **DATA["options"])
    spec = bundle.spec
    torch.manual_seed(0)
    model = create_model("resnet8", spec.num_classes, spec.in_channels)
    inputs = torch.from_numpy(normalised(bundle.train.images, spec.mean, spec.std))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model.train()(inputs), bundle.train.labels).backward()
        optimizer.step()
    model.eval()
    before = model(inputs).detach()
    insert_outlier_channels(model)
    assert torch.allclose(model(inputs).detach(), before, rtol=1e-3, atol=1e-3)  # the same function in FP32
    info = ModelInfo(
        arch="resnet8",
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        labels=spec.labels,
        dataset="synthetic",
        provenance={"data": DATA, "run_dir": "runs/x", "candidate": "student:0", "method": "dml"},
    )
    path = tmp_path_factory.mktemp("outlier") / "model.pt"
    save_model_file(model, info, path)
    return path, bundle


def fresh_top1(onnx_path: Path, bundle) -> float:
    """Validation top-1 in a plain onnxruntime session, preprocessing and argmax written out here."""
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    spec = bundle.spec
    logits = session.run(None, {"input": normalised(bundle.val.images, spec.mean, spec.std)})[0]
    assert np.isfinite(logits).all()
    return float(np.mean(logits.argmax(1) == bundle.val.labels.numpy()))


def int8_weights(onnx_path: Path) -> dict[str, bool]:
    """Conv/Gemm name -> whether its weights reach it through a DequantizeLinear (stored INT8) rather than as a
    float initializer. (A node kept in FP32 may still read an activation that is quantized for another consumer.)"""
    graph = onnx.load(str(onnx_path)).graph
    dq = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert all(n.input[1] in dq | floats for n in weighted)
    return {n.name: n.input[1] in dq for n in weighted}


@pytest.mark.slow
def test_tuning_meets_a_zero_drop_limit_by_keeping_nodes_in_fp32(outlier_model, tmp_path):
    model_path, bundle = outlier_model
    config = ExportConfig(quantize="int8", max_accuracy_drop=0.0, tune_budget="30", sensitivity_samples=64)
    export_model(model_path, tmp_path / "out", config)
    card = read_card(tmp_path / "out" / "int8")
    quantization = card.raw["quantization"]
    trials = quantization["tuning"]["trials"]
    fp32_top1 = fresh_top1(tmp_path / "out" / "fp32" / "model.onnx", bundle)
    plain = trials[0]
    assert plain["phase"] == "plain" and not plain["meets_limit"]
    assert (fp32_top1 - plain["val_top1"]) * 100 > 5.0  # the outliers really break plain INT8
    chosen = trials[quantization["tuning"]["chosen_trial"]]
    assert chosen is trials[-1] and chosen["meets_limit"] and chosen["phase"] == "fallback"
    assert not any(t["meets_limit"] for t in trials[:-1])
    assert all(0.0 <= t["val_top1"] <= 1.0 for t in trials)
    assert quantization["fp32_nodes"] == chosen["fp32_nodes"] != []
    assert quantization["calibration"]["method"] == chosen["calibration"]["method"]
    # independently: the written model, in a fresh session, meets the limit and matches the card
    int8_top1 = fresh_top1(card.model_path, bundle)
    assert int8_top1 == pytest.approx(card.raw["accuracy"]["val_top1"]) == pytest.approx(chosen["val_top1"])
    assert (fp32_top1 - int8_top1) * 100 <= 0.0
    # the nodes the card names are really FP32 in the graph, and the rest really INT8
    stored_int8 = int8_weights(card.model_path)
    kept = set(quantization["fp32_nodes"])
    assert {node for node, int8 in stored_int8.items() if not int8} == kept
    # the ranking puts the nodes touching an outlier tensor (each block's two inner convolutions) on top
    ranking = quantization["sensitivity"]["nodes"]
    assert [row["rank"] for row in ranking] == list(range(1, len(ranking) + 1))
    assert {row["op_type"] for row in ranking[:6]} == {"Conv"}
    assert ranking[0]["error"] > 10 * ranking[-1]["error"]


@pytest.mark.slow
def test_without_a_budget_or_within_too_small_a_one_the_miss_is_one_line(outlier_model, tmp_path):
    model_path, _ = outlier_model
    for budget, expected in [("0", "allow an accuracy-aware search with --tune-budget"), ("2", "at best in 3 trials")]:
        config = ExportConfig(quantize="int8", max_accuracy_drop=0.0, tune_budget=budget, sensitivity_samples=64)
        with pytest.raises(GateFailed, match="int8 loses") as failed:
            export_model(model_path, tmp_path / budget, config)
        assert expected in str(failed.value) and "\n" not in str(failed.value)
        assert failed.value.exit_code == 1
        assert not (tmp_path / budget).exists()  # nothing published: the new OUT is removed with its lock


# ---------------------------------------------------------------- the card's quantization section


def int8_fields(**quantization) -> dict:
    from test_contracts import valid_fields

    trial = {"trial": 0, "phase": "plain", "val_top1": 0.5, "drop_points": 1.0, "meets_limit": True}
    section = {
        "fp32_nodes": ["conv_a"],
        "tuning": {"trials": [trial]},
        "sensitivity": {"nodes": [{"rank": 1, "node": "conv_a"}, {"rank": 2, "node": "conv_b"}]},
    }
    return {**valid_fields(), "precision": "int8", "quantization": {**section, **quantization}}


@pytest.mark.parametrize(
    "quantization, fine",
    [
        ({}, True),
        ({"tuning": {"trials": [{"val_top1": None, "failure": "non-finite logits"}]}}, True),
        ({"tuning": {"trials": [{"val_top1": None}]}}, False),  # no accuracy and no failure
        ({"tuning": {"trials": [{"val_top1": 1.5}]}}, False),
        ({"tuning": {"trials": [{"val_top1": float("nan")}]}}, False),
        ({"tuning": {"trials": [{"val_top1": True}]}}, False),
        ({"fp32_nodes": "conv_a"}, False),
        ({"fp32_nodes": [""]}, False),
        ({"sensitivity": {"nodes": [{"rank": 2, "node": "a"}, {"rank": 1, "node": "b"}]}}, False),
    ],
)
def test_the_card_checks_the_quantization_section(tmp_path, quantization, fine):
    from okdpipe.contracts.card import write_card

    (tmp_path / "model.onnx").write_bytes(b"onnx")
    if fine:
        assert write_card(tmp_path, int8_fields(**quantization)).raw["quantization"]["fp32_nodes"] is not None
        return
    with pytest.raises(OkdpipeError, match="quantization") as error:
        write_card(tmp_path, int8_fields(**quantization))
    assert "\n" not in str(error.value) and not (tmp_path / "model.json").exists()
