"""`ensemble-kd`: each peer learns from the labels and from the peers' mean prediction.

    L = sum_i CE(z_i, y) + weight * sum_i KD_T(z_i <- mean_j z_j)

with the mean detached (a teacher, not a student), KD_T the temperature-softened KL divergence scaled by T^2
(`okdpipe.distill.losses.kd`). It reads only the logits, so any architecture trains with it, timm and
torchvision ones included, and peers of different architectures (`--arch resnet8,example_cnn`). A method is a
`Method` subclass with typed hyperparameters and one `step`.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from okdpipe.distill.losses import kd
from okdpipe.distill.methods import METHODS, Hparams, Method


class EnsembleKDParams(Hparams):
    temperature: float = Field(3.0, gt=0, le=20, description="KD temperature T")
    weight: float = Field(1.0, ge=0, description="weight of the KD term")


@METHODS.register("ensemble-kd")
class EnsembleKD(Method):
    """Peers distilling from their detached mean logits (module docstring)."""

    Params = EnsembleKDParams
    layout = "peers"
    mixed_archs = True  # logits-only coupling: the peers need not share an architecture
    default_students = 2
    min_students = 2

    def step(self, views, labels, out, ctx):
        teacher = out.logits.mean(0).detach()
        terms = {}
        for i, z in enumerate(out.logits):
            terms[f"ce/s{i}"] = F.cross_entropy(z, labels)
            terms[f"kd/s{i}"] = self.hp.weight * kd(z, teacher, self.hp.temperature)
        return {"loss": sum(terms.values()), **{k: v.detach() for k, v in terms.items()}}
