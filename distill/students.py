"""N students trained together, in one of two layouts, and how each extracts to a plain network.

- `peers`: N independent backbones, of one architecture or one each (`--arch resnet8,mobilenetv2`: only for
  methods that couple students through their logits alone, `Method.mixed_archs`).
- `branches`: one shared trunk (stem + all stages but the last) and N branches (a copy of the last stage and
  the classifier each) (ONE, PCL, MBDE). Branch i plus the trunk extracts to a plain backbone.

`extract(i)` always returns a standalone `Backbone` of student i's architecture: the only thing select and
export ever see. timm/torchvision architectures (distill/models/external.py) have no stages to split, so they
come only as peers; their first forward pass turns an input they cannot take into one line naming the shape.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from okdpipe.distill.models import Backbone, create_model
from okdpipe.distill.models.external import first_line, is_external
from okdpipe.errors import OkdpipeError

Archs = Union[str, Sequence[str]]  # one architecture for every student, or one per student


@dataclass
class StudentOutputs:
    """What one forward pass of all students produced.

    logits:   [N, B, K]
    features: per student, pooled features [B, d] (only when asked)
    stages:   per student, the list of stage maps (only when asked)
    trunk:    `branches` layout only: the shared trunk's output map, per view
    """

    logits: torch.Tensor
    features: Optional[list[torch.Tensor]] = None
    stages: Optional[list[list[torch.Tensor]]] = None
    trunk: list[torch.Tensor] = field(default_factory=list)


class Students(nn.Module):
    """The students of one run. Parameters live in `members` (peers) or `trunk` + `branches`."""

    def __init__(
        self,
        arch: Archs,
        count: int,
        num_classes: int,
        in_channels: int,
        layout: str = "peers",
        same_init: bool = False,
    ):
        """`arch`: one architecture for every student, or a list with one per student (peers layout only)."""
        super().__init__()
        if layout not in ("peers", "branches"):
            raise ValueError(f"unknown student layout {layout!r}")
        self.archs = per_student(arch, count)
        self.arch = arch_label(self.archs)
        if layout == "branches" and len(set(self.archs)) > 1:
            raise OkdpipeError(f"--arch {self.arch}: a shared trunk needs every student of one architecture")
        if layout == "branches" and is_external(self.archs[0]):
            raise OkdpipeError(
                f"--arch {self.arch}: shared-trunk methods (one, pcl, mbde) split a backbone into okdpipe's stem and "
                "stages, which timm/torchvision models do not have; use a peers method (vanilla, dml, okdph) "
                "or an okdpipe backbone"
            )
        self.count, self.layout = count, layout
        self._input_checked = not any(is_external(name) for name in self.archs)
        self.channels_last = False
        self.num_classes, self.in_channels = num_classes, in_channels
        first = self._new_backbone(0)
        others = [copy.deepcopy(first) if same_init else self._new_backbone(i) for i in range(1, count)]
        if layout == "peers":
            self.members = nn.ModuleList([first, *others])
        else:
            self.trunk = nn.ModuleDict({"stem": first.stem, "stages": nn.ModuleList(first.stages[:-1])})
            self.branches = nn.ModuleList(
                nn.ModuleDict({"stage": b.stages[-1], "classifier": b.classifier}) for b in [first, *others]
            )
            self._template = [first]  # kept out of the module tree: only pool() and the layout are used

    def _new_backbone(self, i: int) -> Backbone:
        return create_model(self.archs[i], num_classes=self.num_classes, in_channels=self.in_channels)

    def forward(self, views: torch.Tensor, features: bool = False, stages: bool = False) -> StudentOutputs:
        """views: [V, B, C, H, W]; V = 1: every student sees view 0; V >= N: student i sees view i
        (a method may ask for more views than students, e.g. OKDPH's hybrid gets one of its own)."""
        if views.shape[0] != 1 and views.shape[0] < self.count:
            raise ValueError(f"expected 1 or at least {self.count} views, got {views.shape[0]}")
        if not self._input_checked:
            return self._first_external_forward(views, features, stages)
        if self.layout == "peers":
            return self._forward_peers(views, features, stages)
        return self._forward_branches(views, features, stages)

    def _first_external_forward(self, views, features, stages) -> StudentOutputs:
        """A library model may need a fixed input size (ViT, Swin) or a minimum one: say so in one line instead
        of the library's traceback (a later forward pass runs unguarded)."""
        try:
            out = self._forward_peers(views, features, stages)
        except (RuntimeError, ValueError, AssertionError) as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            shape = "x".join(map(str, views.shape[-3:]))
            raise OkdpipeError(
                f"--arch {self.arch} cannot take this dataset's {shape} (CxHxW) images ({first_line(exc)}); "
                "choose a model without a fixed input size or a dataset of the size it needs"
            ) from None
        self._input_checked = True
        return out

    def _view(self, views: torch.Tensor, i: int) -> torch.Tensor:
        view = views[i] if views.shape[0] > 1 else views[0]
        return view.contiguous(memory_format=torch.channels_last) if self.channels_last else view

    def _forward_peers(self, views, features, stages) -> StudentOutputs:
        logits, pooled, maps = [], [], []
        for i, member in enumerate(self.members):
            fmap, stage_maps = member.forward_features(self._view(views, i), return_stages=True)
            feat = member.pool(fmap)
            logits.append(member.classifier(feat))
            pooled.append(feat)
            maps.append(stage_maps)
        return StudentOutputs(torch.stack(logits), pooled if features else None, maps if stages else None)

    def run_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.trunk["stem"](x)
        maps = []
        for stage in self.trunk["stages"]:
            out = stage(out)
            maps.append(out)
        return out, maps

    def _forward_branches(self, views, features, stages) -> StudentOutputs:
        pool = self._template[0].pool
        trunks = [self.run_trunk(self._view(views, i)) for i in range(1 if views.shape[0] == 1 else self.count)]
        logits, pooled, maps = [], [], []
        for i, branch in enumerate(self.branches):
            trunk_map, trunk_stages = trunks[i] if len(trunks) > 1 else trunks[0]
            fmap = branch["stage"](trunk_map)
            feat = pool(fmap)
            logits.append(branch["classifier"](feat))
            pooled.append(feat)
            maps.append([*trunk_stages, fmap])
        return StudentOutputs(
            torch.stack(logits), pooled if features else None, maps if stages else None, trunk=[t[0] for t in trunks]
        )

    def extract(self, i: int) -> Backbone:
        """Student i as a standalone network of its own architecture (a copy: training is unaffected)."""
        if not 0 <= i < self.count:
            raise IndexError(f"student {i} does not exist (0..{self.count - 1})")
        if self.layout == "peers":
            return copy.deepcopy(self.members[i])
        net = self._new_backbone(i).to(next(self.parameters()).device)
        net.load_state_dict(self.member_state(i))
        return net

    def load_member_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Set every student from a state dict under the plain backbone's keys (the inverse of member_state);
        in the branches layout the trunk is shared, so it takes student 0's trunk entries."""
        if len(states) != self.count:
            raise ValueError(f"expected {self.count} student states, got {len(states)}")
        if self.layout == "peers":
            for member, state in zip(self.members, states):
                member.load_state_dict(state)
            return
        last = len(self.trunk["stages"])
        trunk = {k: v for k, v in states[0].items() if not k.startswith(("classifier.", f"stages.{last}."))}
        self.trunk.load_state_dict(trunk)
        for branch, state in zip(self.branches, states):
            branch["stage"].load_state_dict(_under(state, f"stages.{last}."))
            branch["classifier"].load_state_dict(_under(state, "classifier."))

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Student i's state dict under the plain backbone's keys (stem.*, stages.<k>.*, classifier.*)."""
        if self.layout == "peers":
            return self.members[i].state_dict()
        last = len(self.trunk["stages"])
        state = {f"stem.{k}": v for k, v in self.trunk["stem"].state_dict().items()}
        state.update({f"stages.{k}": v for k, v in self.trunk["stages"].state_dict().items()})
        state.update({f"stages.{last}.{k}": v for k, v in self.branches[i]["stage"].state_dict().items()})
        state.update({f"classifier.{k}": v for k, v in self.branches[i]["classifier"].state_dict().items()})
        return state


def per_student(arch: Archs, count: int) -> list[str]:
    """One architecture name per student from one name (every student) or a list of `count` names."""
    names = [arch] * count if isinstance(arch, str) else list(arch)
    if len(names) != count:
        raise ValueError(f"expected {count} architectures, one per student, got {len(names)}: {names}")
    return names


def arch_label(archs: Sequence[str]) -> str:
    """How a config names these students' architectures: the one name, or the names joined by commas."""
    return archs[0] if len(set(archs)) == 1 else ",".join(archs)


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
