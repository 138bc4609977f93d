"""Fused students are the loop's students computed as one grouped network: same logits, same training
trajectory under DML and OKDPH (hybrid, fusion, candidate), same checkpoints, and a clear refusal where an
architecture cannot fuse."""

import copy

import pytest
import torch
from torch import nn

from okdpipe.config import DistillConfig
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.distill.fused import BatchedLinear, FusedStudents
from okdpipe.distill.methods import StepContext
from okdpipe.distill.methods.dml import DML, DMLParams
from okdpipe.distill.methods.okdph import OKDPH, OKDPHParams
from okdpipe.distill.students import Students
from okdpipe.distill.trainer import fit
from okdpipe.errors import OkdpipeError
from okdpipe.run import RunDir

CLASSES, CHANNELS, SIZE, BATCH = 5, 1, 16, 8
FP32_ROUNDING = dict(rtol=1e-5, atol=1e-5)  # grouped and single convs sum in different orders


def loop_students(arch: str = "resnet8", count: int = 3) -> Students:
    torch.manual_seed(0)
    return Students(arch, count, CLASSES, CHANNELS)


def views(count: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, BATCH, CHANNELS, SIZE, SIZE, generator=generator).to(dtype)


@pytest.mark.parametrize("arch", ["resnet8", "resnet20"])
@pytest.mark.parametrize("view_count", [1, 3])
def test_fused_outputs_equal_the_loop(arch, view_count):
    students = loop_students(arch)
    fused = FusedStudents.from_students(students)
    batch = views(view_count)
    expected = students(batch, features=True, stages=True)
    got = fused(batch, features=True, stages=True)
    assert got.logits.shape == (3, BATCH, CLASSES)
    torch.testing.assert_close(got.logits, expected.logits, **FP32_ROUNDING)
    torch.testing.assert_close(got.features, expected.features, **FP32_ROUNDING)
    torch.testing.assert_close(got.stages, expected.stages, **FP32_ROUNDING)


def test_student_i_sees_view_i():
    fused = FusedStudents.from_students(loop_students()).eval()
    batch = views(3)
    logits = fused(batch).logits
    for i in range(3):
        torch.testing.assert_close(fused.extract(i).eval()(batch[i]), logits[i], **FP32_ROUNDING)
    swapped = fused(batch[[1, 0, 2]]).logits
    assert not torch.allclose(swapped[0], logits[0], atol=1e-3)


