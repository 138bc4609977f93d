"""The chance warning (distill/diagnose.py): by value on made-up epoch histories, and in real runs."""

from __future__ import annotations

import pytest

from okdpipe.config import DistillConfig
from okdpipe.distill import trainer
from okdpipe.distill.diagnose import chance_warning
from okdpipe.distill.trainer import fit
from okdpipe.run import RunDir


def epoch(loss: float, *top1: float) -> dict:
    return {"train": {"loss": loss}, "val": {f"student:{i}": {"top1": t} for i, t in enumerate(top1)}}


CFG = DistillConfig(arch="resnet8", lr=0.1)


@pytest.mark.parametrize(
    ("val_size", "top1", "warned"),
    [
        # 6,000 images: 3 sigma of a 10-class guesser is 3 * sqrt(0.1 * 0.9 / 6000) = 1.16 points < 2 points
        (6000, 0.1000, True),
        (6000, 0.1195, True),
        (6000, 0.0805, True),
        (6000, 0.1205, False),
        (6000, 0.0795, False),
        # 100 images: 3 * sqrt(0.09 / 100) = 9 points
        (100, 0.1850, True),
        (100, 0.1950, False),
        # 81 images: 3 * sqrt(0.09 / 81) = 10 points = 1/K, too few to tell chance from twice chance
        (82, 0.1000, True),
        (81, 0.1000, False),
    ],
)
def test_chance_is_within_two_points_or_three_binomial_sigmas(val_size, top1, warned):
    history = [epoch(2.3, 0.1), epoch(0.9, 0.05, top1)]  # the best student counts
    assert (chance_warning(history, 10, val_size, CFG) is not None) is warned


def test_the_loss_must_have_fallen_clearly_from_the_first_epochs():
    assert chance_warning([epoch(2.30, 0.1), epoch(1.85, 0.1)], 10, 6000, CFG) is None  # 80.4% of the first
    assert chance_warning([epoch(2.30, 0.1), epoch(1.83, 0.1)], 10, 6000, CFG) is not None  # 79.6%
    assert chance_warning([epoch(2.30, 0.1)], 10, 6000, CFG) is None  # nothing to compare a first epoch with
    assert chance_warning([epoch(2.3, 0.5), epoch(0.9, 0.5)], 2, 6000, CFG) is not None  # chance is 1/K


def test_the_line_names_the_cause_and_the_fix(monkeypatch):
    line = chance_warning([epoch(2.3, 0.1), epoch(0.9, 0.1)], 10, 6000, CFG)
    assert line == (
        "warning: validation top-1 10.00% is at chance (1/10) while the training loss fell from 2.300 to 0.900: "
        "the BatchNorm running statistics likely lag the weights, the learning rate (0.1) being too high for "
        "resnet8; evaluate with recomputed BatchNorm statistics (--set precise_bn=true) and give it more steps"
    )
    precise = CFG.model_copy(update={"precise_bn": True})
    assert chance_warning([epoch(2.3, 0.1), epoch(0.9, 0.1)], 10, 6000, precise).endswith(
        "resnet8; give it more steps (more --epochs or --train-subset, or a smaller --batch-size) or a gentler "
        "start (--lr 0.05 --set warmup_epochs=1)"
    )
    from okdpipe.distill.models import MODELS, recipe
    from okdpipe.distill.models.cifar_resnet import resnet8

    monkeypatch.setitem(
        MODELS._items, "gentle-resnet8", recipe(lr=0.02, channels_last=True)(lambda **kw: resnet8(**kw))
    )
    overridden = DistillConfig(arch="gentle-resnet8", lr=0.1, channels_last=True, precise_bn=True)
    line = chance_warning([epoch(2.3, 0.1), epoch(0.9, 0.1)], 10, 6000, overridden)
    assert line.endswith("train with gentle-resnet8's recipe (lr=0.02): drop the flags or config keys that override it")
    kept = DistillConfig(arch="gentle-resnet8", lr=0.02, channels_last=False, precise_bn=True)  # speed only
    assert chance_warning([epoch(2.3, 0.1), epoch(0.9, 0.1)], 10, 6000, kept).endswith("warmup_epochs=1)")


TINY = dict(method="vanilla", arch="resnet8", students=1, dataset="synthetic", batch_size=16, eval_batch_size=64)
# 128 validation images of 4 classes: the chance band is 3 * sqrt(0.25 * 0.75 / 128) = 11.5 points around 25%
BIGGER_VAL = dict(data_options={"n_train": 256}, val_split=0.5)


def test_a_healthy_run_is_not_warned(tmp_path):
    lines: list[str] = []
    fit(DistillConfig(**TINY, **BIGGER_VAL, epochs=2, lr=0.05), RunDir(tmp_path / "r"), echo=lines.append)
    assert (
        len(lines) == 2
        and lines[0].startswith("epoch 1/2")
        and lines[1].startswith("epoch 2/2")
        and not any("warning" in line for line in lines)
    )


def test_a_run_at_chance_is_warned_once(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "evaluate", lambda s, loader: {"student:0": {"top1": 0.25, "top5": 1.0, "loss": 1.4}})
    losses = iter([2.3, 0.9, 0.5])
    real_epoch = trainer.train_epoch
    monkeypatch.setattr(trainer, "train_epoch", lambda *a: {**real_epoch(*a), "train": {"loss": next(losses)}})
    lines: list[str] = []
    fit(DistillConfig(**TINY, **BIGGER_VAL, epochs=3, lr=0.05), RunDir(tmp_path / "r"), echo=lines.append)
    warnings = [line for line in lines if line.startswith("warning: validation top-1 25.00% is at chance (1/4)")]
    assert len(warnings) == 1 and lines.index(warnings[0]) == 2  # after epoch 2's line, not again after epoch 3
