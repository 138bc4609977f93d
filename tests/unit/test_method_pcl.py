"""PCL: the mean teacher's decay schedule and EMA (by value, across epochs), its batch statistics, step() by value
below the ramp's end, which terms train what, weight-averaged candidates, the paper defaults and a short run."""

import math

import pytest
import torch
from paper_formulas import EPOCH, RAMP_AT_EPOCH, TEMPERATURE, TOTAL_EPOCHS, assert_same_gradients, assert_terms, ce
from paper_formulas import kd as paper_kd
from test_method_one import backward_of, grad_in_every_tensor, make_ctx, make_method, no_grad_in, short_fit

from okdpipe.distill.losses import kd
from okdpipe.distill.methods import METHODS
from okdpipe.distill.methods.one import kd_weight
from okdpipe.distill.methods.pcl import PCLParams, lerp_towards, mean_teacher_decay

LABELS = torch.tensor([0, 1, 2, 3])


def test_mean_teacher_decay_schedule():
    assert mean_teacher_decay(0, 0.999) == 0.0
    assert mean_teacher_decay(1, 0.999) == 0.5
    assert mean_teacher_decay(9, 0.999) == pytest.approx(0.9)
    assert mean_teacher_decay(10**6, 0.999) == 0.999


def test_ramp_divides_the_epoch_by_the_ramp_length():
    # 40 of 300 epochs is half of the 80-epoch ramp: w = exp(-5 (1 - 1/2)^2), on any run length.
    assert kd_weight(make_ctx(40.0, 300), 80 / 300) == pytest.approx(math.exp(-5 * 0.25))
    assert kd_weight(make_ctx(4.0, 30), 80 / 300) == pytest.approx(math.exp(-5 * 0.25))


def perturb(students) -> None:
    """Move every float entry (uniform noise >= 0 keeps BN variances valid)."""
    with torch.no_grad():
        for tensor in students.state_dict().values():
            if tensor.dtype.is_floating_point:
                tensor.add_(torch.rand_like(tensor))


def float_state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if v.dtype.is_floating_point}


def test_mean_teacher_is_the_running_mean_of_the_parameters_only():
    method, students = make_method("pcl")
    method.after_step(make_ctx(step=0))  # decay 0: an exact copy
    assert all(torch.equal(a, b) for a, b in zip(method.mean_teacher.parameters(), students.parameters()))
    old_params = [p.clone() for p in method.mean_teacher.parameters()]
    old_buffers = {k: v.clone() for k, v in method.mean_teacher.named_buffers()}
    perturb(students)
    method.after_step(make_ctx(step=3))  # decay 1 - 1/4
    for old, mean, live in zip(old_params, method.mean_teacher.parameters(), students.parameters()):
        torch.testing.assert_close(mean, 0.75 * old + 0.25 * live.detach())
        assert not mean.requires_grad
    # The statistics are the mean teacher's own (its forwards), never averaged from the students'.
    assert all(torch.equal(v, old_buffers[k]) for k, v in method.mean_teacher.named_buffers())


def test_decay_follows_the_global_step_and_never_restarts_at_an_epoch():
    method, students = make_method("pcl")
    perturb(method.mean_teacher)
    old = [p.clone() for p in method.mean_teacher.parameters()]
    perturb(students)
    # Step 25 is the 6th step of epoch 3 at 10 steps per epoch: a = 1 - 1/26, not 1 - 1/6.
    method.after_step(make_ctx(epoch=2.5, step=25))
    for before, mean, live in zip(old, method.mean_teacher.parameters(), students.parameters()):
        torch.testing.assert_close(mean, (25 / 26) * before + (1 / 26) * live.detach())


def test_buffer_mode_averages_parameters_and_bn_buffers_and_runs_in_eval_mode():
    method, students = make_method("pcl", ema_buffers=True)
    old = float_state(method.mean_teacher)
    perturb(students)
    method.after_step(make_ctx(step=1))  # decay 1/2
    new = students.state_dict()
    for key, value in float_state(method.mean_teacher).items():
        torch.testing.assert_close(value, 0.5 * old[key] + 0.5 * new[key])
    assert "trunk.stem.1.running_mean" in old  # BN buffers are among the averaged entries
    method.train()
    assert not any(m.training for m in method.mean_teacher.modules())


