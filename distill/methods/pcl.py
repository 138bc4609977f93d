"""PCL -- Peer Collaborative Learning for online KD (Wu & Gong, AAAI 2021), Sec. 3, Eq. 1-7.

Multi-branch (layout `branches`), N = 3 peers, and each peer gets its own augmented view of the batch (the
trunk runs once per view). Two teachers:

- Peer ensemble teacher: one Linear(N*d -> classes) on the concatenated pooled features of the peers (no BN,
  no ReLU), logits z_e. Its features are NOT detached for CE(z_e): that term trains the peers and the trunk too.
- Peer mean teacher: a temporal mean (EMA) copy of the whole multi-branch network, registered on the method
  (checkpointed, requires_grad False, never back-propagated). After every optimiser step
  theta' <- a theta' + (1 - a) theta with a = min(1 - 1/(step+1), 0.999), step the global optimiser step (it
  never restarts at an epoch), over the parameters, as one fused `torch._foreach_lerp_`. Its BatchNorm
  statistics must fit its own (averaged) weights, so we follow the public PCL reproduction and Mean Teacher
  (Tarvainen & Valpola 2017, github.com/CuriousAI/mean-teacher: `ema_model.train()`, EMA over
  `parameters()` only): during training the mean teacher runs in train mode, i.e. with batch statistics, and
  its running statistics follow its own forwards. Its logits z'_l (peer l on view l) come from that no_grad
  forward. As a shipped or scored candidate it is weight-averaged: select and every evaluation recompute its
  BatchNorm statistics on training images first. `ema_buffers=true` is okdpipe's earlier reading instead:
  the BN buffers are averaged too and the mean teacher runs in eval mode on them (statistics of other
  weights: recomputing them raised the mean teacher's validation accuracy by 14-17 points at epoch 3 of a
  short Fashion-MNIST run, issue 14).

    L = CE(z_e) + sum_j CE(z_j) + w(e) [ sum_j KD(z_j <- z_e) + sum_j 1/(N-1) sum_{l != j} KD(z_j <- z'_l) ]

T = 3, ramp w(e) over L = 80/300 of the run (the epoch is divided by the ramp length, not by the weight as a
public reproduction does). Teachers are detached inside the KD. Ships: the mean teacher's trunk + peer 1
(candidate "mean-teacher:0"); every mean-teacher peer is a candidate, the reported `ensemble` is z_e, and
PCL-E, the mean of the mean-teacher peers' logits, is reported as "mean-teacher-ensemble".
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from okdpipe.distill.methods.base import METHODS, Candidate, Method
from okdpipe.distill.methods.dml import mutual_kd
from okdpipe.distill.methods.one import EnsembleKDParams, ensemble_kd_terms, kd_weight, loss_dict


class PCLParams(EnsembleKDParams):
    ema_decay: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="cap of the mean teacher's decay "
        "a = min(1 - 1/(step+1), cap) (paper: 0.999, a horizon "
        "of about 1/(1-cap) = 1,000 steps; short runs want a "
        "shorter one, see RESULTS.md)",
    )
    ema_buffers: bool = Field(
        False,
        description="false: EMA of the parameters, batch statistics during training "
        "(public reproduction, Mean Teacher); true: average the BN buffers "
        "too and run the mean teacher in eval mode on them",
    )


def mean_teacher_decay(step: int, cap: float) -> float:
    """a = min(1 - 1/(step+1), cap), `step` the global optimiser step: the first update copies the students,
    then a true running mean until the cap (Tarvainen & Valpola 2017's warm-up)."""
    return min(1.0 - 1.0 / (step + 1), cap)


@torch.no_grad()
def lerp_towards(targets: list[torch.Tensor], sources: list[torch.Tensor], decay: float) -> None:
    """targets <- decay * targets + (1 - decay) * sources, i.e. lerp(target, source, 1 - decay), fused over
    the list (one `torch._foreach_lerp_`: about 2x faster than a per-tensor loop on 2 CPU cores, BENCHMARKS.md)."""
    if targets:
        torch._foreach_lerp_(targets, sources, 1.0 - decay)


def ema_entries(module: nn.Module, buffers: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(floating-point entries averaged, integer entries copied): the parameters, plus the buffers if asked."""
    entries = list(module.state_dict(keep_vars=True).values()) if buffers else list(module.parameters())
    return [t for t in entries if t.dtype.is_floating_point], [t for t in entries if not t.dtype.is_floating_point]


class MeanTeacherUpdate:
    """The mean teacher's update (module docstring) over tensor lists gathered once: walking the module trees
    every step costs more than the fused lerp itself. Training updates tensors in place (optimiser steps,
    load_state_dict, moving to the device they are on), so the lists stay valid."""

    def __init__(self, target: nn.Module, source: nn.Module, buffers: bool):
        (self.averaged, self.copied), (self.live, self.live_copied) = (
            ema_entries(target, buffers),
            ema_entries(source, buffers),
        )

    @torch.no_grad()
    def __call__(self, decay: float) -> None:
        """Float entries lerp towards the students; integer buffers (num_batches_tracked) are copied."""
        lerp_towards(self.averaged, self.live, decay)
        for t, s in zip(self.copied, self.live_copied):
            t.copy_(s)


@METHODS.register("pcl")
class PCL(Method):
    """Peers distil from the peer ensemble and from the other peers' temporal means (module docstring)."""

    Params = PCLParams
    optimizer_defaults = {"optimizer": "nesterov"}  # Wu & Gong 2021 (methods.md, Recipes)
    layout = "branches"
    default_students = 3
    min_students = 2
    needs_features = True
    per_student_views = True
    ships = "mean-teacher"

    def __init__(self, students, hp, num_classes):
        super().__init__(students, hp, num_classes)
        features = students.branches[0]["classifier"].in_features
        self.ensemble_head = nn.Linear(students.count * features, num_classes)
        self.mean_teacher = copy.deepcopy(students).requires_grad_(False)
        self.mean_teacher.train(not hp.ema_buffers)
        self._update: MeanTeacherUpdate | None = None  # gathered at the first update, on the final device

    def train(self, mode: bool = True):
        """The mean teacher follows the training mode (batch statistics), or stays in eval mode with averaged
        buffers when `ema_buffers` (see the module docstring)."""
        super().train(mode)
        self.mean_teacher.train(mode and not self.hp.ema_buffers)
        return self

    def ensemble_logits(self, out) -> torch.Tensor:
        return self.ensemble_head(torch.cat(out.features, dim=1))

    def reference_logits(self, views, out) -> dict[str, torch.Tensor]:
        """PCL-E: the mean of the mean teacher's peer logits, peer l on view l (a reference: N networks)."""
        return {"mean-teacher-ensemble": self.mean_teacher_logits(views).mean(0)}

    def step(self, views, labels, out, ctx):
        weight = kd_weight(ctx, self.hp.ramp_fraction)
        terms = ensemble_kd_terms(out.logits, self.ensemble_logits(out), labels, self.hp.temperature, weight)
        terms.update(self.mean_teacher_terms(views, out.logits, weight))
        return loss_dict(terms)

    def mean_teacher_terms(self, views, logits, weight: float) -> dict[str, torch.Tensor]:
        """w * 1/(N-1) sum_{l != j} KD(z_j <- z'_l) per peer j, z'_l = mean teacher's peer l on view l."""
        means = self.mean_teacher_logits(views)
        return {f"kd_mean/s{j}": weight * mutual_kd(z, means, j, self.hp.temperature) for j, z in enumerate(logits)}

    @torch.no_grad()
    def mean_teacher_logits(self, views) -> torch.Tensor:
        """z'_l of every mean-teacher peer l on view l (or all on view 0): [N, B, K], never back-propagated."""
        self.mean_teacher.channels_last = self.students.channels_last
        return self.mean_teacher(views).logits

    def after_step(self, ctx):
        if self._update is None:
            self._update = MeanTeacherUpdate(self.mean_teacher, self.students, self.hp.ema_buffers)
        self._update(mean_teacher_decay(ctx.step, self.hp.ema_decay))

    def candidates(self) -> dict[str, Candidate]:
        """Every mean-teacher peer, weight-averaged: its BN statistics are recomputed before it is scored."""
        return {
            f"mean-teacher:{i}": Candidate(self.mean_teacher.extract(i), weight_averaged=True)
            for i in range(self.mean_teacher.count)
        }
