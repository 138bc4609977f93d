"""Accuracy of students, their ensemble and a method's extra candidates on one split."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn


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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, max_batches: int) -> nn.Module:
    """Recompute BatchNorm running statistics as a cumulative average over up to `max_batches` batches
    (as SWA's bn_update does): weight averaging invalidates the averaged running statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average
    model.train()
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        model(batch.views[0])
    return model.eval()


@torch.no_grad()
def evaluate_run(students, method, batches: Iterable, autocast,
                 calibrate: Callable[[nn.Module], nn.Module]) -> dict[str, dict[str, float]]:
    """Every student, the method's ensemble, its reference outputs and every extra candidate, in one pass over
    `batches`.
    Weight-averaged candidates get their BatchNorm statistics recomputed by `calibrate` first."""
    was_training = students.training
    students.eval()
    method.eval()
    candidates = {name: calibrate(c.model) if c.weight_averaged else c.model.eval()
                  for name, c in method.candidates().items()}
    meters: dict[str, Accuracy] = defaultdict(Accuracy)
    try:
        for batch in batches:
            with autocast():
                out = students(batch.views, features=method.needs_features, stages=method.needs_stages)
                extra = {"ensemble": method.ensemble_logits(out), **method.reference_logits(batch.views, out),
                         **{name: model(batch.views[0]) for name, model in candidates.items()}}
            for i, logits in enumerate(out.logits):
                meters[f"student:{i}"].update(logits, batch.labels)
            for name, logits in extra.items():
                meters[name].update(logits, batch.labels)
    finally:
        students.train(was_training)
        method.train(was_training)
    return {name: meter.result() for name, meter in meters.items()}
