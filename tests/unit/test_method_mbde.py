"""MBDE (our reading): L_cd on hand-made matrices, the FFM's attention and gradient path, step() by value below the
ramp's end, the defaults and a short run."""

import math

import pytest
import torch
import torch.nn.functional as F
from paper_formulas import EPOCH, TEMPERATURE, TOTAL_EPOCHS, assert_step, batch_norm_train, gated_ensemble_terms
from test_method_one import backward_of, grad_in_every_tensor, make_ctx, make_method, no_grad_in, short_fit

from okdpipe.distill.methods import METHODS
from okdpipe.distill.methods.mbde import FeatureFusion, MBDEParams, classifier_similarity
from okdpipe.distill.methods.one import ensemble_kd_terms

LABELS = torch.tensor([0, 1, 2, 3])
ALONG_X = torch.tensor([[2.0, 0.0], [3.0, 0.0], [5.0, 0.0]])  # 3 classes, every row along e1 after normalising
ALONG_Y = torch.tensor([[0.0, 1.0], [0.0, 4.0], [0.0, 0.5]])


def test_classifier_similarity_on_hand_made_matrices():
    # Identical directions: W_i W_j^T is the 3x3 all-ones matrix, ||.||_F^2 = 9, / 3 classes = 3.
    assert classifier_similarity([ALONG_X, ALONG_X]).item() == pytest.approx(3.0)
    assert classifier_similarity([ALONG_X, ALONG_Y]).item() == 0.0
    # Pairs (x, x), (x, y), (x, y): mean of 3, 0, 0.
    assert classifier_similarity([ALONG_X, ALONG_X, ALONG_Y]).item() == pytest.approx(1.0)
    # Orthonormal rows: W W^T = I, ||I||_F^2 / 3 = 1.
    assert classifier_similarity([torch.eye(3), 7 * torch.eye(3)]).item() == pytest.approx(1.0)


def test_classifier_similarity_has_gradient_into_the_classifiers():
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0]], requires_grad=True)
    classifier_similarity([w, torch.tensor([[1.0, 0.0], [0.0, 1.0]])]).backward()
    assert w.grad.abs().sum() > 0


def test_ffm_attention_is_a_softmax_over_branches():
    fusion = FeatureFusion(4, 3)
    with torch.no_grad():
        fusion.attention.weight.zero_()
        fusion.attention.bias.copy_(torch.tensor([0.0, math.log(2.0), 0.0]))
    maps = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    torch.testing.assert_close(fusion(maps), torch.tensor([[0.25, 0.5, 0.25]] * 2))
    assert fusion.fuse[0].in_channels == 12 and fusion.fuse[0].out_channels == 4


def test_ffm_sends_gradient_into_the_branches():
    method, students = make_method("mbde")
    out = students(torch.randn(1, 4, 1, 28, 28), stages=True)
    attention = method.fusion([maps[-1] for maps in out.stages])
    backward_of(attention[:, 0].sum(), method, students)
    assert all(grad_in_every_tensor(branch["stage"]) for branch in students.branches)
    assert all(no_grad_in(branch["classifier"]) for branch in students.branches)  # the FFM reads maps only
    assert students.trunk["stem"][0].weight.grad.any()


def test_step_terms_and_what_the_kd_does_not_train():
    method, students = make_method("mbde", lambda_cd=2.0)
    out = students(torch.randn(1, 4, 1, 28, 28), stages=True)
    losses = method.step(None, LABELS, out, make_ctx(80.0))
    weights = [branch["classifier"].weight for branch in students.branches]
    torch.testing.assert_close(losses["cd"], 2.0 * classifier_similarity(weights))
    assert losses["loss"].item() == pytest.approx(sum(v for k, v in losses.items() if k != "loss").item(), rel=1e-6)
    backward_of(losses["loss"], method, students)
    assert grad_in_every_tensor(method.fusion)
    teacher = method.ensemble_logits(out)
    kd_terms = ensemble_kd_terms(out.logits, teacher, LABELS, 3.0, 1.0)
    backward_of(sum(kd_terms[f"kd/s{j}"] for j in range(3)), method, students)
    assert no_grad_in(method.fusion)  # the teacher is detached inside the KD


def similarity_by_hand(weights) -> torch.Tensor:
    """mean over pairs i < j of ||W_i W_j^T||_F^2 / classes, rows unit-normalised."""
    rows = [w / w.norm(dim=1, keepdim=True) for w in weights]
    pairs = [((rows[i] @ rows[j].T) ** 2).sum() for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return sum(pairs) / len(pairs) / rows[0].shape[0]


def test_step_by_value_below_the_ramp_end():
    """Every term at epoch 5 of 60 (w ~ 0.09), T = 2.5, lambda_cd = 0.7, the FFM's BN in train mode; and the
    gradient of the whole loss equals the gradient of the terms with the teacher detached inside the KD."""
    method, students = make_method("mbde", temperature=TEMPERATURE, lambda_cd=0.7)
    students.train(), method.train()
    out = students(torch.randn(1, 6, 1, 28, 28, generator=torch.Generator().manual_seed(5)), stages=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    conv, norm, head = method.fusion.fuse[0], method.fusion.fuse[1], method.fusion.attention
    fused = torch.relu(batch_norm_train(F.conv2d(torch.cat([m[-1] for m in out.stages], 1), conv.weight), norm))
    g = torch.softmax(fused.mean(dim=(2, 3)) @ head.weight.T + head.bias, dim=1)
    expected = {
        **gated_ensemble_terms(out.logits, g, labels),
        "cd": 0.7 * similarity_by_hand([b["classifier"].weight for b in students.branches]),
    }
    losses = method.step(None, labels, out, make_ctx(EPOCH, TOTAL_EPOCHS))
    assert_step(losses, expected, [*students.parameters(), *method.parameters()])


def test_mbde_defaults_and_short_run(tmp_path):
    cls = METHODS.get("mbde")
    assert (cls.layout, cls.default_students, cls.ships, cls.needs_stages) == ("branches", 3, "student:0", True)
    defaults = MBDEParams()  # T and ramp as ONE (T = 3, 80 of 300 epochs); lambda_cd = 1.0 is ours (unknown)
    assert (defaults.lambda_cd, defaults.temperature, defaults.ramp_fraction) == (1.0, 3.0, 80 / 300)
    val = short_fit("mbde", tmp_path)
    assert set(val) == {"student:0", "student:1", "student:2", "ensemble"}
