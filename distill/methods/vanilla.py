"""Vanilla training: one network (or N independent ones) with cross-entropy only; the baseline."""

from __future__ import annotations

import torch.nn.functional as F

from okdpipe.distill.methods.base import METHODS, Method


@METHODS.register("vanilla")
class Vanilla(Method):
    """L = sum_i CE(z_i, y). With N > 1 the students are independent runs sharing a data order."""

    fusable = True
    mixed_archs = True  # independent students: nothing couples them

    def step(self, views, labels, out, ctx):
        losses = {f"ce/s{i}": F.cross_entropy(z, labels) for i, z in enumerate(out.logits)}
        total = sum(losses.values())
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}
