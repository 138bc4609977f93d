"""OKDPH: Dirichlet draws, the hybrid's exact weights, its gradient in paper and code mode, step() by value at
non-default hyperparameters, fusion, candidates, same initialisation and the paper defaults."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from paper_formulas import TEMPERATURE, assert_same_gradients, assert_terms, ce, kd

from okdpipe.config import DistillConfig
from okdpipe.distill.methods import StepContext
from okdpipe.distill.methods.okdph import OKDPH, OKDPHParams, dirichlet_ones
from okdpipe.distill.students import Students
from okdpipe.distill.trainer import fit
from okdpipe.errors import OkdpipeError
from okdpipe.run import RunDir

CLASSES = 5


def make_method(count=2, same_init=False, **params) -> OKDPH:
    torch.manual_seed(0)
    students = Students("resnet8", count, CLASSES, 3, same_init=same_init)
    return OKDPH(students, OKDPHParams(**params), CLASSES)


def hand_built_hybrid(method: OKDPH, weights) -> torch.nn.Module:
    """A plain module whose every float entry is sum_m r_m theta_m, built key by key."""
    members = method.students.members
    hybrid = copy.deepcopy(members[0])
    states = [m.state_dict() for m in members]
    with torch.no_grad():
        for key, value in hybrid.state_dict().items():
            if value.dtype.is_floating_point:
                value.copy_(sum(float(w) * s[key] for w, s in zip(weights, states)))
    return hybrid.train()


def images(count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 16, 16, generator=generator), torch.arange(count) % CLASSES


def test_dirichlet_weights_are_normalised_exponentials_from_the_generator():
    r = dirichlet_ones(3, torch.Generator().manual_seed(7))
    u = torch.rand(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64).tolist()
    draws = [-math.log(1.0 - x) for x in u]
    assert r.tolist() == pytest.approx([d / sum(draws) for d in draws], abs=1e-7)
    assert float(r.sum()) == pytest.approx(1.0, abs=1e-6) and bool((r > 0).all())
    generator = torch.Generator().manual_seed(7)
    first, second = dirichlet_ones(3, generator), dirichlet_ones(3, generator)
    assert torch.equal(first, r) and not torch.equal(first, second)


def test_code_mode_uses_fixed_uniform_weights():
    method = make_method(count=4, dirichlet=False)
    assert method.hybrid_weights(torch.Generator().manual_seed(0)).tolist() == [0.25] * 4


def test_hybrid_forward_equals_a_module_holding_the_weighted_weights():
    method = make_method()
    method.students.train()
    weights = torch.tensor([0.3, 0.7])
    x, _ = images()
    expected = hand_built_hybrid(method, weights)(x)
    torch.testing.assert_close(method.hybrid_logits(x, weights), expected, rtol=1e-5, atol=1e-5)


def test_hybrid_forward_leaves_the_students_running_statistics_alone():
    method = make_method()
    method.students.train()
    before = [copy.deepcopy(m.state_dict()) for m in method.students.members]
    method.hybrid_logits(images()[0], torch.tensor([0.4, 0.6]))
    for member, state in zip(method.students.members, before):
        assert all(torch.equal(member.state_dict()[k], v) for k, v in state.items())


def test_paper_mode_sends_r_scaled_hybrid_gradient_into_every_student():
    method = make_method(hwm_grad=True)
    method.students.train()
    weights, omega = torch.tensor([0.3, 0.7]), method.hp.omega
    x, y = images()
    ((1 - omega) * F.cross_entropy(method.hybrid_logits(x, weights), y)).backward()
    hybrid = hand_built_hybrid(method, weights)
    ((1 - omega) * F.cross_entropy(hybrid(x), y)).backward()
    hybrid_grads = dict(hybrid.named_parameters())
    for r, member in zip(weights, method.students.members):
        conv = member.stem[0].weight.grad
        assert conv is not None and conv.abs().sum() > 0
        torch.testing.assert_close(conv, r * hybrid_grads["stem.0.weight"].grad, rtol=1e-5, atol=1e-7)
        for name, param in member.named_parameters():
            torch.testing.assert_close(param.grad, r * hybrid_grads[name].grad, rtol=1e-4, atol=1e-7)


def test_code_mode_hybrid_gives_the_students_no_gradient():
    x, y = images()
    code = make_method(hwm_grad=False, dirichlet=False)
    code.students.train()
    loss = F.cross_entropy(code.hybrid_logits(x, torch.tensor([0.5, 0.5])), y)
    assert loss.grad_fn is None  # no path from CE(z_h) to any student parameter: exactly zero gradient
    paper = make_method(hwm_grad=True)
    paper.students.train()
    params = list(paper.students.parameters())
    grads = torch.autograd.grad(F.cross_entropy(paper.hybrid_logits(x, torch.tensor([0.5, 0.5])), y), params)
    assert all(torch.count_nonzero(g) > 0 for g in grads if g.dim() > 1)


def test_step_loss_matches_the_objective_by_hand():
    method = make_method(same_init=True)
    method.students.train()
    x, y = images()
    views = torch.stack([x, x.flip(-1), x.flip(-2)])
    out = method.students(views)
    result = method.step(views, y, out, StepContext(0.0, 0, 2, 1, torch.Generator().manual_seed(3)))
    r = dirichlet_ones(2, torch.Generator().manual_seed(3))
    z_h = hand_built_hybrid(method, r)(views[2])
    z_en = (out.logits[0] + out.logits[1] + z_h) / 3
    expected = 0.2 * F.cross_entropy(z_h, y) + sum(
        0.8 * F.cross_entropy(z, y)
        + 0.8 * 16 * F.kl_div(F.log_softmax(z / 4, 1), F.softmax(z_en / 4, 1), reduction="batchmean")
        for z in out.logits
    )
    assert result["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert [float(result[f"r/s{i}"]) for i in range(2)] == pytest.approx(r.tolist())


def live_hybrid_logits(method: OKDPH, weights, view) -> torch.Tensor:
    """z_h through student 0's graph with theta_h = sum_m r_m theta_m of the LIVE parameters (paper mode:
    CE(z_h) trains the students) and the same weighted sum of the BN buffers, in train mode."""
    members = method.students.members
    params = {
        k: sum(w * dict(m.named_parameters())[k] for w, m in zip(weights, members))
        for k, _ in members[0].named_parameters()
    }
    buffers = {
        k: (
            sum(w * dict(m.named_buffers())[k] for w, m in zip(weights, members)).detach()
            if v.dtype.is_floating_point
            else v.clone()
        )
        for k, v in members[0].named_buffers()
    }
    return torch.func.functional_call(members[0], {**params, **buffers}, (view,))


def test_step_by_value_at_non_default_hyperparameters():
    """L = sum_m [omega CE_m + beta KD(z_m <- z_en)] + (1 - omega) CE_h at omega 0.7, beta 0.6, T = 2.5, three
    students, the hybrid on its own view (views[3]); z_en detached (checked through the gradient)."""
    method = make_method(count=3, same_init=True, omega=0.7, beta=0.6, temperature=TEMPERATURE)
    method.students.train()
    x, y = images(6)
    views = torch.stack([x, x.flip(-1), x.flip(-2), x.transpose(-1, -2)])
    out = method.students(views)
    r = dirichlet_ones(3, torch.Generator().manual_seed(3))
    z_h = live_hybrid_logits(method, r, views[3])
    z_en = (out.logits.sum(0) + z_h) / 4
    expected = {"ce/hybrid": 0.3 * ce(z_h, y)}
    for i, z in enumerate(out.logits):
        expected[f"ce/s{i}"] = 0.7 * ce(z, y)
        expected[f"kd/s{i}"] = 0.6 * kd(z, z_en, TEMPERATURE)
    losses = method.step(views, y, out, StepContext(0.5, 0, 2, 1, torch.Generator().manual_seed(3)))
    assert_terms(losses, expected)
    assert_same_gradients(losses["loss"], sum(expected.values()), list(method.students.parameters()))


def test_okdph_defaults_are_the_papers_and_students_start_identical():
    defaults = OKDPHParams()  # OKDPH Sec. 4 (CIFAR-10/100 recipe): omega 0.8, beta 0.8, gamma 0.5 every epoch, T 4
    assert (defaults.omega, defaults.beta, defaults.gamma, defaults.temperature) == (0.8, 0.8, 0.5, 4.0)
    assert (defaults.interval, defaults.interval_unit) == (1, "epoch")
    assert (defaults.hwm_grad, defaults.dirichlet) == (True, True)
    assert (OKDPH.layout, OKDPH.default_students, OKDPH.per_student_views, OKDPH.same_init) == ("peers", 2, True, True)
    from okdpipe.datasets import load_dataset
    from okdpipe.distill.trainer import build_models

    cfg = DistillConfig(method="okdph", arch="resnet8", dataset="synthetic", students=3)
    students, _ = build_models(cfg, load_dataset("synthetic", val_split=0.25).spec, torch.device("cpu"))
    states = [m.state_dict() for m in students.members]
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])


@pytest.mark.parametrize("gamma", [0.5, 0.25])
def test_fusion_moves_every_student_gamma_of_the_way_to_the_average(gamma):
    method = make_method(count=3, gamma=gamma)
    before = [copy.deepcopy(m.state_dict()) for m in method.students.members]
    method.fuse()
    for member, old in zip(method.students.members, before):
        for key, value in member.state_dict().items():
            if value.dtype.is_floating_point:
                average = (before[0][key] + before[1][key] + before[2][key]) / 3
                torch.testing.assert_close(value, gamma * average + (1 - gamma) * old[key])
            else:
                assert torch.equal(value, old[key])


def test_fusion_runs_at_the_end_of_every_interval():
    ctx = lambda step: StepContext(0.0, step, 4, 3, torch.Generator())  # noqa: E731 -- 3 steps per epoch
    by_epoch = make_method(interval=2, interval_unit="epoch")
    assert [s for s in range(12) if by_epoch.fusion_due(ctx(s))] == [5, 11]
    by_batch = make_method(interval=5, interval_unit="batch")
    assert [s for s in range(12) if by_batch.fusion_due(ctx(s))] == [4, 9]


def test_hybrid_candidate_is_a_fresh_uniform_average():
    method = make_method()
    candidate = method.candidates()["hybrid"]
    assert candidate.weight_averaged
    a, b = (m.state_dict() for m in method.students.members)
    state = candidate.model.state_dict()
    torch.testing.assert_close(state["stem.0.weight"], (a["stem.0.weight"] + b["stem.0.weight"]) / 2)
    assert state["stem.0.weight"].data_ptr() not in {a["stem.0.weight"].data_ptr(), b["stem.0.weight"].data_ptr()}


def test_views_and_student_count():
    assert make_method(count=3).num_views(3) == 4
    with pytest.raises(OkdpipeError, match="2 to 4 students"):
        make_method(count=5)


def test_short_fit_reports_the_hybrid(tmp_path):
    cfg = DistillConfig(method="okdph", arch="resnet8", dataset="synthetic", epochs=2, batch_size=16, val_split=0.25)
    summary = fit(cfg, RunDir(tmp_path / "r"), echo=lambda _: None)
    assert {"student:0", "student:1", "ensemble", "hybrid"} <= set(summary["val"])
    assert math.isfinite(summary["val"]["hybrid"]["loss"])
