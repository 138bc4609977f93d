"""The one interface every distillation method implements, and the registry `--method` reads.

A method is a small class: typed hyperparameters (`Hparams`, paper defaults), a student layout, what outputs it
needs, whether each student gets its own augmented view, and `step`, which turns one batch's outputs into a
loss dict. Optional hooks run after the optimiser step (EMA, weight averaging, fusion), offer extra shippable
models (`candidates`) and name outputs that are only scored for reference (`reference_logits`). Auxiliary modules
(gates, fusion modules, decoders) are registered on the method: they are trained and checkpointed, never shipped.
`fit()` never branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from okdpipe.errors import OkdpipeError
from okdpipe.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


class Hparams(BaseModel):
    """Base for method hyperparameters: unknown keys are errors, and so is a NaN or infinite value."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


@dataclass
class Candidate:
    """An extra shippable plain network. Weight-averaged ones need their BatchNorm statistics recomputed
    on training data before use (averaging weights invalidates the running statistics)."""

    model: nn.Module
    weight_averaged: bool = False


@dataclass
class StepContext:
    """Where training is: `epoch` is fractional (epoch index + fraction done), for per-step ramps."""

    epoch: float
    step: int
    total_epochs: int
    steps_per_epoch: int
    generator: torch.Generator  # seeded from (seed, epoch): method randomness replays exactly on resume


class Method(nn.Module):
    """Base class. Subclasses set the class variables and implement `step`."""

    Params: ClassVar[type[Hparams]] = Hparams
    layout: ClassVar[str] = "peers"  # or "branches"
    default_students: ClassVar[int] = 1
    min_students: ClassVar[int] = 1
    needs_features: ClassVar[bool] = False
    needs_stages: ClassVar[bool] = False
    per_student_views: ClassVar[bool] = False
    augment_policy: ClassVar[str] = "same"  # per-view augmentation kinds (datasets/views.py): "same" or "okdph"
    same_init: ClassVar[bool] = False
    fusable: ClassVar[bool] = False  # peers layout and never reads students.members (see distill/fused.py)
    # Peers of different architectures (`--arch resnet8,mobilenetv2`): only for a method that couples its students
    # through their logits alone; any other may say in `single_arch_reason` why it needs one architecture.
    mixed_archs: ClassVar[bool] = False
    single_arch_reason: ClassVar[str] = ""  # "" = the layout's reason (see check_archs)
    # What the method's paper ships, named in messages and the README's method table; `select --strategy auto`
    # still ships whichever candidate validates best.
    ships: ClassVar[str] = "best-student"
    # Optimiser settings the method's paper trains with, used wherever config, flags and --set leave the key unset
    # (keys: okdpipe.config.OPTIMIZER_KEYS = optimizer, momentum, weight_decay); the manifest records the result.
    optimizer_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, students, hp: Hparams, num_classes: int):
        super().__init__()
        # Students are owned by the trainer, not registered here, so the method's state dict holds only
        # auxiliary modules and method state.
        self.__dict__["students"] = students
        self.hp = hp
        self.num_classes = num_classes

    @classmethod
    def check_archs(cls, name: str, archs: list[str]) -> None:
        """One line, before anything is built, when `archs` (one per student) differ and the method cannot mix them."""
        if len(set(archs)) <= 1 or cls.mixed_archs:
            return
        reason = cls.single_arch_reason or (
            "its branches share one trunk (the backbone's stem and all stages but the last)"
            if cls.layout == "branches"
            else "it does not declare that it allows them (Method.mixed_archs)"
        )
        raise OkdpipeError(
            f"--method {name} cannot train peers of different architectures ({','.join(archs)}): {reason}; "
            "use dml or vanilla, or one --arch for every student"
        )

    def step(self, views: torch.Tensor, labels: torch.Tensor, out, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar to backpropagate, "<term>/s<i>": detached scalars for logging}."""
        raise NotImplementedError

    def num_views(self, students: int) -> int:
        """Augmented views per batch: 1 shared view, or one per student when the method asks."""
        return students if self.per_student_views else 1

    def param_groups(self) -> list[dict]:
        """Auxiliary parameters for the main optimiser, with per-group overrides (e.g. weight_decay)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimisers the method owns (e.g. FFSD's Adam decoders); the trainer steps and checkpoints them."""
        return []

    def after_step(self, ctx: StepContext) -> None:
        """Runs after every optimiser step (EMA updates, weight fusion)."""

    def candidates(self) -> dict[str, Candidate]:
        """Extra shippable plain networks beyond the students (mean teachers, hybrid, leader), by name.

        Each is a fresh standalone backbone of the students' architecture (e.g. `students.extract(i)` or a
        deep copy): the caller may recalibrate or move it without touching training state."""
        return {}

    def ensemble_logits(self, out) -> torch.Tensor:
        """The reference ensemble the shipped student approaches: mean of the students' logits."""
        return out.logits.mean(0)

    def reference_logits(self, views: torch.Tensor, out) -> dict[str, torch.Tensor]:
        """Other outputs scored every epoch for reference, by name, but never shipped: they need auxiliary
        modules or several networks (FFSD's fusion head, PCL's ensemble of mean teachers)."""
        return {}
