"""DML: the mutual-KD average by hand, each peer learning only from its own loss, and a short run."""

import math

import pytest
import torch

from okdpipe.distill.methods import METHODS
from okdpipe.distill.methods.dml import DMLParams, mutual_kd, peer_terms
from okdpipe.distill.students import StudentOutputs

from test_method_one import backward_of, grad_in_every_tensor, make_ctx, make_method, no_grad_in, short_fit

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
    assert DMLParams().temperature == 1.0
    val = short_fit("dml", tmp_path)
    assert set(val) == {"student:0", "student:1", "ensemble"}
