"""N same-architecture peer students computed as ONE network: the fast path for `peers` training.

Every Conv2d becomes one grouped conv with N times the channels and groups (student i owns channel block i),
every BatchNorm2d one BatchNorm2d over N*C channels (BN is per channel, so each student keeps exactly its own
batch statistics and running statistics), and the classifier one batched matmul. ReLUs, pools, dropout and
residual adds act per channel, so they fuse for free. Student i's input is channel block i of the stacked
views. One launch per layer instead of N: on a GPU this is what makes small CIFAR ResNets worth training
several at a time.

Why grouped convs, not torch.func (stack_module_state + functional_call + vmap): in torch 2.14 vmap does keep
BN running statistics when the stacked buffers are passed in (functorch's replace_all_batch_norm_modules_ is not
needed), but vmap's conv batching rule lowers to the same grouped conv anyway, while the params would live
outside any nn.Module (no plain state_dict, optimizer groups, channels_last or torch.compile of the module).
A plain module of grouped layers gets the same kernels with none of that machinery. Measured on this project's
CPU (resnet8, 3 students, batch 64, 28x28x1, forward + backward, 1 thread): loop 133 ms, grouped 153-190 ms,
vmap 224-272 ms; vmap's logits equal the grouped network's bit for bit.

Where it pays: a GPU running small CIFAR ResNets is bound by kernel launches and small, under-filled kernels;
one grouped launch per layer instead of N is the win there. On CPU oneDNN's grouped conv backward is slower than
N plain ones (benchmarks/train_throughput.py: about 10% slower for N >= 2), so the trainer should keep the
loop on CPU and use this container only where the benchmark shows it faster.

The students' optimisation is unchanged: SGD/AdamW and weight decay are element-wise and the global-norm
clip sees the same elements, so a fused run follows the loop's trajectory up to float rounding (dropout, if
an architecture has any, draws different masks).

Checkpoints: `state_dict()` uses the loop container's keys (`members.<i>.<backbone key>`), and
`load_state_dict` accepts them, so select, soups and a loop `Students` read a fused run's checkpoint as is.

Weight averaging (OKDPH's hybrid and fusion): `stacked` views every fused tensor as [N, ...] (entry i is student
i's), so a weighted average of the students is one multiply-and-sum per tensor (`blend`), and moving every student
towards a target is one `torch._foreach_lerp_` over those views (`lerp_members_`); the averaged network runs
through `torch.func.functional_call` on `skeleton`, a plain backbone on the meta device (no memory, no weights
of its own).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from okdpipe.distill.models import Backbone, create_model
from okdpipe.distill.models.cifar_resnet import ResidualBlock
from okdpipe.distill.models.mobilenetv2 import InvertedResidual
from okdpipe.distill.models.wide_resnet import WideBlock
from okdpipe.distill.students import Archs, StudentOutputs, Students, arch_label, per_student
from okdpipe.errors import OkdpipeError

MEMBER_PREFIX = "members."
NET_PREFIX = "net."

# Layers whose forward acts on each channel alone: they work unchanged on N stacked channel blocks.
CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
# Containers and blocks whose own forward only chains children and adds tensors of equal channel layout.
# Exact types only: a subclass may override forward with something that mixes channels (DenseNet's concat).
SEPARABLE_BLOCKS = (
    nn.Sequential,
    nn.ModuleList,
    Backbone,
    ResidualBlock,
    WideBlock,
    InvertedResidual,
    BasicBlock,
    Bottleneck,
)


class BatchedLinear(nn.Module):
    """N independent Linear(in, out) layers as one batched matmul: [B, N*in] -> [N, B, out].

    weight [N, out, in], bias [N, out]: entry i is student i's nn.Linear weight and bias."""

    def __init__(
        self,
        count: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
    ):
        super().__init__()
        self.count, self.in_features, self.out_features = count, in_features, out_features
        self.weight = nn.Parameter(torch.empty(count, out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.empty(count, out_features, device=device)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default per member: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_member = x.unflatten(1, (self.count, self.in_features)).transpose(0, 1)  # [N, B, in]
        if self.bias is None:
            return torch.bmm(per_member, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias[:, None, :], per_member, self.weight.transpose(1, 2))


def grouped_conv(conv: nn.Conv2d, count: int) -> nn.Conv2d:
    """conv for N students: block i of the output reads only block i of the input (groups x N)."""
    return nn.Conv2d(
        count * conv.in_channels,
        count * conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=count * conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )


def wide_batchnorm(norm: nn.BatchNorm2d, count: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(
        count * norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats, device="meta"
    )


def batched_classifier(linear: nn.Linear, count: int) -> BatchedLinear:
    return BatchedLinear(count, linear.in_features, linear.out_features, linear.bias is not None, device="meta")


FUSERS = {nn.Conv2d: grouped_conv, nn.BatchNorm2d: wide_batchnorm}


def check_fusable(template: Backbone) -> None:
    """Refuse any layer that may mix channels across students (concat, attention, a Linear inside a stage)."""
    for name, module in template.named_modules():
        kind = type(module)
        if name == "classifier" and kind is nn.Linear:
            continue
        if kind not in FUSERS and kind not in CHANNELWISE and kind not in SEPARABLE_BLOCKS:
            raise OkdpipeError(
                f"fused students: {template.arch} has a {kind.__name__} layer ({name}) that may "
                f"mix channels across students; train {template.arch} with fused: false"
            )


def fused_skeleton(template: Backbone, count: int) -> Backbone:
    """`template`'s module tree with every Conv2d/BatchNorm2d/classifier widened to N students, on the meta
    device (no memory, no RNG draws): the weights come from the members' state dicts afterwards."""
    check_fusable(template)
    net = copy.deepcopy(template)
    for name, module in template.named_modules():
        if type(module) in FUSERS:
            net.set_submodule(name, FUSERS[type(module)](module, count))
    net.classifier = batched_classifier(template.classifier, count)
    return net


class FusedStudents(nn.Module):
    """The `peers` layout of `Students` (same constructor, forward, extract, member_state, checkpoint keys),
    computed as one grouped network. Build it where `Students` would be built, or convert with
    `from_students`; `to_students` converts back."""

    layout = "peers"

    def __init__(
        self,
        arch: Archs,
        count: int,
        num_classes: int,
        in_channels: int,
        layout: str = "peers",
        same_init: bool = False,
    ):
        super().__init__()
        if layout != "peers":
            raise OkdpipeError(
                f"fused students support the peers layout only, not {layout!r}; train this method with fused: false"
            )
        self.archs = per_student(arch, count)
        if len(set(self.archs)) > 1:
            raise OkdpipeError(
                f"--fused runs peers of one architecture as one grouped network, and {arch_label(self.archs)} "
                "differ; train them with fused: false"
            )
        self.arch, self.count = self.archs[0], count
        self.num_classes, self.in_channels = num_classes, in_channels
        self.channels_last = False
        # The members are drawn exactly as Students draws them, so a seed gives the loop's initial weights.
        first = self._new_backbone()
        members = [first, *(copy.deepcopy(first) if same_init else self._new_backbone() for _ in range(count - 1))]
        self.net = fused_skeleton(first, count).to_empty(device="cpu")
        # Keys of the classifier's [N, ...] tensors; every other tensor stacks students along dim 0.
        self._batched = frozenset(
            key
            for key in self.net.state_dict()
            if isinstance(self.net.get_submodule(key.rpartition(".")[0]), BatchedLinear)
        )
        self.register_state_dict_post_hook(_members_layout)
        self.register_load_state_dict_pre_hook(_fused_layout)
        self.load_member_states([m.state_dict() for m in members])
        self._skeleton = [first.to("meta")]  # a list keeps it out of the module tree (state_dict, .to, optimiser)

    def _new_backbone(self) -> Backbone:
        return create_model(self.arch, num_classes=self.num_classes, in_channels=self.in_channels)

    @property
    def members(self):
        raise OkdpipeError(
            "this method reads per-student modules (students.members), which fused students do "
            "not have; train it with fused: false"
        )

    @classmethod
    def from_students(cls, students: Students) -> FusedStudents:
        """The same students (weights, BN statistics, device, mode, memory format) as one fused network."""
        if students.layout != "peers":
            raise OkdpipeError(
                f"fused students support the peers layout only, not {students.layout!r}; "
                "train this method with fused: false"
            )
        with torch.random.fork_rng(devices=[]):
            fused = cls(students.arch, students.count, students.num_classes, students.in_channels)
        fused.load_state_dict(students.state_dict())
        return fused._like(students)

    def to_students(self) -> Students:
        """The loop container holding the same students."""
        with torch.random.fork_rng(devices=[]):
            students = Students(self.arch, self.count, self.num_classes, self.in_channels)
        students.load_state_dict(self.state_dict())
        return self._match(students)

    def _like(self, other: nn.Module) -> FusedStudents:
        """Move self to `other`'s device, dtype, mode and memory format."""
        self.to(next(other.parameters()))
        self.channels_last = other.channels_last
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        return self.train(other.training)

    def _match(self, module: nn.Module) -> nn.Module:
        """Put `module` on this container's device, dtype, mode and memory format."""
        module.to(next(self.parameters()))
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
            if hasattr(module, "channels_last"):
                module.channels_last = True
        return module.train(self.training)

    def forward(self, views: torch.Tensor, features: bool = False, stages: bool = False) -> StudentOutputs:
        """views: [V, B, C, H, W]; V = 1: every student sees view 0; V >= N: student i sees view i."""
        if views.shape[0] != 1 and views.shape[0] < self.count:
            raise ValueError(f"expected 1 or at least {self.count} views, got {views.shape[0]}")
        fmap, stage_maps = self.net.forward_features(self.stack_views(views), return_stages=True)
        pooled = self.net.pool(fmap)
        logits = self.net.classifier(pooled)
        maps = [list(parts) for parts in zip(*(m.chunk(self.count, 1) for m in stage_maps))] if stages else None
        return StudentOutputs(logits, list(pooled.chunk(self.count, 1)) if features else None, maps)

    def stack_views(self, views: torch.Tensor) -> torch.Tensor:
        """[V, B, C, H, W] -> [B, N*C, H, W], channel block i = student i's view."""
        if views.shape[0] == 1:
            stacked = views[0].repeat(1, self.count, 1, 1)
        else:
            stacked = views[: self.count].transpose(0, 1).flatten(1, 2)
        return stacked.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Student i's state dict under the plain backbone's keys (views into the fused tensors)."""
        self._check_index(i)
        return {key: self._member_slice(key, value, i) for key, value in self.net.state_dict().items()}

    def extract(self, i: int) -> Backbone:
        """Student i as a standalone network of the base architecture (a copy: training is unaffected)."""
        self._check_index(i)
        with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
            net = self._new_backbone()
        net.load_state_dict(self.member_state(i))
        return self._match(net)

    def load_member_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Set every student from a plain backbone state dict (one per student, in order)."""
        self.net.load_state_dict(self._join(states))

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.count:
            raise IndexError(f"student {i} does not exist (0..{self.count - 1})")

    def _is_batched(self, key: str) -> bool:
        """True for the classifier's [N, ...] tensors; False for channel-stacked conv/BN tensors."""
        return key in self._batched

    @property
    def skeleton(self) -> Backbone:
        """One student's module tree on the meta device: run it with `torch.func.functional_call` and a full
        state (e.g. `blend`'s) to compute a network built from the students' weights; in the students' mode."""
        return self._skeleton[0].train(self.training)

    def stacked(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """[N, ...] view of the fused tensor `key` (entry i is student i's): in-place ops on it reach the students."""
        return value if self._is_batched(key) else value.unflatten(0, (self.count, -1))

    def blend(self, weights: torch.Tensor, grad: bool = False) -> dict[str, torch.Tensor]:
        """sum_m w_m theta_m for every entry, under the plain backbone's keys, one multiply-and-sum per tensor.

        Parameters keep their graph to the students when `grad` is set (OKDPH's paper mode sends r_m times the
        hybrid's gradient into student m); buffers never do; integer ones (num_batches_tracked) are copied."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            params = {key: self._weighted_sum(key, value, weights) for key, value in self.net.named_parameters()}
        with torch.no_grad():
            buffers = {
                key: self._weighted_sum(key, value, weights) if value.dtype.is_floating_point else value.clone()
                for key, value in self.net.named_buffers()
            }
        return {**params, **buffers}

    def _weighted_sum(self, key: str, value: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        members = self.stacked(key, value)
        return (members * weights.to(members.device, members.dtype).view(-1, *[1] * (members.dim() - 1))).sum(0)

    @torch.no_grad()
    def lerp_members_(self, target: dict[str, torch.Tensor], weight: float) -> None:
        """theta_m <- theta_m + weight * (target - theta_m) for every student and floating-point entry of
        `target` (plain backbone keys), as one fused `torch._foreach_lerp_`."""
        state = self.net.state_dict()
        keys = [key for key, value in target.items() if value.dtype.is_floating_point]
        members = [self.stacked(key, state[key]) for key in keys]
        torch._foreach_lerp_(members, [target[key].expand_as(m) for key, m in zip(keys, members)], weight)

    def _member_slice(self, key: str, value: torch.Tensor, i: int) -> torch.Tensor:
        if value.dim() == 0:  # BN's num_batches_tracked: every student has taken the same steps
            return value
        return value[i] if self._is_batched(key) else value.chunk(self.count)[i]

    def _join(self, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(states) != self.count:
            raise ValueError(f"expected {self.count} student states, got {len(states)}")
        joined = {}
        for key in states[0]:
            values = [state[key] for state in states]
            if values[0].dim() == 0:
                joined[key] = values[0]
            else:
                joined[key] = torch.stack(values) if self._is_batched(key) else torch.cat(values)
        return joined


def _members_layout(module: FusedStudents, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: `net.<key>` (fused) -> `members.<i>.<key>` (the loop container's keys)."""
    fused = {
        key[len(prefix + NET_PREFIX) :]: state.pop(key) for key in list(state) if key.startswith(prefix + NET_PREFIX)
    }
    for i in range(module.count):
        for key, value in fused.items():
            state[f"{prefix}{MEMBER_PREFIX}{i}.{key}"] = module._member_slice(key, value, i)


def _fused_layout(module: FusedStudents, state: dict, prefix: str, *_ignored) -> None:
    """load_state_dict pre-hook: `members.<i>.<key>` -> `net.<key>`; fused-layout keys pass through, and keys
    that do not form complete students stay behind for strict loading to report."""
    head = prefix + MEMBER_PREFIX
    per_member: list[dict[str, torch.Tensor]] = [{} for _ in range(module.count)]
    for key in [k for k in state if k.startswith(head)]:
        index, _, rest = key[len(head) :].partition(".")
        if index.isascii() and index.isdigit() and int(index) < module.count:
            per_member[int(index)][rest] = state.pop(key)
    keys = set(per_member[0])
    if not keys:
        return
    if any(set(member) != keys for member in per_member):
        raise RuntimeError(
            f"{head}<i>: the checkpoint's students do not all hold the same backbone keys "
            f"(another student count or architecture?)"
        )
    for key, value in module._join(per_member).items():
        state[prefix + NET_PREFIX + key] = value
