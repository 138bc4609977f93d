"""A run that trains but does not learn what it is scored on says so, once, with the likely cause and the fix.

The case it catches (issue 17): MobileNetV2 at lr 0.1 without warm-up on 2,000 Fashion-MNIST images, where the
training loss falls from 2.3 to 0.9 while validation stays at exactly 10%: in train mode (batch statistics) the
same weights score 66%, so the running BatchNorm statistics used in eval mode lag far behind the weights.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from okdpipe.config import DistillConfig
from okdpipe.distill.models import backbone_recipe

CHANCE_BAND = 0.02  # validation top-1 this close to chance (a fraction) is no evidence of learning, at any size
LOSS_FALL = 0.8  # the training loss has "fallen clearly" at or below this fraction of the first epoch's


def chance_band(num_classes: int, val_size: int) -> float:
    """Half-width of "within noise of chance": the larger of 2 points and 3 standard deviations of a guessing
    classifier's accuracy on `val_size` images (binomial, p = 1/num_classes)."""
    p = 1 / num_classes
    return max(CHANCE_BAND, 3 * math.sqrt(p * (1 - p) / max(val_size, 1)))


def chance_warning(history: list[dict[str, Any]], num_classes: int, val_size: int, cfg: DistillConfig) -> Optional[str]:
    """One line when the latest epoch's best student scores chance on validation while the mean training loss
    has fallen clearly since the first epoch; None otherwise: always for a first epoch (nothing to compare), and
    for a validation split too small to tell chance from twice chance (a band wider than 1/num_classes)."""
    band = chance_band(num_classes, val_size)
    if len(history) < 2 or band >= 1 / num_classes:
        return None
    first, last = history[0]["train"]["loss"], history[-1]["train"]["loss"]
    top1 = max(v["top1"] for k, v in history[-1]["val"].items() if k.startswith("student:"))
    if last > LOSS_FALL * first or abs(top1 - 1 / num_classes) > band:
        return None
    return (
        f"warning: validation top-1 {top1:.2%} is at chance (1/{num_classes}) while the training loss fell from "
        f"{first:.3f} to {last:.3f}: the BatchNorm running statistics likely lag the weights, the learning rate "
        f"({cfg.lr:g}) being too high for {cfg.arch}; {fix(cfg)}"
    )


def fix(cfg: DistillConfig) -> str:
    """The suggested change: PreciseBN where it is off (it recovers what the lagging running statistics hide),
    then the backbone's recipe where the user overrode its lr or warm-up, else more steps or a halved, warmed-up
    learning rate (more steps is what measurably helps MobileNetV2, see its module)."""
    if not cfg.precise_bn:
        return "evaluate with recomputed BatchNorm statistics (--set precise_bn=true) and give it more steps"
    tuned = {k: v for k, v in backbone_recipe(cfg.arch).items() if k in ("lr", "warmup_epochs")}
    if any(getattr(cfg, key) != value for key, value in tuned.items()):
        shown = " ".join(f"{key}={value}" for key, value in tuned.items())
        return f"train with {cfg.arch}'s recipe ({shown}): drop the flags or config keys that override it"
    return (
        "give it more steps (more --epochs or --train-subset, or a smaller --batch-size) or a gentler start "
        f"(--lr {cfg.lr / 2:g} --set warmup_epochs={max(1.0, 2 * cfg.warmup_epochs):g})"
    )
