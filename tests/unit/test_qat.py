"""Distillation-aware QAT (export/fakequant.py, export/qdq.py, export/qat.py): every number checked against an
independent computation in the test, on ResNet-8 and the synthetic dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from okdpipe.cli import app
from okdpipe.config import DistillConfig
from okdpipe.distill.models import create_model
from okdpipe.distill.select import select
from okdpipe.distill.trainer import fit
from okdpipe.export import fakequant, qat, qdq
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import export_context, export_model
from okdpipe.ortsession import create_session
from okdpipe.run import RunDir

RUN = dict(arch="resnet8", dataset="synthetic", epochs=1, batch_size=16, lr=0.05, val_split=0.25)
QAT = dict(quantize="int8", qat_epochs=1, qat_batch_size=16, max_accuracy_drop=100.0, calib_size=32)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A DML run of two ResNet-8 peers and the model file select writes from it (its provenance names the run)."""
    root = tmp_path_factory.mktemp("qat")
    fit(DistillConfig(method="dml", **RUN), RunDir(root / "run"), echo=lambda _: None)
    return select(root / "run", "student:0", root / "model.pt", bn_batches=2)[3]


def shaken_resnet8(seed: int = 0) -> torch.nn.Module:
    """ResNet-8 (3x16x16, 4 classes) whose BatchNorm statistics and affine terms are far from the identity."""
    torch.manual_seed(seed)
    model = create_model("resnet8", 4, 3)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def calibrated(model, reduce_range=False, seed=1):
    network = fakequant.prepare(model, {"reduce_range": reduce_range})
    generator = torch.Generator().manual_seed(seed)
    return fakequant.calibrate(network, [torch.randn(16, 3, 16, 16, generator=generator) for _ in range(4)])


@pytest.mark.parametrize("reduce_range, qmax", [(False, 127), (True, 64)])
def test_weight_fake_quant_is_per_channel_symmetric_rounding(reduce_range, qmax):
    network = calibrated(shaken_resnet8(), reduce_range)
    layer = fakequant.quant_layers(network)[1]
    w = layer.layer.weight.detach().numpy().astype(np.float64)
    scale = np.abs(w).reshape(len(w), -1).max(axis=1) / qmax  # ORT: max|w_c| / qmax, [-127, 127] or [-64, 64]
    expected = np.clip(np.round(w / scale[:, None, None, None]), -qmax, qmax) * scale[:, None, None, None]
    actual = fakequant.fake_quant_weight(layer.layer.weight, layer.weight_scale()).detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-7)
    levels = np.round(actual / scale[:, None, None, None])
    assert np.abs(levels).max() == qmax  # the largest weight of each channel sits on the end of the range


def test_batchnorm_folding_preserves_eval_outputs():
    model = shaken_resnet8()
    network = fakequant.prepare(model, {"reduce_range": False})  # observing: the float network
    assert not [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = model(x), network(x)
    assert float((expected - actual).abs().max()) < 1e-5 * float(expected.abs().max())


def test_activation_scale_is_ort_asymmetric_uint8_of_the_ema_range():
    quant = fakequant.ActivationQuant()
    quant(torch.tensor([-1.0, 2.0]))
    quant(torch.tensor([0.5, 4.0]))  # EMA 0.1: low -1 + 0.1 (0.5 + 1) = -0.85, high 2 + 0.1 (4 - 2) = 2.2
    quant.freeze()
    scale = (2.2 + 0.85) / 255
    assert math.isclose(float(quant.scale), scale, rel_tol=1e-6)
    assert int(quant.zero_point) == round(0.85 / scale)
    x = torch.tensor([-0.85, 0.0, 1.0, 5.0])
    q = np.clip(np.round(x.numpy() / scale) + round(0.85 / scale), 0, 255)
    np.testing.assert_allclose(quant(x).numpy(), (q - round(0.85 / scale)) * scale, atol=1e-6)


@pytest.mark.parametrize("observed, scale, zero_point", [([0.5, 2.0], 2.0 / 255, 0), ([-3.0, -1.0], 3.0 / 255, 255)])
def test_the_activation_range_always_holds_zero(observed, scale, zero_point):
    """ORT widens a calibrated range to hold 0 (a ReLU output, a padded zero): [0.5, 2] quantizes as [0, 2]."""
    quant = fakequant.ActivationQuant()
    quant(torch.tensor(observed))
    quant.freeze()
    assert math.isclose(float(quant.scale), scale, rel_tol=1e-6) and int(quant.zero_point) == zero_point
    assert float(quant(torch.tensor([0.0]))) == 0.0  # zero is exactly representable


def test_the_zero_point_is_rounded_to_the_nearest_level():
    """[-0.3, 1.0]: scale 1.3 / 255, zero point round(0.3 / scale) = round(58.85) = 59 (ORT rounds), not 58."""
    quant = fakequant.ActivationQuant()
    quant(torch.tensor([-0.3, 1.0]))
    quant.freeze()
    assert 0.3 / (1.3 / 255) == pytest.approx(58.846, abs=1e-3) and int(quant.zero_point) == 59


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point, low: int, high: int) -> torch.Tensor:
    """(clamp(round(x / s) + z, low, high) - z) s, written out (scale per channel along dim 0 when a vector)."""
    if scale.ndim:
        scale = scale.reshape(-1, *[1] * (x.ndim - 1))
    return (torch.clamp(torch.round(x / scale) + zero_point, low, high) - zero_point) * scale