def test_fused_lerp_equals_the_plain_formula():
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    sources = [torch.randn(5, 3, generator=generator, requires_grad=True), torch.randn(7, generator=generator)]
    expected = [0.9 * t + 0.1 * s.detach() for t, s in zip(targets, sources)]
    lerp_towards(targets, sources, 0.9)
    for got, want in zip(targets, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_mean_teacher_runs_with_batch_statistics_and_pairs_peer_l_with_view_l():
    method, students = make_method("pcl")
    method.train()
    assert all(m.training for m in method.mean_teacher.modules())
    perturb(method.mean_teacher)  # running statistics far from any batch's: eval mode would show
    views = torch.randn(3, 4, 1, 28, 28)
    logits = students(views).logits
    means = [method.mean_teacher.extract(peer).train()(views[peer]) for peer in range(3)]
    terms = method.mean_teacher_terms(views, logits, 0.5)
    expected = 0.5 * (paper_kd(logits[2], means[0], 3.0) + paper_kd(logits[2], means[1], 3.0)) / 2
    torch.testing.assert_close(terms["kd_mean/s2"], expected)


def test_step_by_value_below_the_ramp_end():
    """Eq. 7 term by term at epoch 5 of 60 (w ~ 0.09) and T = 2.5, and the gradient of the whole loss."""
    method, students = make_method("pcl", temperature=TEMPERATURE)
    method.train()
    perturb(method.mean_teacher)
    views = torch.randn(3, 4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    out = students(views, features=True)
    z_e = torch.cat(out.features, dim=1) @ method.ensemble_head.weight.T + method.ensemble_head.bias
    with torch.no_grad():
        means = [method.mean_teacher.extract(peer).train()(views[peer]) for peer in range(3)]
    expected = {"ce/ensemble": ce(z_e, LABELS)}
    for j, z in enumerate(out.logits):
        expected[f"ce/s{j}"] = ce(z, LABELS)
        expected[f"kd/s{j}"] = RAMP_AT_EPOCH * paper_kd(z, z_e, TEMPERATURE)
        others = [paper_kd(z, means[peer], TEMPERATURE) for peer in range(3) if peer != j]
        expected[f"kd_mean/s{j}"] = RAMP_AT_EPOCH * sum(others) / 2
    losses = method.step(views, LABELS, out, make_ctx(EPOCH, TOTAL_EPOCHS))
    assert_terms(losses, expected)
    assert_same_gradients(losses["loss"], sum(expected.values()), [*students.parameters(), *method.parameters()])


def test_mean_teacher_candidates_are_weight_averaged_copies():
    method, _ = make_method("pcl")
    candidates = method.candidates()
    assert set(candidates) == {"mean-teacher:0", "mean-teacher:1", "mean-teacher:2"}
    assert all(c.weight_averaged for c in candidates.values())
    state = method.mean_teacher.state_dict()
    plain = candidates["mean-teacher:1"].model.state_dict()
    assert torch.equal(plain["stages.2.0.residual.0.0.weight"], state["branches.1.stage.0.residual.0.0.weight"])


def test_mean_teacher_ensemble_is_the_mean_of_the_extracted_mean_teachers():
    method, students = make_method("pcl")
    perturb(method.mean_teacher)
    method.eval()
    views = torch.randn(1, 4, 1, 28, 28)
    reference = method.reference_logits(views, students(views, features=True))
    plain = [method.mean_teacher.extract(l).eval()(views[0]) for l in range(3)]
    assert set(reference) == {"mean-teacher-ensemble"}
    torch.testing.assert_close(reference["mean-teacher-ensemble"], torch.stack(plain).mean(0))


def test_ce_of_the_ensemble_trains_peers_and_trunk_and_the_mean_teacher_gets_nothing():
    method, students = make_method("pcl")
    views = torch.randn(3, 4, 1, 28, 28)
    out = students(views, features=True)
    losses = method.step(views, LABELS, out, make_ctx(80.0))
    backward_of(losses["loss"], method, students)
    assert all(p.grad is None for p in method.mean_teacher.parameters())
    assert grad_in_every_tensor(method.ensemble_head)
    teacher = method.ensemble_logits(out)
    backward_of(torch.nn.functional.cross_entropy(teacher, LABELS), method, students)
    assert students.trunk["stem"][0].weight.grad.any()
    assert all(grad_in_every_tensor(branch["stage"]) for branch in students.branches)
    backward_of(sum(kd(z, teacher, 3.0) for z in out.logits), method, students)
    assert no_grad_in(method.ensemble_head)  # the teacher is detached inside the KD
    assert set(losses) >= {"loss", "ce/ensemble", "ce/s0", "kd/s1", "kd_mean/s2"}


def test_pcl_defaults_and_short_run(tmp_path):
    cls = METHODS.get("pcl")
    assert (cls.layout, cls.default_students, cls.ships, cls.per_student_views) == ("branches", 3, "mean-teacher", True)
    defaults = PCLParams()  # PCL Sec. 4: T = 3, ramp over 80 of 300 epochs, decay cap 0.999; the reproduction's BN
    assert (defaults.temperature, defaults.ramp_fraction, defaults.ema_decay) == (3.0, 80 / 300, 0.999)
    assert defaults.ema_buffers is False
    method, students = make_method("pcl")
    assert method.ensemble_head.in_features == 3 * 64
    assert method.num_views(3) == 3
    val = short_fit("pcl", tmp_path)
    assert set(val) == {
        "student:0",
        "student:1",
        "student:2",
        "ensemble",
        "mean-teacher-ensemble",
        "mean-teacher:0",
        "mean-teacher:1",
        "mean-teacher:2",
    }
