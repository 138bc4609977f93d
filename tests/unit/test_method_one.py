"""ONE: the gate's formula (BN with real statistics), the gated teacher, step() by value below the ramp's end,
what is detached, the paper defaults and a short run.

Also holds the small helpers the other method tests import (`from test_method_one import ...`)."""

import math

import pytest
import torch
from paper_formulas import EPOCH, TEMPERATURE, TOTAL_EPOCHS, assert_step, batch_norm_train, gated_ensemble_terms

from okdpipe.config import DistillConfig
from okdpipe.distill.methods import METHODS, StepContext
from okdpipe.distill.methods.one import (
    BranchGate,
    EnsembleKDParams,
    ensemble_kd_terms,
    kd_weight,
    trunk_channels,
    weighted_ensemble,
)
from okdpipe.distill.students import Students
from okdpipe.distill.trainer import fit
from okdpipe.run import RunDir


def make_ctx(epoch: float = 0.0, total_epochs: int = 300, step: int = 0) -> StepContext:
    return StepContext(epoch, step, total_epochs, 10, torch.Generator().manual_seed(0))


def make_method(name: str, layout: str = "branches", count: int = 3, **params):
    """A method on fresh resnet8 students (5 classes, 1 channel, seed 0)."""
    torch.manual_seed(0)
    students = Students("resnet8", count, num_classes=5, in_channels=1, layout=layout)
    method_cls = METHODS.get(name)
    return method_cls(students, method_cls.Params(**params), 5), students


def backward_of(loss: torch.Tensor, *modules) -> None:
    for module in modules:
        module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)


def no_grad_in(module) -> bool:
    return all(p.grad is None or not p.grad.any() for p in module.parameters())


def grad_in_every_tensor(module) -> bool:
    return all(p.grad is not None and p.grad.any() for p in module.parameters())


def short_fit(method: str, tmp_path) -> dict:
    """Two epochs of resnet8 on synthetic data: the final validation metrics, by model name."""
    cfg = DistillConfig(method=method, arch="resnet8", dataset="synthetic", epochs=2, batch_size=16, val_split=0.25)
    result = fit(cfg, RunDir(tmp_path / "r"), echo=lambda _: None)
    assert all(math.isfinite(v["loss"]) for v in result["val"].values())
    return result["val"]


def gate_with_statistics(gate: BranchGate | None = None) -> BranchGate:
    """A 3-branch gate whose BatchNorm is far from the identity: affine and running statistics non-trivial."""
    gate = gate or BranchGate(4, 3)
    with torch.no_grad():
        gate.norm.weight.copy_(torch.tensor([0.5, 2.0, 1.5]))
        gate.norm.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        gate.norm.running_mean.copy_(torch.tensor([0.4, -0.6, 0.2]))
        gate.norm.running_var.copy_(torch.tensor([2.0, 0.5, 3.0]))
    return gate


def test_gate_is_linear_bn_relu_softmax_in_eval_mode():
    gate = gate_with_statistics().eval()
    trunk = torch.randn(2, 4, 5, 5)
    h = trunk.mean(dim=(2, 3)) @ gate.linear.weight.T + gate.linear.bias
    norm = gate.norm
    normalised = (h - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(gate(trunk), torch.softmax(torch.relu(normalised), dim=1))


def test_gate_uses_batch_statistics_in_train_mode():
    gate = gate_with_statistics().train()
    trunk = torch.randn(6, 4, 5, 5)
    h = trunk.mean(dim=(2, 3)) @ gate.linear.weight.T + gate.linear.bias
    torch.testing.assert_close(gate(trunk), torch.softmax(torch.relu(batch_norm_train(h, gate.norm)), dim=1))


def test_gate_reads_the_trunk_width():
    method, students = make_method("one")
    assert trunk_channels(students) == 32  # resnet8 stages: 16, 32, 64; the trunk ends after the second
    assert method.gate.linear.in_features == 32 and method.gate.linear.out_features == 3


def test_weighted_ensemble_is_per_sample():
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    logits = torch.tensor([[[4.0, 0.0], [1.0, 2.0]], [[0.0, 8.0], [5.0, 5.0]]])  # [N=2, B=2, K=2]
    torch.testing.assert_close(weighted_ensemble(weights, logits), torch.tensor([[1.0, 6.0], [1.0, 2.0]]))


def test_ensemble_kd_terms_hand_computed():
    logits = torch.zeros(2, 1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    terms = ensemble_kd_terms(logits, teacher, torch.tensor([0]), temperature=3.0, weight=0.5)
    p = 3 ** (1 / 3) / (3 ** (1 / 3) + 1)  # softmax(teacher / 3)[0]
    kd = 9 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))  # T^2 KL(p || uniform)
    assert set(terms) == {"ce/s0", "ce/s1", "ce/ensemble", "kd/s0", "kd/s1"}
    assert terms["ce/s0"].item() == pytest.approx(math.log(2.0))
    assert terms["ce/ensemble"].item() == pytest.approx(-math.log(0.75))
    assert terms["kd/s1"].item() == pytest.approx(0.5 * kd)