def train(method, steps: int = 3) -> list[torch.Tensor]:
    """SGD (momentum, weight decay) on the method's real loss, its views, its after-step hook (as fit() runs them);
    returns each step's loss."""
    students = method.students
    optimizer = torch.optim.SGD(students.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    labels = torch.arange(BATCH) % CLASSES
    losses = []
    dtype = next(students.parameters()).dtype
    for step in range(steps):
        batch = views(method.num_views(students.count), seed=10 + step, dtype=dtype)
        ctx = StepContext(step / steps, step, 1, steps, torch.Generator().manual_seed(step))
        loss = method.step(batch, labels, students(batch), ctx)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(ctx)
        losses.append(loss.detach())
    return losses


def train_dml(students: nn.Module, steps: int = 3) -> list[torch.Tensor]:
    return train(DML(students, DMLParams(temperature=3.0), CLASSES), steps)


def assert_same_students(got: nn.Module, expected: nn.Module, tolerance: float) -> None:
    """Every weight and BN statistic under the loop's checkpoint keys."""
    trained, wanted = got.state_dict(), expected.state_dict()
    assert trained.keys() == wanted.keys()
    assert any(key.endswith("running_var") for key in trained)
    for key, value in wanted.items():
        torch.testing.assert_close(trained[key], value, rtol=tolerance, atol=tolerance, msg=key)


# In fp32 the two summation orders drift apart chaotically in deeper nets at batch 8 (resnet20: ~2e-4 after
# 3 steps); in float64 the trajectories agree to ~1e-15, which shows the fused math is the loop's math.
@pytest.mark.parametrize(
    "arch, dtype, tolerance", [("resnet8", torch.float32, 1e-5), ("resnet20", torch.float64, 1e-10)]
)
def test_three_dml_steps_reach_the_loops_weights_and_bn_statistics(arch, dtype, tolerance):
    students = loop_students(arch).to(dtype)
    fused = FusedStudents.from_students(students)
    close = dict(rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(torch.stack(train_dml(fused)), torch.stack(train_dml(students)), **close)
    assert_same_students(fused, students, tolerance)
    assert int(fused.state_dict()["members.2.stem.1.num_batches_tracked"]) == 3


def okdph_pair(hwm_grad: bool = True, **params) -> tuple[OKDPH, OKDPH]:
    """OKDPH on 3 float64 loop students (different inits, so a swapped weight shows) and on the same fused."""
    students = loop_students().double()
    hp = OKDPHParams(hwm_grad=hwm_grad, **params)
    return OKDPH(FusedStudents.from_students(students), hp, CLASSES), OKDPH(students, hp, CLASSES)


# Fusion after step 1 of 3 (every 2 batches): the last step trains fused weights, so the hybrid, its gradient
# into the students (paper mode) or its absence (code mode) and the lerp all enter the compared trajectory.
@pytest.mark.parametrize("hwm_grad", [True, False])
def test_okdph_steps_fused_reach_the_loops_losses_weights_and_hybrid(hwm_grad):
    fused, loop = okdph_pair(hwm_grad, interval=2, interval_unit="batch")
    torch.testing.assert_close(torch.stack(train(fused)), torch.stack(train(loop)), rtol=1e-10, atol=1e-10)
    assert_same_students(fused.students, loop.students, 1e-10)
    got, expected = (m.candidates()["hybrid"] for m in (fused, loop))
    assert got.weight_averaged and type(got.model).__name__ == "Backbone"
    assert_same_students(got.model, expected.model, 1e-10)


def test_fused_hybrid_is_the_r_weighted_sum_of_the_students_and_its_gradient_is_r_scaled():
    fused, _ = okdph_pair()
    students = fused.students.train()
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    plain = students.extract(0).train()
    parts = [students.member_state(i) for i in range(3)]
    plain.load_state_dict(
        {
            key: sum(float(w) * p[key] for w, p in zip(weights, parts)) if value.is_floating_point() else value
            for key, value in parts[0].items()
        }
    )
    x = views(1, dtype=torch.float64)[0]
    torch.testing.assert_close(fused.hybrid_logits(x, weights), plain(x), rtol=1e-12, atol=1e-12)
    fused.hybrid_logits(x, weights).square().sum().backward()
    plain(x).square().sum().backward()
    stem = students.net.stem[0].weight.grad.chunk(3)
    for r, grad in zip(weights, stem):
        torch.testing.assert_close(grad, r * plain.stem[0].weight.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 0.25])
def test_fused_fusion_moves_every_student_gamma_of_the_way_to_the_average(gamma):
    fused, _ = okdph_pair(gamma=gamma)
    before = [copy.deepcopy(fused.students.member_state(i)) for i in range(3)]
    fused.fuse()
    for i, old in enumerate(before):
        for key, value in fused.students.member_state(i).items():
            if value.is_floating_point():
                average = (before[0][key] + before[1][key] + before[2][key]) / 3
                torch.testing.assert_close(value, gamma * average + (1 - gamma) * old[key], rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(value, old[key])


def test_extracted_student_equals_container_member_after_training():
    fused = FusedStudents.from_students(loop_students())
    train_dml(fused, steps=1)
    fused.eval()
    batch = views(1)
    logits = fused(batch).logits
    for i in range(3):
        plain = fused.extract(i)
        assert type(plain).__name__ == "Backbone" and not plain.training
        torch.testing.assert_close(plain(batch[0]), logits[i], **FP32_ROUNDING)


def test_a_seed_gives_the_loops_initial_weights_and_leaves_the_rng_where_the_loop_does():
    students = loop_students()
    after_loop = torch.random.get_rng_state()
    torch.manual_seed(0)
    fused = FusedStudents("resnet8", 3, CLASSES, CHANNELS)
    assert torch.equal(torch.random.get_rng_state(), after_loop)
    expected = students.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in fused.state_dict().items())


def test_same_init_gives_identical_students():
    torch.manual_seed(0)
    fused = FusedStudents("resnet8", 2, CLASSES, CHANNELS, same_init=True)
    first, second = fused.member_state(0), fused.member_state(1)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_checkpoints_move_between_loop_and_fused_and_nested_modules():
    fused = FusedStudents.from_students(loop_students())
    train_dml(fused, steps=1)
    back = fused.to_students()
    assert isinstance(back, Students)
    state = fused.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in back.state_dict().items())
    holder = nn.ModuleDict({"students": FusedStudents("resnet8", 3, CLASSES, CHANNELS)})
    holder.load_state_dict({f"students.{key}": value for key, value in state.items()})
    assert all(torch.equal(value, state[key[len("students.") :]]) for key, value in holder.state_dict().items())


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(views(1)).logits.square().mean().backward()
    optimizer.step()


