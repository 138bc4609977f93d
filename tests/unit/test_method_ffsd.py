"""FFSD: attention maps, AttnMSE, the diversity target and shifted map, warm-up, decoder shapes, every term of
step() by value during the warm-up (leader, fusion, decoders), the paper defaults, and the gradient isolation that
lets one backward replace the original's sequential ones."""

import copy
import math

import pytest
import torch
from paper_formulas import TEMPERATURE, assert_terms, ce
from paper_formulas import kd as paper_kd

from okdpipe.config import DistillConfig
from okdpipe.distill.losses import attention_map, kd, normalized_mse
from okdpipe.distill.methods import StepContext
from okdpipe.distill.methods.ffsd import (
    FFSD,
    FFSDParams,
    StageDecoder,
    UpBlock,
    diversity_loss,
    diversity_target,
    map_sizes,
    shifted_map,
)
from okdpipe.distill.models import create_model
from okdpipe.distill.students import Students
from okdpipe.distill.trainer import fit
from okdpipe.errors import OkdpipeError
from okdpipe.run import RunDir

CLASSES = 5


def test_attention_map_is_the_channel_mean_of_squares():
    fmap = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [1, 2, 1, 2]
    assert attention_map(fmap).tolist() == [[5.0, 10.0]]


def test_attention_mse_compares_unit_normalised_maps():
    assert normalized_mse(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])).item() == pytest.approx(0.04)
    assert normalized_mse(torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]])).item() == pytest.approx(0.0)