def test_ramp_reaches_one_at_80_of_300_epochs():
    assert kd_weight(make_ctx(0.0), 80 / 300) == pytest.approx(math.exp(-5.0))
    assert kd_weight(make_ctx(80.0), 80 / 300) == pytest.approx(1.0)
    assert kd_weight(make_ctx(200.0), 80 / 300) == 1.0
    assert kd_weight(make_ctx(0.0), 0.0) == 1.0


def test_kd_sends_no_gradient_to_the_gate_but_ce_of_the_ensemble_trains_everything():
    method, students = make_method("one")
    out = students(torch.randn(1, 4, 1, 28, 28))
    losses = method.step(None, torch.tensor([0, 1, 2, 3]), out, make_ctx(80.0))
    terms = ensemble_kd_terms(out.logits, method.ensemble_logits(out), torch.tensor([0, 1, 2, 3]), 3.0, 1.0)
    backward_of(sum(terms[f"kd/s{j}"] for j in range(3)), method, students)
    assert no_grad_in(method.gate)
    assert all(grad_in_every_tensor(branch["classifier"]) for branch in students.branches)
    backward_of(terms["ce/ensemble"], method, students)
    assert grad_in_every_tensor(method.gate.linear)
    assert students.trunk["stem"][0].weight.grad.any()
    assert all(grad_in_every_tensor(branch["classifier"]) for branch in students.branches)
    assert losses["loss"].item() == pytest.approx(sum(terms.values()).item(), rel=1e-6)


LABELS6 = torch.tensor([0, 1, 2, 3, 4, 0])


def test_step_by_value_below_the_ramp_end():
    """Eq. 5 term by term at epoch 5 of 60 (w ~ 0.09), T = 2.5, the gate in train mode with a non-identity
    BN; and the gradient of the whole loss equals the gradient of the terms with the teacher detached in KD."""
    method, students = make_method("one", temperature=TEMPERATURE)
    gate_with_statistics(method.gate)
    students.train(), method.train()
    views = torch.randn(1, 6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    out = students(views)
    gate = method.gate
    h = out.trunk[0].mean(dim=(2, 3)) @ gate.linear.weight.T + gate.linear.bias
    g = torch.softmax(torch.relu(batch_norm_train(h, gate.norm)), dim=1)
    losses = method.step(views, LABELS6, out, make_ctx(EPOCH, TOTAL_EPOCHS))
    assert_step(losses, gated_ensemble_terms(out.logits, g, LABELS6), [*students.parameters(), *method.parameters()])


def test_one_defaults_and_short_run(tmp_path):
    cls = METHODS.get("one")
    assert (cls.layout, cls.default_students, cls.min_students, cls.ships) == ("branches", 3, 2, "student:0")
    defaults = EnsembleKDParams()  # ONE Sec. 4: T = 3, KD ramped up over the first 80 of 300 epochs
    assert (defaults.temperature, defaults.ramp_fraction) == (3.0, 80 / 300)
    val = short_fit("one", tmp_path)
    assert set(val) == {"student:0", "student:1", "student:2", "ensemble"}
