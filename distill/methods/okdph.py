"""OKDPH: Online Knowledge Distillation with Parameter Hybridization (Zhang et al., CVPR 2023).

N same-initialised peers (2 to 4), each on its own augmented view. Every batch a hybrid-weight model (HWM) is
built from the students' weights and runs on a view of its own (`views[N]`):

    r ~ Dirichlet(1_N),  theta_h = sum_m r_m theta_m  (BN buffers: the same weighted average, no grad)
    z_en = (sum_m z_m + z_h) / (N + 1)                                      (detached)
    L = sum_m [omega * CE(z_m, y) + beta * KD(z_m <- z_en)] + (1 - omega) * CE(z_h, y),   T = 4

The HWM runs in train mode (batch statistics), through `torch.func.functional_call` on one student's module tree
as the template, with freshly averaged BN buffers: its forward never touches a student's own running statistics.
Fused students (`--fused`, distill/fused.py) average their grouped tensors per student slice and run the HWM
on a meta-device skeleton; the loop's `Students` go through `LoopPeers`, which offers the same three operations.

- Paper mode (default, `hwm_grad=True`, `dirichlet=True`): theta_h is built from the live parameters, so
  CE(z_h) sends r_m * dCE/dtheta_h into student m, as the paper's objective states.
- Code mode (`hwm_grad=False`, `dirichlet=False`): the official code copies detached weights into a separate
  module (CE(z_h) gives the students no gradient) and, its Dirichlet branch being broken, uses r = 1/N.

Fusion (after the optimiser step, at the end of every `interval` epochs or batches):
theta_m <- gamma * theta_avg + (1 - gamma) * theta_m over parameters and floating-point BN buffers, with
theta_avg the uniform average of the students, as one `torch._foreach_lerp_(theta_m, theta_avg, gamma)` (the same
value, several times faster than a multiply and add per tensor); optimiser momentum is left alone. With the batch
unit we count global steps (the official code counts batches within an epoch, fusing at batch 0 too).

Logged: the weighted summands of L ("ce/s<i>", "kd/s<i>", "ce/hybrid") and the batch's hybrid weights ("r/s<i>").
Ships: the hybrid (uniform average of the students, BN statistics recomputed on training data by the trainer)
or the best student, whichever validates better ("hybrid-or-best").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from okdpipe.distill.fused import FusedStudents
from okdpipe.distill.losses import kd
from okdpipe.distill.methods.base import METHODS, Candidate, Hparams, Method
from okdpipe.errors import OkdpipeError

MAX_STUDENTS = 4  # the paper studies 2 to 4 peers


class OKDPHParams(Hparams):
    omega: float = Field(
        0.8, ge=0.0, le=1.0, description="weight of each student's CE; the hybrid's CE gets 1 - omega (paper: 0.8)"
    )
    beta: float = Field(0.8, ge=0.0, description="weight of each student's KD from the ensemble z_en (paper: 0.8)")
    gamma: float = Field(
        0.5, ge=0.0, le=1.0, description="fusion ratio: theta_m <- gamma*theta_avg + (1-gamma)*theta_m (paper: 0.5)"
    )
    interval: int = Field(1, ge=1, description="fuse every `interval` interval_units (paper: 1 epoch)")
    interval_unit: Literal["epoch", "batch"] = Field("epoch", description="unit of `interval`: epoch or batch")
    temperature: float = Field(4.0, gt=0.0, description="KD temperature T (paper: 4)")
    hwm_grad: bool = Field(
        True,
        description="paper: CE(z_h) trains the students through theta_h; "
        "false = official code (hybrid from detached weights)",
    )
    dirichlet: bool = Field(True, description="paper: r ~ Dirichlet(1) per batch; false = official code (r = 1/N)")


def dirichlet_ones(count: int, generator: torch.Generator) -> torch.Tensor:
    """r ~ Dirichlet(1_N) as normalised Exponential(1) draws, -log(1 - U) (1 - U avoids log(0))."""
    draws = -torch.log1p(-torch.rand(count, generator=generator, dtype=torch.float64))
    return (draws / draws.sum()).float()


def blend(states: Sequence[dict[str, torch.Tensor]], weights) -> dict[str, torch.Tensor]:
    """sum_m w_m * state_m[k] for floating-point entries; integer ones (num_batches_tracked) copied from the
    first. Differentiable in the states and weights when grad mode is on."""
    return {
        key: sum(w * state[key] for w, state in zip(weights, states))
        if value.dtype.is_floating_point
        else value.clone()
        for key, value in states[0].items()
    }


class LoopPeers:
    """`FusedStudents`' weight-averaging operations (skeleton, blend, lerp_members_) on the loop's per-student
    modules, so OKDPH reads the students one way whichever container holds them."""

    def __init__(self, students):
        self.members = students.members

    @property
    def skeleton(self) -> torch.nn.Module:
        return self.members[0]

    def blend(self, weights: torch.Tensor, grad: bool = False) -> dict[str, torch.Tensor]:
        """sum_m w_m theta_m: parameters differentiable in the students when `grad`, buffers never."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            params = blend([dict(m.named_parameters()) for m in self.members], weights)
        with torch.no_grad():
            buffers = blend([dict(m.named_buffers()) for m in self.members], weights)
        return {**params, **buffers}

    @torch.no_grad()
    def lerp_members_(self, target: dict[str, torch.Tensor], weight: float) -> None:
        """theta_m <- theta_m + weight * (target - theta_m), every student and floating-point entry, one launch."""
        keys = [key for key, value in target.items() if value.dtype.is_floating_point]
        states = [m.state_dict() for m in self.members]
        torch._foreach_lerp_([s[k] for s in states for k in keys], [target[k] for _ in states for k in keys], weight)