def test_a_quantized_layer_computes_the_integer_scheme():
    """The first conv (BatchNorm folded): uint8 input, int8 per-channel weights, int32 bias on s_in * s_w, its
    ReLU, then uint8 output, each step written out here."""
    network = calibrated(shaken_resnet8()).eval()
    layer = fakequant.quant_layers(network)[0]
    conv = layer.layer
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        s_in, z_in = layer.input_quant.scale, layer.input_quant.zero_point
        s_w = conv.weight.abs().flatten(1).amax(1) / 127
        weight = fake_quant(conv.weight, s_w, 0, -127, 127)
        bias = torch.round(conv.bias / (s_in * s_w)) * (s_in * s_w)
        y = torch.nn.functional.conv2d(
            fake_quant(x, s_in, z_in, 0, 255), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        y = y if layer.activation is None else layer.activation(y)
        expected = fake_quant(y, layer.output_quant.scale, layer.output_quant.zero_point, 0, 255)
        actual = layer(x)
    off = (actual - expected).abs() > 1e-6
    assert float(off.float().mean()) < 1e-3  # a value a float ulp from a rounding tie may land on its neighbour
    assert float((actual - expected).abs().max()) <= float(layer.output_quant.scale) * 1.001


def test_an_absorbed_relu_comes_before_the_output_is_observed_and_quantized():
    """ORT fuses Conv+Relu and quantizes the ReLU's output: each layer with an absorbed ReLU calibrated its output
    range on values >= 0 (zero point 0), spending no uint8 level on negatives the ReLU removes. (Quantizing before
    the ReLU gives the same outputs on the grid, so only the calibrated range tells the two apart.)"""
    network = calibrated(shaken_resnet8()).eval()
    with_relu = [layer for layer in fakequant.quant_layers(network) if layer.activation is not None]
    assert with_relu
    for layer in with_relu:
        assert float(layer.output_quant.low) >= 0 and int(layer.output_quant.zero_point) == 0


def test_the_qat_learning_rate_is_a_cosine_to_zero():
    assert qat.cosine_lr(1e-3, 0, 10) == pytest.approx(1e-3)
    assert qat.cosine_lr(1e-3, 5, 10) == pytest.approx(5e-4)
    assert qat.cosine_lr(1e-3, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert qat.cosine_lr(1e-3, 2, 10) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 0.2)) / 2)


def test_the_resume_key_covers_the_teacher_and_every_qat_option(tmp_path):
    from types import SimpleNamespace

    (tmp_path / "m.pt").write_bytes(b"model")

    def key(**options):
        config = ExportConfig(**{**QAT, **options})
        ctx = SimpleNamespace(config=config, model_path=tmp_path / "m.pt", source=SimpleNamespace(as_record=dict))
        return qat.work_key(ctx, {"reduce_range": False})

    base = key()
    assert key() == base
    changed = [{"qat_teacher": "labels"}, {"qat_alpha": 0.5}, {"qat_epochs": 2}, {"qat_lr": 0.01}, {"calib_size": 64}]
    assert len({base, *(key(**option) for option in changed)}) == 1 + len(changed)


