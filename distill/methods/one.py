"""ONE -- On-the-fly Native Ensemble (Lan, Zhu & Gong, NeurIPS 2018), Eq. 1-5.

Multi-branch (layout `branches`): a shared trunk and N = 3 branches. A gate on the trunk output --
global pool -> Linear(C_trunk -> N) -> BatchNorm1d(N) -> ReLU -> softmax over branches -- weighs the branches'
logits per sample into the teacher z_e = sum_i g_i z_i (Eq. 2). The objective (Eq. 5) is

    L = sum_i CE(z_i, y) + CE(z_e, y) + w(e) * sum_i KD(z_i <- z_e),   T = 3,

with w(e) the ramp exp(-5 (1 - min(e, L)/L)^2), L = 80/300 of the run. z_e is detached inside the KD only:
CE(z_e) trains the gate, the branches and the trunk. The gate is registered on the method (trained and
checkpointed, never shipped). Ships: trunk + branch 1 (`student:0`); the gated ensemble ("ONE-E") is the
reported `ensemble`.

The gated-ensemble objective, its ramp and its hyperparameters are shared with PCL and MBDE (imported from here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from okdpipe.distill.losses import kd, ramp
from okdpipe.distill.methods.base import METHODS, Hparams, Method, StepContext
from okdpipe.distill.models import create_model


class EnsembleKDParams(Hparams):
    """Hyperparameters of the branch-ensemble objective (ONE, PCL, MBDE all use T = 3 and an 80/300 ramp)."""

    temperature: float = Field(3.0, gt=0, le=20, description="KD temperature T (papers: 3)")
    ramp_fraction: float = Field(
        80 / 300,
        ge=0,
        le=1,
        description="KD ramp-up length L as a fraction of the run (papers: 80 of 300 epochs); 0 disables the ramp",
    )


def kd_weight(ctx: StepContext, ramp_fraction: float) -> float:
    """w(e) at the current fractional epoch: the ramp length is converted from a fraction of the run to epochs
    (dividing the epoch by the length, never by the weight -- the bug in a public PCL reproduction)."""
    return ramp(ctx.epoch, ramp_fraction * ctx.total_epochs)


def global_pool(fmap: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C] by global average pooling, as the backbones pool before their classifier."""
    return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)


def weighted_ensemble(weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """z_e = sum_i g_i z_i per sample: weights [B, N], logits [N, B, K] -> [B, K]."""
    return torch.einsum("bn,nbk->bk", weights.to(logits.dtype), logits)


def ensemble_kd_terms(
    logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, weight: float
) -> dict[str, torch.Tensor]:
    """The terms of sum_j CE(z_j) + CE(z_e) + w * sum_j KD(z_j <- z_e) (ONE Eq. 5), each already weighted, so
    the loss is their sum. The teacher is detached inside the KD only."""
    terms = {f"ce/s{j}": F.cross_entropy(z, labels) for j, z in enumerate(logits)}
    terms["ce/ensemble"] = F.cross_entropy(teacher, labels)
    terms.update({f"kd/s{j}": weight * kd(z, teacher, temperature) for j, z in enumerate(logits)})
    return terms


def loss_dict(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"loss": sum of the terms, "<term>": detached term} as `Method.step` returns."""
    return {"loss": sum(terms.values()), **{k: v.detach() for k, v in terms.items()}}


def trunk_channels(students) -> int:
    """Channels of the trunk's output map (the second-to-last stage's width), read from a meta-device build of
    the architecture: no memory, no random draws."""
    with torch.device("meta"):
        template = create_model(students.arch, num_classes=students.num_classes, in_channels=students.in_channels)
    return template.stage_channels[-2]


class BranchGate(nn.Module):
    """ONE's gate (Eq. 2): global-pool(trunk map) -> Linear(C -> N) -> BatchNorm1d(N) -> ReLU -> softmax."""

    def __init__(self, channels: int, branches: int):
        super().__init__()
        self.linear = nn.Linear(channels, branches)
        self.norm = nn.BatchNorm1d(branches)

    def forward(self, trunk_map: torch.Tensor) -> torch.Tensor:
        return F.softmax(F.relu(self.norm(self.linear(global_pool(trunk_map)))), dim=1)


@METHODS.register("one")
class ONE(Method):
    """Branches distil from their gated ensemble (module docstring); the gate reads the single shared view."""

    Params = EnsembleKDParams
    layout = "branches"
    default_students = 3
    min_students = 2
    ships = "student:0"

    def __init__(self, students, hp, num_classes):
        super().__init__(students, hp, num_classes)
        self.gate = BranchGate(trunk_channels(students), students.count)

    def ensemble_logits(self, out) -> torch.Tensor:
        return weighted_ensemble(self.gate(out.trunk[0]), out.logits)

    def step(self, views, labels, out, ctx):
        teacher = self.ensemble_logits(out)
        weight = kd_weight(ctx, self.hp.ramp_fraction)
        return loss_dict(ensemble_kd_terms(out.logits, teacher, labels, self.hp.temperature, weight))