@METHODS.register("okdph")
class OKDPH(Method):
    """Peers + a per-batch hybrid-weight model; see the module docstring for the objective and modes."""

    Params = OKDPHParams
    layout = "peers"
    default_students = 2
    min_students = 2
    per_student_views = True
    same_init = True
    single_arch_reason = "it averages the students' weights (the hybrid and the weight fusion), parameter by parameter"
    augment_policy = "okdph"  # each model its own augmentation kind, as the official code (datasets/views.py)
    fusable = True
    ships = "hybrid-or-best"

    def __init__(self, students, hp: OKDPHParams, num_classes: int):
        super().__init__(students, hp, num_classes)
        if students.count > MAX_STUDENTS:
            raise OkdpipeError(
                f"--method okdph takes 2 to {MAX_STUDENTS} students (as in the paper), "
                f"got {students.count}; pass --students 2, 3 or 4"
            )

    def num_views(self, students: int) -> int:
        """One view per student plus one for the hybrid (views[N])."""
        return students + 1

    def hybrid_weights(self, generator: torch.Generator) -> torch.Tensor:
        count = self.students.count
        return dirichlet_ones(count, generator) if self.hp.dirichlet else torch.full((count,), 1.0 / count)

    @property
    def peers(self):
        """The students' weight-averaging operations: fused students have them, the loop's get `LoopPeers`."""
        return self.students if isinstance(self.students, FusedStudents) else LoopPeers(self.students)

    def hybrid_logits(self, view: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """z_h from theta_h = sum_m r_m theta_m, in train mode, with freshly averaged BN buffers (the train-mode
        forward updates those copies in place, never a student's own running statistics)."""
        peers = self.peers
        return functional_call(peers.skeleton, peers.blend(weights, grad=self.hp.hwm_grad), (view,))

    def step(self, views, labels, out, ctx):
        count = self.students.count
        weights = self.hybrid_weights(ctx.generator).to(views.device)
        hybrid_view = views[count] if views.shape[0] > count else views[0]
        z_hybrid = self.hybrid_logits(hybrid_view, weights)
        z_ensemble = ((out.logits.sum(0) + z_hybrid) / (count + 1)).detach()
        terms = {"ce/hybrid": (1.0 - self.hp.omega) * F.cross_entropy(z_hybrid, labels)}
        for i, z in enumerate(out.logits):
            terms[f"ce/s{i}"] = self.hp.omega * F.cross_entropy(z, labels)
            terms[f"kd/s{i}"] = self.hp.beta * kd(z, z_ensemble, self.hp.temperature)
        logged = {key: value.detach() for key, value in terms.items()}
        return {"loss": sum(terms.values()), **logged, **{f"r/s{i}": w for i, w in enumerate(weights)}}

    def fusion_due(self, ctx) -> bool:
        """True after the last step of every `interval`-th epoch (or every `interval`-th batch)."""
        if self.hp.interval_unit == "batch":
            return (ctx.step + 1) % self.hp.interval == 0
        epoch_index, position = divmod(ctx.step, ctx.steps_per_epoch)
        return position == ctx.steps_per_epoch - 1 and (epoch_index + 1) % self.hp.interval == 0

    def after_step(self, ctx) -> None:
        if self.fusion_due(ctx):
            self.fuse()

    @torch.no_grad()
    def fuse(self) -> None:
        """theta_m <- gamma * theta_avg + (1 - gamma) * theta_m (parameters and float buffers, in place)."""
        self.peers.lerp_members_(self.uniform_average(), self.hp.gamma)

    @torch.no_grad()
    def uniform_average(self) -> dict[str, torch.Tensor]:
        """(1/N) sum_m theta_m (float64 weights: cast to the students' dtype, 1/3 is not rounded to float32)."""
        count = self.students.count
        return self.peers.blend(torch.full((count,), 1.0 / count, dtype=torch.float64))

    def candidates(self) -> dict[str, Candidate]:
        """ "hybrid": the uniform weight average as a fresh backbone (its BN statistics need recomputing)."""
        hybrid = self.students.extract(0)
        hybrid.load_state_dict(self.uniform_average())
        return {"hybrid": Candidate(hybrid, weight_averaged=True)}
