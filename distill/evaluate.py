"""Accuracy of students, their ensemble and a method's extra candidates on one split, and the BatchNorm
recalibration of weight-averaged candidates on a representative sample of training images."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from okdpipe.datasets.rng import cpu_generator

STREAM_BN_CALIBRATION = 100  # a stream tag of its own (datasets/rng.py's tags are 1-6): the sample never
# shares draws with the hold-out, subset, epoch order or augmentation of the same seed


class Accuracy:
    """Running top-1 / top-5 counts and mean cross-entropy over batches."""

    def __init__(self):
        self.correct1 = 0
        self.correct5 = 0
        self.loss_sum = 0.0
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        self.correct1 += int(hits[:, 0].sum())
        self.correct5 += int(hits.any(dim=1).sum())
        self.loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        self.count += labels.numel()

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"top1": self.correct1 / n, "top5": self.correct5 / n, "loss": self.loss_sum / n}


def calibration_indices(labels: torch.Tensor, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """`count` distinct indices (all, if fewer), class-balanced and shuffled, a pure function of `seed`.

    Each class's members are shuffled and dealt round-robin (rank r of every class before rank r + 1, the
    classes in a shuffled order), so the class counts differ by at most one until a class runs out; the drawn
    sample is then shuffled, so every calibration batch mixes classes. Files listed class by class (image
    folders, CINIC-10) would otherwise give BN the statistics of one or two classes (8-18 points, issue 14)."""
    generator = cpu_generator(seed, STREAM_BN_CALIBRATION)
    class_order = torch.randperm(num_classes, generator=generator)
    keys, members = [], []
    for position, c in enumerate(class_order.tolist()):
        found = torch.nonzero(labels == c).flatten()
        members.append(found[torch.randperm(len(found), generator=generator)])
        keys.append(torch.arange(len(found)) * num_classes + position)
    dealt = torch.cat(members)[torch.cat(keys).argsort()][:count]
    return dealt[torch.randperm(len(dealt), generator=generator)]


@dataclass
class CalibrationSample:
    """The training images BatchNorm statistics are recomputed on, and what selection.json records of them."""

    split: Any
    indices: torch.Tensor
    seed: int

    def record(self, num_classes: int) -> dict[str, Any]:
        labels = self.split.labels
        return {
            "seed": self.seed,
            "images": len(self.indices),
            "shuffled": True,
            "class_balanced": True,
            "per_class": torch.bincount(labels, minlength=num_classes).tolist(),
            "indices": self.indices.tolist(),
        }


def calibration_sample(split, count: int, num_classes: int, seed: int) -> CalibrationSample:
    """The seeded, shuffled, class-balanced sample of `split` (see `calibration_indices`)."""
    indices = calibration_indices(split.labels, count, num_classes, seed)
    return CalibrationSample(split.subset(indices), indices, seed)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, batches: Iterable, max_batches: int, forward: Callable[[nn.Module, Any], Any] | None = None
) -> nn.Module:
    """Recompute BatchNorm running statistics as a cumulative average over up to `max_batches` batches
    (as SWA's bn_update does; PreciseBN, Wu & Johnson 2021): weight averaging invalidates the averaged running
    statistics, and fast-moving weights outrun the running averages. `batches` should come from a
    `calibration_sample`, not the training files in order; `forward(model, batch)` runs one (default: the plain
    network on view 0). Each layer's momentum is restored, so training can go on from the new statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average
    model.train()
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        (forward or _plain_forward)(model, batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def _plain_forward(model: nn.Module, batch) -> None:
    model(batch.views[0])


@torch.no_grad()
def evaluate_run(
    students, method, batches: Iterable, autocast, calibrate: Callable[[nn.Module], nn.Module]
) -> dict[str, dict[str, float]]:
    """Every student, the method's ensemble, its reference outputs and every extra candidate, in one pass over
    `batches`.
    Weight-averaged candidates get their BatchNorm statistics recomputed by `calibrate` first."""
    was_training = students.training
    students.eval()
    method.eval()
    candidates = {
        name: calibrate(c.model) if c.weight_averaged else c.model.eval() for name, c in method.candidates().items()
    }
    meters: dict[str, Accuracy] = defaultdict(Accuracy)
    try:
        for batch in batches:
            with autocast():
                out = students(batch.views, features=method.needs_features, stages=method.needs_stages)
                extra = {
                    "ensemble": method.ensemble_logits(out),
                    **method.reference_logits(batch.views, out),
                    **{name: model(batch.views[0]) for name, model in candidates.items()},
                }
            for i, logits in enumerate(out.logits):
                meters[f"student:{i}"].update(logits, batch.labels)
            for name, logits in extra.items():
                meters[name].update(logits, batch.labels)
    finally:
        students.train(was_training)
        method.train(was_training)
    return {name: meter.result() for name, meter in meters.items()}