class TwoPeers(torch.nn.Module):
    """A stand-in for a run's students: peer 0 answers the first 4 pixels as logits, peer 1 their negation."""

    count = 2

    def forward(self, views):
        from types import SimpleNamespace

        logits = views[0].flatten(1)[:, :4]
        return SimpleNamespace(logits=torch.stack([logits, -logits]))


@pytest.mark.parametrize("teacher", ["ensemble", "labels"])
def test_the_fine_tune_learns_from_the_peer_ensemble_unless_told_labels(teacher, tmp_path, monkeypatch):
    from types import SimpleNamespace

    taught = {}
    monkeypatch.setattr(qat, "fine_tune", lambda network, ctx, teacher, work: taught.update(by=teacher) or [])
    monkeypatch.setattr(qdq, "export_qdq", lambda *args: 18)
    (tmp_path / "m.pt").write_bytes(b"model")
    ctx = SimpleNamespace(
        config=ExportConfig(**QAT, qat_teacher=teacher, qat_temperature=2.0),
        model=create_model("resnet8", 4, 3),
        peers=TwoPeers() if teacher == "ensemble" else None,
        info=SimpleNamespace(in_channels=3, input_size=(16, 16)),
        model_path=tmp_path / "m.pt",
        source=SimpleNamespace(as_record=dict),
        out_dir=tmp_path,
        train=range(10),
    )
    record = qat.quantization_aware_int8(ctx, tmp_path / "m.onnx").record
    assert record["teacher"] == teacher and record["teacher_students"] == (2 if teacher == "ensemble" else 0)
    if teacher == "labels":
        assert taught["by"] is None and record["alpha"] == 0.0
        return
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    z = x.flatten(1)[:, :4].double().numpy() / 2.0
    averaged = (np.exp(z) / np.exp(z).sum(1, keepdims=True) + np.exp(-z) / np.exp(-z).sum(1, keepdims=True)) / 2
    np.testing.assert_allclose(taught["by"](x).numpy(), 2.0 * np.log(averaged), rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_weight_through_fake_quantization():
    network = calibrated(shaken_resnet8()).train()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.nn.functional.cross_entropy(network(x), torch.arange(8) % 4).backward()
    for layer in fakequant.quant_layers(network):
        grad = layer.layer.weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_distillation_loss_value_at_fixed_logits():
    generator = torch.Generator().manual_seed(5)
    student, peers = torch.randn(4, 5, generator=generator), torch.randn(3, 4, 5, generator=generator)
    labels, alpha, temperature = torch.tensor([0, 2, 4, 1]), 0.7, 3.0
    z, p = student.double().numpy(), peers.double().numpy()

    def softmax(a):
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    ce = -np.mean(np.log(softmax(z))[np.arange(4), labels.numpy()])
    teacher = softmax(p / temperature).mean(0)  # averaged peer distribution at T
    kl = np.sum(teacher * (np.log(teacher) - np.log(softmax(z / temperature)))) / 4
    expected = (1 - alpha) * ce + alpha * temperature**2 * kl
    teacher_logits = qat.peer_teacher_logits(peers, temperature)
    actual = qat.qat_loss(student, labels, teacher_logits, alpha, temperature)
    assert math.isclose(float(actual), expected, rel_tol=1e-5)
    assert math.isclose(float(qat.qat_loss(student, labels, None, alpha, temperature)), ce, rel_tol=1e-5)


def test_qdq_onnx_matches_the_fake_quantized_network(tmp_path):
    network = calibrated(shaken_resnet8()).eval()
    path = tmp_path / "qat.onnx"
    qdq.export_qdq(network, (3, 16, 16), path, ExportConfig().opset)
    graph = onnx.load(str(path)).graph
    types = {i.name: numpy_helper.to_array(i).dtype for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(types.get(producer_input(graph, n.input[1])) == np.int8 for n in convs)
    assert all(types.get(producer_input(graph, n.input[2])) == np.int32 for n in convs)
    first, conv = fakequant.quant_layers(network)[0], convs[0]
    w_scale = first.layer.weight.detach().abs().flatten(1).amax(1).numpy() / 127
    bias_scale = float(first.input_quant.scale) * w_scale  # ORT's int32 bias grid: s_in * s_w
    bias_dq = next(n for n in graph.node if n.output[0] == conv.input[2])
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    np.testing.assert_allclose(stored[bias_dq.input[1]], bias_scale, rtol=1e-6)
    expected_bias = np.round(first.layer.bias.detach().numpy() / bias_scale)
    np.testing.assert_array_equal(stored[bias_dq.input[0]], expected_bias.astype(np.int32))
    w = first.layer.weight.detach().numpy()  # int8 weights: round half to even of w / s_w, as ORT stores them
    np.testing.assert_array_equal(
        stored[producer_input(graph, conv.input[1])], np.rint(w / w_scale[:, None, None, None])
    )
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = network(x).numpy()
    actual = create_session(path)[0].run(None, {"input": x.numpy()})[0]
    assert np.abs(actual - expected).max() <= qat.QAT_TOLERANCE * max(1.0, np.abs(expected).max())
    assert (actual.argmax(1) == expected.argmax(1)).mean() >= 0.9


def producer_input(graph, name):
    """The tensor a DequantizeLinear producing `name` reads (its integer initializer)."""
    return next(n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)


def fine_tuned_state(model_file, work, config, interrupt_after=None, monkeypatch=None):
    ctx = export_context(model_file, config)
    network = fakequant.prepare(ctx.model, {"reduce_range": False})
    if interrupt_after is not None:
        saved = qat.save_checkpoint

        def save_then_stop(*args):
            saved(*args)
            if len(args[-1]) == interrupt_after:
                raise KeyboardInterrupt

        monkeypatch.setattr(qat, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            qat.fine_tune(network, ctx, None, work)
        monkeypatch.undo()
        network = fakequant.prepare(ctx.model, {"reduce_range": False})
    history = qat.fine_tune(network, ctx, None, work)
    return network.state_dict(), history


def test_resumed_fine_tune_reaches_the_same_weights_bit_for_bit(model_file, tmp_path, monkeypatch):
    config = ExportConfig(**{**QAT, "qat_epochs": 2, "qat_teacher": "labels"})
    straight, straight_history = fine_tuned_state(model_file, tmp_path / "a", config)
    resumed, resumed_history = fine_tuned_state(model_file, tmp_path / "b", config, 1, monkeypatch)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert straight_history == resumed_history and len(straight_history) == 2


def test_export_ships_qat_int8_and_the_teacher_changes_the_weights(model_file, tmp_path):
    weights = {}
    for teacher in ("ensemble", "labels"):
        out = tmp_path / teacher
        cards = export_model(model_file, out, ExportConfig(**QAT, qat_teacher=teacher))
        card = json.loads((out / "int8" / "model.json").read_text())
        section = card["quantization"]
        assert [c.precision for c in cards] == ["fp32", "int8"] and section["method"] == "qat"
        assert section["teacher"] == teacher and len(section["history"]) == 1
        assert card["parity"]["reference"] == "pytorch-fake-quant" and card["parity"]["tolerance"] == 5e-2
        outcome = section["outcome"]
        assert (
            outcome["val_top1"] == card["accuracy"]["val_top1"]
            and outcome["max_abs_diff"] == card["parity"]["max_abs_diff"]
        )
        assert math.isclose(outcome["drop_points"], (card["accuracy"]["fp32_val_top1"] - outcome["val_top1"]) * 100)
        assert not list(out.glob(".qat-*"))  # published: nothing left to resume
        graph = onnx.load(str(out / "int8" / "model.onnx")).graph
        weights[teacher] = [numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert any(not np.array_equal(a, b) for a, b in zip(weights["ensemble"], weights["labels"]))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--qat-epochs", "1"], "needs --quantize int8"),
        (["--quantize", "fp16", "--qat-epochs", "2"], "needs --quantize int8"),
        (["--quantize", "int8", "--qat-epochs", "-1"], "--qat-epochs -1"),
        (["--quantize", "int8", "--qat-epochs", "1", "--qat-lr", "0"], "--qat-lr 0"),
        (["--quantize", "int8", "--qat-epochs", "1", "--qat-alpha", "1.5"], "--qat-alpha 1.5"),
        (["--quantize", "int8", "--qat-epochs", "1", "--calib-method", "entropy"], "plain int8's --calib-method would"),
        (
            ["--quantize", "int8", "--qat-epochs", "2", "--tune-budget", "0", "--sensitivity-samples", "64"],
            "plain int8's --tune-budget, --sensitivity-samples would be ignored: --qat-epochs replaces plain int8",
        ),
    ],
)
def test_bad_qat_options_are_one_line_before_out_is_touched(model_file, tmp_path, flags, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(model_file), "--out", str(out), *flags])
    assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output
    assert result.output.strip().count("\n") == 0 and not out.exists()


def test_ensemble_teacher_without_its_run_names_the_labels_fix(tmp_path):
    from okdpipe.modelfile import ModelInfo, save_model_file

    data = {"dataset": "synthetic", "val_split": 0.25, "seed": 0}
    info = ModelInfo("resnet8", 4, 3, (16, 16), (0.5,) * 3, (0.25,) * 3, tuple("abcd"), "synthetic")
    info.provenance = {"data": data, "run_dir": str(tmp_path / "gone")}
    save_model_file(create_model("resnet8", 4, 3), info, tmp_path / "m.pt")
    out = tmp_path / "out"
    out.mkdir()
    flags = ["--out", str(out), "--quantize", "int8", "--qat-epochs", "1"]
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.pt"), *flags])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "--qat-teacher labels" in result.output
    assert result.output.strip().count("\n") == 0 and list(out.iterdir()) == []  # refused before OUT is locked


def test_an_unfinished_teacher_run_is_refused_before_out_naming_the_labels_fix(tmp_path):
    from okdpipe.errors import OkdpipeError
    from okdpipe.modelfile import ModelInfo, save_model_file

    run = tmp_path / "run"
    run.mkdir()
    unfinished = {"manifest_version": 1, "stage": "distill", "config": {}, "status": "running"}
    (run / "manifest.json").write_text(json.dumps(unfinished))
    info = ModelInfo("resnet8", 4, 3, (16, 16), (0.5,) * 3, (0.25,) * 3, tuple("abcd"), "synthetic")
    info.provenance = {"data": {"dataset": "synthetic", "val_split": 0.25, "seed": 0}, "run_dir": str(run)}
    save_model_file(create_model("resnet8", 4, 3), info, tmp_path / "m.pt")
    with pytest.raises(OkdpipeError, match="training did not finish") as refused:
        export_context(tmp_path / "m.pt", ExportConfig(**QAT))
    message = str(refused.value)
    assert message.endswith("or use --qat-teacher labels (fine-tune on the labels alone)") and "\n" not in message
    assert refused.value.exit_code == 2


def test_interrupted_export_keeps_only_its_qat_work_and_resumes_from_it(model_file, tmp_path, monkeypatch):
    config, out, saved = ExportConfig(**{**QAT, "qat_epochs": 2, "qat_teacher": "labels"}), tmp_path / "new", []

    def save_once_then_stop(*args):
        saved.append(len(args[-1]))
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed at the end of epoch 2, before its checkpoint
        save(*args)

    save = qat.save_checkpoint
    monkeypatch.setattr(qat, "save_checkpoint", save_once_then_stop)
    with pytest.raises(KeyboardInterrupt):
        export_model(model_file, out, config)
    (work,) = out.glob(".qat-*")
    assert sorted(p.name for p in out.iterdir() if p.name != ".export.lock") == [work.name]
    assert [p.name for p in work.iterdir()] == ["last.pt"]
    saved.clear()
    monkeypatch.setattr(qat, "save_checkpoint", lambda *args: (saved.append(len(args[-1])), save(*args)))
    export_model(model_file, out, config)
    assert saved == [2]  # only epoch 2 trained again
    assert len(json.loads((out / "int8" / "model.json").read_text())["quantization"]["history"]) == 2
    assert not list(out.glob(".qat-*"))
