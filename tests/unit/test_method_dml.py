"""DML: the mutual-KD average by hand, step() by value at T != 1, each peer learning only from its own loss, the
paper default and a short run."""

import math

import pytest
import torch
from paper_formulas import TEMPERATURE, assert_same_gradients, assert_terms, ce, kd
from test_method_one import backward_of, grad_in_every_tensor, make_ctx, make_method, no_grad_in, short_fit

from okdpipe.distill.methods import METHODS
from okdpipe.distill.methods.dml import DMLParams, mutual_kd, peer_terms
from okdpipe.distill.students import StudentOutputs

# Three peers, one sample, two classes: softmax(z1) = (3/4, 1/4), z0 and z2 uniform.
LOGITS = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]], [[0.0, 0.0]]])


def kl_from_uniform(p: float) -> float:
    """KL((p, 1-p) || (1/2, 1/2))."""
    return p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))


def test_mutual_kd_averages_over_the_other_peers():
    # Peer 0 learns from peers 1 (KL > 0) and 2 (identical: KL = 0): the mean over N - 1 = 2 halves it.
    assert mutual_kd(LOGITS[0], LOGITS, 0, 1.0).item() == pytest.approx(kl_from_uniform(0.75) / 2)
    p = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax(z1 / 2)[0]
    assert mutual_kd(LOGITS[0], LOGITS, 0, 2.0).item() == pytest.approx(4 * kl_from_uniform(p) / 2)


def test_peer_terms_are_ce_and_mutual_kd():
    terms = peer_terms(LOGITS, torch.tensor([1]), 1.0)
    assert terms["ce/s0"].item() == pytest.approx(math.log(2.0))
    assert terms["ce/s1"].item() == pytest.approx(-math.log(0.25))
    # Peer 1 learns from two uniform peers: KL(uniform || (3/4, 1/4)).
    assert terms["kd/s1"].item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))


def test_step_by_value_with_three_peers_at_a_temperature():
    """Eq. 10 for N = 3 at T = 2.5: L_i = CE_i + 1/2 sum_{j != i} KD(z_i <- z_j), teachers detached."""
    method, students = make_method("dml", layout="peers", count=3, temperature=TEMPERATURE)
    out = students(torch.randn(1, 6, 1, 28, 28, generator=torch.Generator().manual_seed(4)))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    z = out.logits
    expected = {}
    for i in range(3):
        expected[f"ce/s{i}"] = ce(z[i], labels)
        expected[f"kd/s{i}"] = sum(kd(z[i], z[j], TEMPERATURE) for j in range(3) if j != i) / 2
    losses = method.step(None, labels, out, make_ctx(20.0))
    assert_terms(losses, expected)
    assert_same_gradients(losses["loss"], sum(expected.values()), list(students.parameters()))


def test_each_peer_updates_only_from_its_own_loss():
    method, students = make_method("dml", layout="peers", count=2)
    logits = students(torch.randn(1, 4, 1, 28, 28)).logits
    terms = peer_terms(logits, torch.tensor([0, 1, 2, 3]), 1.0)
    backward_of(terms["ce/s0"] + terms["kd/s0"], students)
    assert no_grad_in(students.members[1])
    backward_of(terms["kd/s0"], students)
    assert students.members[0].classifier.weight.grad.any()  # the KD term does train peer 0
    backward_of(terms["ce/s1"] + terms["kd/s1"], students)
    own_loss_grad = [p.grad.clone() for p in students.members[1].parameters()]
    total = method.step(None, torch.tensor([0, 1, 2, 3]), StudentOutputs(logits), make_ctx())["loss"]
    backward_of(total, students)  # the sum over peers gives peer 1 exactly the gradient of its own L_1
    assert all(torch.equal(g, p.grad) for g, p in zip(own_loss_grad, students.members[1].parameters()))
    assert grad_in_every_tensor(students.members[1].classifier)


def test_dml_defaults_and_short_run(tmp_path):
    cls = METHODS.get("dml")
    assert (cls.layout, cls.default_students, cls.min_students, cls.ships) == ("peers", 2, 2, "best-student")
    assert DMLParams().temperature == 1.0  # DML Sec. 4 (the comparison papers re-run it at T = 3)
    val = short_fit("dml", tmp_path)
    assert set(val) == {"student:0", "student:1", "ensemble"}
