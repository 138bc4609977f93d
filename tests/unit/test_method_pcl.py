"""PCL: the mean teacher's decay schedule and EMA, the ramp, which terms train what, and a short run."""

import math

import pytest
import torch

from okdpipe.distill.losses import kd
from okdpipe.distill.methods import METHODS
from okdpipe.distill.methods.one import kd_weight
from okdpipe.distill.methods.pcl import mean_teacher_decay

from test_method_one import backward_of, grad_in_every_tensor, make_ctx, make_method, no_grad_in, short_fit

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


def test_mean_teacher_is_the_explicit_running_mean_of_params_and_bn_buffers():
    method, students = make_method("pcl")
    method.after_step(make_ctx(step=0))  # decay 0: an exact copy
    assert all(torch.equal(a, b) for a, b in zip(method.mean_teacher.state_dict().values(),
                                                 students.state_dict().values()))
    old = {k: v.clone() for k, v in method.mean_teacher.state_dict().items()}
    perturb(students)
    method.after_step(make_ctx(step=3))  # decay 1 - 1/4
    new = students.state_dict()
    for key, value in method.mean_teacher.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.75 * old[key] + 0.25 * new[key])
    assert "trunk.stem.1.running_mean" in old  # BN buffers are among the averaged entries


def test_reproduction_mode_averages_parameters_only():
    method, students = make_method("pcl", ema_buffers=False)
    buffers = {k: v.clone() for k, v in method.mean_teacher.named_buffers()}
    params = [p.clone() for p in method.mean_teacher.parameters()]
    perturb(students)
    method.after_step(make_ctx(step=1))  # decay 1/2
    assert all(torch.equal(v, buffers[k]) for k, v in method.mean_teacher.named_buffers())
    for old, mean, live in zip(params, method.mean_teacher.parameters(), students.parameters()):
        torch.testing.assert_close(mean, 0.5 * old + 0.5 * live.detach())
        assert not mean.requires_grad
    method.train()
    assert method.mean_teacher.training  # batch statistics, as the reproduction


def test_mean_teacher_runs_in_eval_mode_and_pairs_peer_l_with_view_l():
    method, students = make_method("pcl")
    method.train()
    assert not any(m.training for m in method.mean_teacher.modules())
    perturb(method.mean_teacher)
    views = torch.randn(3, 4, 1, 28, 28)
    logits = students(views).logits
    terms = method.mean_teacher_terms(views, logits, 0.5)
    means = [method.mean_teacher.extract(l).eval()(views[l]) for l in range(3)]
    expected = 0.5 * (kd(logits[2], means[0], 3.0) + kd(logits[2], means[1], 3.0)) / 2
    torch.testing.assert_close(terms["kd_mean/s2"], expected)


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
    method, students = make_method("pcl")
    assert method.ensemble_head.in_features == 3 * 64
    assert method.num_views(3) == 3
    val = short_fit("pcl", tmp_path)
    assert set(val) == {"student:0", "student:1", "student:2", "ensemble", "mean-teacher-ensemble",
                        "mean-teacher:0", "mean-teacher:1", "mean-teacher:2"}