def test_diversity_target_flips_the_top_two_thirds():
    a = torch.arange(1.0, 7.0)[None]  # tau = 2nd smallest of a_hat (floor(6/3) = 2)
    target, unit, norm = diversity_target(a)
    n = math.sqrt(91.0)
    expected = [1 / n, n / 2, n - 3 / n, n - 4 / n, n - 5 / n, n - 6 / n]  # below tau, at tau, above tau
    assert target[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert norm.item() == pytest.approx(n) and unit[0].tolist() == pytest.approx([k / n for k in range(1, 7)], rel=1e-5)
    x = torch.ones(1, 6)
    loss = sum((1 / math.sqrt(6) - t) ** 2 for t in expected) / 6
    assert diversity_loss(x, a).item() == pytest.approx(loss, rel=1e-5)


def test_shifted_map_spreads_the_attention_shift_over_channels():
    fmap = torch.tensor([[[[1.0, 0.0, 0.0]], [[1.0, 2.0, 0.0]]]])  # A = [1, 2, 0], ||A|| = sqrt(5), tau = 0
    # shift = (t - a_hat) * ||A|| / C: [(5 - 2)/2, (5 - 4)/2, (sqrt5/2) * sqrt5/2] = [1.5, 0.5, 1.25]
    shifted = shifted_map(fmap)
    assert shifted.flatten().tolist() == pytest.approx([2.5, 0.5, 1.25, 2.5, 2.5, 1.25], rel=1e-6)


def make_method(**params) -> FFSD:
    torch.manual_seed(0)
    students = Students("resnet8", 3, CLASSES, 3)
    return FFSD(students, FFSDParams(**params), CLASSES)


def test_lambdas_warm_up_per_epoch_counting_from_one():
    method = make_method()
    first = method.lambdas(0.9)
    assert first["div"] == pytest.approx(1e-5 * math.exp(-3.2))
    assert first["fus"] == pytest.approx(10 * math.exp(-3.2)) and first["sd"] == pytest.approx(1000 * math.exp(-3.2))
    assert method.lambdas(2.5)["fus"] == pytest.approx(10 * math.exp(-0.8))
    assert method.lambdas(4.0) == {"div": 1e-5, "fus": 10.0, "sd": 1000.0}
    assert make_method(warmup_epochs=0).lambdas(0.0)["sd"] == 1000.0


@pytest.mark.parametrize("arch", ["resnet8", "resnet20"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_decoders_rebuild_every_shallower_stage_shape(arch, channels, size):
    model = create_model(arch, num_classes=CLASSES, in_channels=channels)
    _, maps = model.forward_features(torch.randn(2, channels, size, size), return_stages=True)
    rebuilt = StageDecoder(model.stage_channels)(maps[-1], map_sizes(maps))
    assert [r.shape for r in rebuilt] == [m.shape for m in maps[:-1]]


def test_decoder_refuses_stages_that_do_not_halve():
    with pytest.raises(OkdpipeError, match="halve the resolution"):
        UpBlock(4, 2)(torch.randn(1, 4, 8, 8), (8, 8))


def outputs_and_labels(method: FFSD):
    method.students.train()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return method.students(x[None], stages=True), torch.arange(4) % CLASSES


def gradient_owners(method: FFSD, loss: torch.Tensor) -> set[str]:
    """Which modules got a non-zero gradient from `loss` (all gradients cleared first)."""
    modules = {f"s{i}": m for i, m in enumerate(method.students.members)}
    modules.update(fusion=method.fusion, trans=method.trans_fusion, decoders=method.decoders)
    for module in modules.values():
        module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {
        name
        for name, module in modules.items()
        if any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in module.parameters())
    }


def test_each_loss_reaches_only_its_own_model():
    method = make_method()
    out, labels = outputs_and_labels(method)
    terms = method.loss_terms(out, labels, epoch=10.0)
    group = lambda keep: sum(v for k, v in terms.items() if keep(k))  # noqa: E731
    own = lambda suffix: group(lambda k: k.endswith(suffix) and not k.startswith("decoder/"))  # noqa: E731
    assert gradient_owners(method, own("/s0")) == {"s0"}
    assert gradient_owners(method, own("/s1")) == {"s1"}
    assert gradient_owners(method, own("/s2")) == {"s2", "trans"}
    assert gradient_owners(method, own("/fusion")) == {"fusion"}
    assert gradient_owners(method, group(lambda k: k.startswith("decoder/"))) == {"decoders"}
    assert gradient_owners(method, terms["div/s1"]) == {"s1"}  # the diversity push does reach student 1


def test_term_values_for_the_peer_and_fusion_distillation():
    method = make_method()
    out, labels = outputs_and_labels(method)
    terms = method.loss_terms(out, labels, epoch=10.0)
    z0, z1 = out.logits[0], out.logits[1]
    assert terms["kd/s0"].item() == pytest.approx(kd(z0, z1, 2.0).item())
    assert terms["kd/s1"].item() == pytest.approx(kd(z1, z0, 2.0).item())
    assert set(terms) == {
        "ce/s0",
        "kd/s0",
        "ce/s1",
        "kd/s1",
        "div/s1",
        "sd/s1",
        "ce/fusion",
        "kd/fusion",
        "ce/s2",
        "kd/s2",
        "fus/s2",
        "trans/s2",
        "sd/s2",
        "decoder/s1",
        "decoder/s2",
    }


def test_leader_is_the_last_student_and_the_only_candidate():
    method = make_method()
    leader = method.candidates()["leader"]
    assert not leader.weight_averaged
    last = method.students.members[2].state_dict()
    assert all(torch.equal(v, last[k]) for k, v in leader.model.state_dict().items())
    groups = method.param_groups()
    assert groups[0]["weight_decay"] == 1e-5
    optimized = {id(p) for g in groups for p in g["params"]}
    assert not optimized & {id(p) for p in method.decoders.parameters()}
    assert [o.defaults["lr"] for o in method.extra_optimizers()] == [1e-3, 1e-3]


def test_fusion_head_reference_is_the_fusion_classifier_on_the_common_students_maps():
    method = make_method()
    method.eval()
    out, _ = outputs_and_labels(method)
    concat = torch.cat([out.stages[0][-1], out.stages[1][-1]], dim=1)  # the two common students, not the leader
    expected = method.fusion.classifier(method.fusion.body(concat).mean(dim=(2, 3)))
    reference = method.reference_logits(None, out)
    assert set(reference) == {"fusion-head"}
    torch.testing.assert_close(reference["fusion-head"], expected)


def attention(fmap: torch.Tensor) -> torch.Tensor:
    """A(F): channel-mean of F^2, flattened per sample."""
    return (fmap**2).mean(dim=1).flatten(1)


def unit_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((a/||a|| - b/||b||)^2), per-sample norms over the flattened entries (an all-zero map stays zero)."""
    a, b = a.flatten(1), b.flatten(1)
    return (
        (a / a.norm(dim=1, keepdim=True).clamp_min(1e-12) - b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)) ** 2
    ).mean()


def attn_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return unit_mse(attention(a), attention(b))


def shift_target(a: torch.Tensor) -> torch.Tensor:
    """t: ||a|| - a_hat above tau (the floor(P/3)-th smallest a_hat), a_hat below it, ||a||/2 at it."""
    norm, unit = a.norm(dim=1, keepdim=True), a / a.norm(dim=1, keepdim=True)
    tau = unit.sort(dim=1).values[:, a.shape[1] // 3 - 1 : a.shape[1] // 3]
    return torch.where(unit > tau, norm - unit, torch.where(unit < tau, unit, norm / 2))


def shifted(fmap: torch.Tensor) -> torch.Tensor:
    """S(F) = F + (t - a_hat) ||a|| / C, the same shift in every channel."""
    a = attention(fmap)
    norm = a.norm(dim=1, keepdim=True)
    shift = (shift_target(a) - a / norm) * norm / fmap.shape[1]
    return fmap + shift.view(fmap.shape[0], 1, *fmap.shape[2:])


def decoded(decoder, deepest, maps, train: bool):
    """The decoder's maps for the shallower stages of `maps`, in train mode (its loss) or eval mode (targets)."""
    decoder.train(train)
    try:
        return decoder(deepest, [tuple(m.shape[-2:]) for m in maps[:-1]])
    finally:
        decoder.train(True)


def expected_ffsd_terms(method: FFSD, out, labels, factor: float, lambdas: dict) -> dict[str, torch.Tensor]:
    """Every term of FFSD with M = 2 common students (0, 1) and the leader 2, from the paper's formulas."""
    T, z, maps = TEMPERATURE, out.logits, out.stages
    div, fus, sd = (factor * lambdas[k] for k in ("div", "fus", "sd"))
    targets = {name: copy.deepcopy(d).eval() for name, d in zip(("s1", "leader"), method.decoders)}
    with torch.no_grad():
        student_targets = targets["s1"](shifted(maps[0][-1]), [tuple(m.shape[-2:]) for m in maps[1][:-1]])
    concat = torch.cat([maps[0][-1].detach(), maps[1][-1].detach()], dim=1)
    fused, z_fus = method.fusion(concat)
    with torch.no_grad():
        leader_targets = targets["leader"](fused, [tuple(m.shape[-2:]) for m in maps[2][:-1]])
    terms = {
        "ce/s0": ce(z[0], labels),
        "kd/s0": paper_kd(z[0], z[1], T),
        "ce/s1": ce(z[1], labels),
        "kd/s1": paper_kd(z[1], z[0], T),
        "div/s1": div
        * (
            (
                attention(maps[1][-1]) / attention(maps[1][-1]).norm(dim=1, keepdim=True)
                - shift_target(attention(maps[0][-1]).detach())
            )
            ** 2
        ).mean(),
        "sd/s1": div * sum(attn_mse(m, t) for m, t in zip(maps[1], student_targets)),
        "ce/fusion": ce(z_fus, labels),
        "kd/fusion": paper_kd(z_fus, (z[0] + z[1]) / 2, T),
        "ce/s2": ce(z[2], labels),
        "kd/s2": paper_kd(z[2], z_fus, T),
        "fus/s2": fus * attn_mse(maps[2][-1], fused.detach()),
        "trans/s2": fus * attn_mse(method.trans_fusion(maps[2][-1]), concat),
        "sd/s2": fus * sum(attn_mse(m, t) for m, t in zip(maps[2], leader_targets)),
    }
    for name, decoder, owner in (("decoder/s1", method.decoders[0], 1), ("decoder/s2", method.decoders[1], 2)):
        own = [m.detach() for m in maps[owner]]
        rebuilt = decoded(copy.deepcopy(decoder), own[-1], own, train=True)
        terms[name] = sd * sum(unit_mse(r, m) + attn_mse(r, m) for r, m in zip(rebuilt, own))
    return terms


def test_step_by_value_during_the_warm_up():
    """Every term at epoch 1.5 (the second epoch counted from 1: warm-up factor exp(-5 (1 - 2/5)^2)), T = 2.5 and
    lambdas that differ from each other, so a term weighted by the wrong lambda, the wrong warm-up, a constant
    temperature or a decoder target taken in train mode each change a value."""
    lambdas = {"div": 0.3, "fus": 0.7, "sd": 0.11}
    method = make_method(temperature=TEMPERATURE, lambda_div=0.3, lambda_fus=0.7, lambda_sd=0.11)
    out, labels = outputs_and_labels(method)
    for decoder in method.decoders:  # running statistics far from the batch's: eval-mode targets differ
        for module in decoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3), module.running_var.uniform_(2.0, 3.0)
    expected = expected_ffsd_terms(method, out, labels, math.exp(-5 * (1 - 2 / 5) ** 2), lambdas)
    losses = method.step(None, labels, out, StepContext(1.5, 15, 300, 10, torch.Generator()))
    assert set(losses) == {"loss", *expected}
    assert_terms(losses, expected, rtol=1e-4, atol=1e-6)


def test_decoder_optimisers_follow_the_official_schedule_scaled_to_the_run():
    """Adam lr 1e-3, x0.1 at epochs 150 and 225 of 300: at 1/2 and 3/4 of a 20-epoch run, epochs 10 and 15."""
    method = make_method()
    out, labels = outputs_and_labels(method)
    rates = {}
    for epoch in (0.0, 9.9, 10.0, 14.5, 15.0, 19.9):
        method.step(None, labels, out, StepContext(epoch, int(epoch * 10), 20, 10, torch.Generator()))
        rates[epoch] = [group["lr"] for o in method.extra_optimizers() for group in o.param_groups]
    expected = {0.0: 1e-3, 9.9: 1e-3, 10.0: 1e-4, 14.5: 1e-4, 15.0: 1e-5, 19.9: 1e-5}
    for epoch, lr in expected.items():
        assert rates[epoch] == pytest.approx([lr, lr], rel=1e-9), epoch


def test_ffsd_defaults_are_the_papers():
    defaults = FFSDParams()  # FFSD Sec. IV-A and its code: T = 2, lambdas 1e-5 / 10 / 1000, 5 warm-up epochs
    assert (defaults.temperature, defaults.lambda_div, defaults.lambda_fus, defaults.lambda_sd) == (2.0, 1e-5, 10, 1000)
    assert (defaults.warmup_epochs, defaults.fusion_weight_decay) == (5.0, 1e-5)
    assert (defaults.decoder_lr, defaults.decoder_weight_decay) == (1e-3, 1e-4)
    assert (defaults.decoder_milestones, defaults.decoder_lr_decay) == ((0.5, 0.75), 0.1)
    assert (FFSD.layout, FFSD.default_students, FFSD.min_students, FFSD.ships) == ("peers", 3, 3, "leader")


def test_short_fit_reports_the_leader_and_the_fusion_head(tmp_path):
    cfg = DistillConfig(method="ffsd", arch="resnet8", dataset="synthetic", epochs=2, batch_size=16, val_split=0.25)
    summary = fit(cfg, RunDir(tmp_path / "r"), echo=lambda _: None)
    expected = {"student:0", "student:1", "student:2", "ensemble", "leader", "fusion-head"}
    assert set(summary["val"]) == expected and set(summary["test"]) == expected
    assert math.isfinite(summary["val"]["leader"]["loss"])
    assert summary["val"]["leader"] == summary["val"]["student:2"]  # the leader is the last student


def test_more_common_students_each_get_a_decoder_and_a_diversity_term():
    torch.manual_seed(0)
    method = FFSD(Students("resnet8", 4, CLASSES, 3), FFSDParams(), CLASSES)
    out, labels = outputs_and_labels(method)
    terms = method.loss_terms(out, labels, epoch=0.0)
    assert {"div/s1", "div/s2", "sd/s2", "decoder/s1", "decoder/s2", "decoder/s3", "trans/s3"} <= set(terms)
    assert len(method.decoders) == 3 and method.trans_fusion[1][0].out_channels == 3 * 64
    z = out.logits
    expected = (kd(z[2], z[0], 2.0) + kd(z[2], z[1], 2.0)) / 2
    assert terms["kd/s2"].item() == pytest.approx(expected.item(), rel=1e-6)