def test_resume_from_students_and_optimizer_state_continues_the_same_run():
    straight = FusedStudents.from_students(loop_students())
    optimizer = torch.optim.SGD(straight.parameters(), lr=0.1, momentum=0.9)
    sgd_step(straight, optimizer)
    saved = copy.deepcopy({"students": straight.state_dict(), "optimizer": optimizer.state_dict()})  # "on disk"
    resumed = FusedStudents("resnet8", 3, CLASSES, CHANNELS)
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(saved["students"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    sgd_step(straight, optimizer)
    sgd_step(resumed, resumed_optimizer)
    expected = straight.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in resumed.state_dict().items())


def test_a_checkpoint_with_other_students_is_refused():
    state = FusedStudents.from_students(loop_students(count=2)).state_dict()
    with pytest.raises(RuntimeError, match="do not all hold"):
        FusedStudents("resnet8", 3, CLASSES, CHANNELS).load_state_dict(state)
    with pytest.raises(RuntimeError, match="Unexpected key.*members.1.stem"):
        FusedStudents("resnet8", 1, CLASSES, CHANNELS).load_state_dict(state)
    state.pop("members.1.classifier.bias")
    with pytest.raises(RuntimeError, match="do not all hold"):
        FusedStudents("resnet8", 2, CLASSES, CHANNELS).load_state_dict(state)


@pytest.mark.parametrize("arch", ["wrn16_2", "mobilenetv2", "resnet18"])
def test_other_channel_separable_architectures_fuse(arch):
    students = loop_students(arch, count=2).eval()
    fused = FusedStudents.from_students(students)
    batch = torch.randn(2, 2, CHANNELS, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fused(batch).logits, students(batch).logits, rtol=1e-4, atol=1e-4)


def test_architectures_that_mix_channels_are_refused():
    with pytest.raises(OkdpipeError, match="densenet40_12 has a DenseLayer layer .*fused: false"):
        FusedStudents("densenet40_12", 2, CLASSES, CHANNELS)


def test_branches_layout_and_member_modules_are_refused():
    with pytest.raises(OkdpipeError, match="peers layout only"):
        FusedStudents("resnet8", 2, CLASSES, CHANNELS, layout="branches")
    with pytest.raises(OkdpipeError, match="peers layout only"):
        FusedStudents.from_students(Students("resnet8", 2, CLASSES, CHANNELS, layout="branches"))
    with pytest.raises(OkdpipeError, match="students.members"):
        FusedStudents("resnet8", 2, CLASSES, CHANNELS).members  # noqa: B018


def test_too_few_views_and_missing_students_are_errors():
    fused = FusedStudents("resnet8", 3, CLASSES, CHANNELS)
    with pytest.raises(ValueError, match="at least 3 views"):
        fused(views(2))
    with pytest.raises(IndexError, match="0..2"):
        fused.extract(3)


def test_batched_linear_is_n_independent_linear_layers():
    layers = [nn.Linear(4, 3) for _ in range(2)]
    batched = BatchedLinear(2, 4, 3)
    with torch.no_grad():
        batched.weight.copy_(torch.stack([layer.weight for layer in layers]))
        batched.bias.copy_(torch.stack([layer.bias for layer in layers]))
    x = torch.randn(5, 8)
    torch.testing.assert_close(batched(x), torch.stack([layers[0](x[:, :4]), layers[1](x[:, 4:])]))


FIT_BASE = dict(arch="resnet8", dataset="synthetic", epochs=1, batch_size=8, val_split=0.25, students=2)


@pytest.mark.parametrize("method", ["dml", "okdph"])
def test_fused_flag_trains_through_fit_like_the_loop(tmp_path, method):
    summaries = {
        p: fit(DistillConfig(method=method, fused=p == "fused", **FIT_BASE), RunDir(tmp_path / p), echo=lambda _: None)
        for p in ("fused", "loop")
    }
    fused, loop = (load_checkpoint(RunDir(tmp_path / p))["students"] for p in ("fused", "loop"))
    assert fused.keys() == loop.keys()
    for key in loop:
        torch.testing.assert_close(fused[key].double(), loop[key].double(), rtol=1e-3, atol=1e-3)
    assert summaries["fused"]["val"].keys() == summaries["loop"]["val"].keys()


def test_fused_flag_refuses_methods_that_read_member_modules(tmp_path):
    with pytest.raises(OkdpipeError, match="--fused: method one"):
        fit(DistillConfig(method="one", fused=True, **FIT_BASE), RunDir(tmp_path / "one"), echo=lambda _: None)
