"""FFSD: Feature Fusion and Self-Distillation (Li et al., TNNLS 2022; code: github.com/SJLeo/FFSD).

Peers: M common students (0 .. M-1) and one student leader, which is the LAST student (index M). All see the
same view. Stage maps F_{i,l} are the outputs of the backbone's stages (CIFAR ResNets: 3); A(F) is the
channel-mean of F^2 and AttnMSE(a, b) = mean((a/||a|| - b/||b||)^2), per-sample norms (`normalized_mse`).

Common student i (T = 2):
    CE(z_i) + T^2/(M-1) * sum_{j != i, j < M} KL(p_j || p_i)                      (peers detached)
    + lambda_div * Div(A(F_{i,last}), A(F_{i-1,last}))                              (i >= 1)
    + lambda_div * sum_l AttnMSE(A(F_{i,l}), A(D_i(S(F_{i-1,last}))_l))              (i >= 1)
Diversity target (the code's formula, which we adopt): with a the other student's attention, a_hat = a/||a||
and tau the floor(HW/3)-th smallest entry of a_hat,
    t = (||a||/2 - a_hat) * sign(a_hat - tau) + ||a||/2
i.e. t = ||a|| - a_hat above tau, t = a_hat below it and t = ||a||/2 at tau itself; Div(x, a) =
mean((x/||x|| - t)^2). The "shifted" map fed to the decoder is S(F) = F + (t - a_hat) * ||a|| / C, the
attention shift spread evenly over the C channels. Decoder targets come from the decoder in eval mode.
Fusion module, on the detached concat of the common students' last maps:
    depthwise 3x3 + BN + ReLU, 1x1 conv M*C -> C + BN + ReLU (= F_fus), global pool, Linear -> z_fus;
    CE(z_fus) + KD(z_fus <- mean_{i<M} z_i).
Leader L, with its trans-fusion head G (depthwise 3x3 + BN + ReLU, 1x1 conv C -> M*C + BN + ReLU; training
only, never shipped):
    CE(z_L) + KD(z_L <- z_fus) + lambda_fus * [AttnMSE(A(F_{L,last}), A(F_fus)) + AttnMSE(A(G(F_{L,last})),
    A(concat)) + sum_l AttnMSE(A(F_{L,l}), A(D_L(F_fus)_l))].
Self-distillation decoders D_i (one per common student i >= 1, one for the leader): ConvTranspose 3x3 stride 2
+ BN + ReLU blocks from the last stage's width to each shallower stage's width (halving for ResNets), each
block's output size taken from the actual stage map (`output_size`), trained by their own Adam (lr 1e-3,
wd 1e-4; x0.1 at epochs 150 and 225 of 300 as the official code's MultiStepLR, i.e. at 1/2 and 3/4 of any run,
as the main schedule's milestones scale) to rebuild the network's own shallow maps from its own detached last map:
    lambda_sd * sum_l [AttnMSE(D(F_last)_l, F_l) + AttnMSE(A(D(F_last)_l), A(F_l))].
Warm-up: every lambda is multiplied by exp(-5 (1 - e/E)^2) for e <= E (E = 5), per epoch; the code counts
epochs from 1, so e = epoch index + 1 (first epoch: exp(-3.2)).

Every cross-model input is detached, so one backward over the summed losses gives the same gradients as the
original's sequential backwards. The logged terms are the weighted summands of the loss. Ships: the leader;
the fusion head's accuracy is reported as "fusion-head" (a reference, not shippable).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from okdpipe.distill.losses import attention_map, kd, normalized_mse, ramp
from okdpipe.distill.methods.base import METHODS, Candidate, Hparams, Method
from okdpipe.distill.methods.dml import peer_terms
from okdpipe.distill.models.base import conv_bn_act, init_weights
from okdpipe.errors import OkdpipeError


class FFSDParams(Hparams):
    temperature: float = Field(2.0, gt=0.0, description="KD temperature T (paper: 2)")
    lambda_div: float = Field(1e-5, ge=0.0, description="weight of the diversity and student SD terms (paper: 1e-5)")
    lambda_fus: float = Field(10.0, ge=0.0, description="weight of the leader's fusion-distillation terms (paper: 10)")
    lambda_sd: float = Field(1000.0, ge=0.0, description="weight of the decoders' reconstruction loss (paper: 1000)")
    warmup_epochs: float = Field(5.0, ge=0.0, description="epochs over which every lambda warms up (paper: 5)")
    fusion_weight_decay: float = Field(1e-5, ge=0.0, description="SGD weight decay of the fusion module (paper: 1e-5)")
    decoder_lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the decoders (paper code: 1e-3)")
    decoder_weight_decay: float = Field(1e-4, ge=0.0, description="Adam weight decay of the decoders (paper: 1e-4)")
    decoder_milestones: tuple[float, ...] = Field(
        (0.5, 0.75),
        description="fractions of the run where the decoders' "
        "lr is multiplied by decoder_lr_decay (code: epochs 150, 225 of 300)",
    )
    decoder_lr_decay: float = Field(
        0.1, gt=0.0, le=1.0, description="decoders' lr factor at each milestone (code: 0.1)"
    )


def diversity_target(attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, a_hat, ||a||) for flattened attention maps [B, P]: t = (||a||/2 - a_hat) sign(a_hat - tau) + ||a||/2."""
    norm = attention.norm(dim=1, keepdim=True)
    unit = F.normalize(attention, dim=1)
    tau = unit.kthvalue(max(1, unit.shape[1] // 3), dim=1, keepdim=True).values
    target = (norm / 2 - unit) * torch.sign(unit - tau) + norm / 2
    return target, unit, norm


def diversity_loss(attention: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mean((a/||a|| - t(other))^2): push this student's attention toward the other's shifted attention."""
    target, _, _ = diversity_target(other.detach())
    return (F.normalize(attention, dim=1) - target).pow(2).mean()


def shifted_map(fmap: torch.Tensor) -> torch.Tensor:
    """S(F) = F + (t - a_hat) * ||a|| / C, broadcast over channels: a map whose attention moved toward t."""
    target, unit, norm = diversity_target(attention_map(fmap))
    shift = (target - unit) * norm / fmap.shape[1]
    return fmap + shift.view(fmap.shape[0], 1, *fmap.shape[2:])


def attention_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AttnMSE(A(a), A(b)) on feature maps."""
    return normalized_mse(attention_map(a), attention_map(b))


class UpBlock(nn.Module):
    """ConvTranspose 3x3 stride 2 + BN + ReLU; the output size is given per call, so one set of weights serves
    any input resolution (output_padding does not change the parameters)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        height, width = x.shape[-2:]
        if not (2 * height - 1 <= size[0] <= 2 * height and 2 * width - 1 <= size[1] <= 2 * width):
            raise OkdpipeError(
                f"ffsd: the decoders upsample x2 per stage, but a stage goes from {tuple(size)} to "
                f"{(height, width)}; use a backbone whose stages halve the resolution (CIFAR ResNets)"
            )
        return F.relu(self.norm(self.deconv(x, output_size=list(size))))


class StageDecoder(nn.Module):
    """Deepest stage map -> every shallower stage's map, one UpBlock per stage transition."""

    def __init__(self, stage_channels: list[int]):
        super().__init__()
        widths = stage_channels[::-1]
        self.blocks = nn.ModuleList(UpBlock(c_in, c_out) for c_in, c_out in zip(widths, widths[1:]))

    def forward(self, deepest: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """sizes: spatial sizes of the shallower stages, shallowest first; returns maps in the same order."""
        maps, x = [], deepest
        for block, size in zip(self.blocks, reversed(sizes)):
            x = block(x, size)
            maps.append(x)
        return maps[::-1]


class FusionModule(nn.Module):
    """concat [B, M*C, h, w] -> depthwise 3x3 + BN + ReLU -> 1x1 (M*C -> C) + BN + ReLU = F_fus -> pool -> z_fus."""

    def __init__(self, channels: int, common: int, num_classes: int):
        super().__init__()
        width = channels * common
        self.body = nn.Sequential(conv_bn_act(width, width, 3, groups=width), conv_bn_act(width, channels, 1))
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, concat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.body(concat)
        return fused, self.classifier(torch.flatten(F.adaptive_avg_pool2d(fused, 1), 1))


def trans_fusion_head(channels: int, common: int) -> nn.Sequential:
    """Leader's last map [B, C, h, w] -> G_L [B, M*C, h, w]: depthwise 3x3 + BN + ReLU, 1x1 C -> M*C + BN + ReLU."""
    head = nn.Sequential(
        conv_bn_act(channels, channels, 3, groups=channels), conv_bn_act(channels, channels * common, 1)
    )
    init_weights(head)
    return head


def map_sizes(stage_maps: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Spatial sizes of every stage but the last (the decoders' targets)."""
    return [tuple(m.shape[-2:]) for m in stage_maps[:-1]]


@torch.no_grad()
def decoded_targets(decoder: StageDecoder, deepest: torch.Tensor, stage_maps: list[torch.Tensor]):
    """The decoder's output used as a (detached) target: eval mode, as the original's `self_distillation_loss`."""
    was_training = decoder.training
    decoder.eval()
    try:
        return decoder(deepest, map_sizes(stage_maps))
    finally:
        decoder.train(was_training)


@METHODS.register("ffsd")
class FFSD(Method):
    """M common students + the leader (the last student); see the module docstring for every term."""

    Params = FFSDParams
    optimizer_defaults = {"optimizer": "nesterov", "weight_decay": 1e-4}  # Li et al. 2022 (methods.md, Recipes)
    layout = "peers"
    single_arch_reason = (
        "its fusion module concatenates the students' last feature maps and its decoders are sized for one "
        "architecture's stage widths"
    )
    default_students = 3
    min_students = 3
    needs_stages = True
    ships = "leader"

    def __init__(self, students, hp: FFSDParams, num_classes: int):
        super().__init__(students, hp, num_classes)
        stage_channels = students.members[0].stage_channels
        if len(stage_channels) < 2:
            library = ":" in students.arch  # timm:/torchvision: students expose their final feature map only
            raise OkdpipeError(
                f"--method ffsd needs a backbone with at least 2 stages, {students.arch} has "
                f"{len(stage_channels)}"
                + (
                    "; ffsd reads intermediate stage maps, which only okdpipe's own backbones expose: choose one "
                    "(e.g. resnet20) or another --method"
                    if library
                    else "; choose another --arch"
                )
            )
        self.common = students.count - 1
        channels = stage_channels[-1]
        self.fusion = FusionModule(channels, self.common, num_classes)
        self.trans_fusion = trans_fusion_head(channels, self.common)
        # decoders[i - 1] serves common student i (i >= 1); decoders[-1] serves the leader.
        self.decoders = nn.ModuleList(StageDecoder(stage_channels) for _ in range(self.common))
        self._decoder_optimizers: list[torch.optim.Optimizer] = []

    def param_groups(self) -> list[dict]:
        return [
            {"params": list(self.fusion.parameters()), "weight_decay": self.hp.fusion_weight_decay},
            {"params": list(self.trans_fusion.parameters())},
        ]

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """One Adam per decoder (created once, after the method has moved to its device)."""
        if not self._decoder_optimizers:
            self._decoder_optimizers = [
                torch.optim.Adam(d.parameters(), lr=self.hp.decoder_lr, weight_decay=self.hp.decoder_weight_decay)
                for d in self.decoders
            ]
        return self._decoder_optimizers

    def lambdas(self, epoch: float) -> dict[str, float]:
        """Warmed-up weights, per epoch, counted from 1 as the original does."""
        factor = ramp(math.floor(epoch) + 1, self.hp.warmup_epochs)
        return {
            "div": self.hp.lambda_div * factor,
            "fus": self.hp.lambda_fus * factor,
            "sd": self.hp.lambda_sd * factor,
        }

    def decoder_lr(self, epoch: float, total_epochs: int) -> float:
        """decoder_lr x decay^(milestones passed): the official MultiStepLR([150, 225], 0.1) scaled to the run."""
        passed = sum(epoch >= m * total_epochs for m in self.hp.decoder_milestones)
        return self.hp.decoder_lr * self.hp.decoder_lr_decay**passed

    def step(self, views, labels, out, ctx):
        # The decoders' optimisers step right after this call: set this step's lr (exact on resume too).
        for optimizer in self.extra_optimizers():
            for group in optimizer.param_groups:
                group["lr"] = self.decoder_lr(ctx.epoch, ctx.total_epochs)
        terms = self.loss_terms(out, labels, ctx.epoch)
        return {"loss": sum(terms.values()), **{key: value.detach() for key, value in terms.items()}}

    def loss_terms(self, out, labels, epoch: float) -> dict[str, torch.Tensor]:
        """Every weighted summand of the loss, undetached: "<term>/s<i>", "<term>/fusion", "decoder/s<i>"."""
        weights = self.lambdas(epoch)
        terms = self.common_terms(out, labels, weights)
        concat = self.common_concat(out)
        fused, z_fusion = self.fusion(concat)
        terms["ce/fusion"] = F.cross_entropy(z_fusion, labels)
        terms["kd/fusion"] = kd(z_fusion, out.logits[: self.common].mean(0), self.hp.temperature)
        terms.update(self.leader_terms(out, labels, concat, fused.detach(), z_fusion, weights))
        terms.update(self.decoder_terms(out.stages, weights["sd"]))
        return terms

    def common_concat(self, out) -> torch.Tensor:
        """The fusion module's input: the common students' detached last maps, concatenated [B, M*C, h, w]."""
        return torch.cat([maps[-1].detach() for maps in out.stages[: self.common]], dim=1)

    def reference_logits(self, views, out) -> dict[str, torch.Tensor]:
        """The fusion module's classifier z_fus: scored every epoch, never shipped (it needs every common student)."""
        return {"fusion-head": self.fusion(self.common_concat(out))[1]}

    def common_terms(self, out, labels, weights) -> dict[str, torch.Tensor]:
        """DML among the common students ("ce/s<i>", "kd/s<i>"), plus the diversity terms of students i >= 1."""
        terms = peer_terms(out.logits[: self.common], labels, self.hp.temperature)
        for i in range(1, self.common):
            terms.update(self.diversity_terms(i, out.stages, weights["div"]))
        return terms

    def diversity_terms(self, i: int, stages, weight: float) -> dict[str, torch.Tensor]:
        """Student i's attention pushed toward student i-1's shifted attention, last map and (via D_i) shallow maps."""
        own, previous_last = stages[i], stages[i - 1][-1].detach()
        targets = decoded_targets(self.decoders[i - 1], shifted_map(previous_last), own)
        return {
            f"div/s{i}": weight * diversity_loss(attention_map(own[-1]), attention_map(previous_last)),
            f"sd/s{i}": weight * sum(attention_mse(m, t) for m, t in zip(own, targets)),
        }

    def leader_terms(self, out, labels, concat, fused, z_fusion, weights) -> dict[str, torch.Tensor]:
        """Leader: CE + KD from the fusion head + lambda_fus * (fusion, trans-fusion and decoded-fusion AttnMSE)."""
        leader, maps = self.common, out.stages[self.common]
        targets = decoded_targets(self.decoders[-1], fused, maps)
        return {
            f"ce/s{leader}": F.cross_entropy(out.logits[leader], labels),
            f"kd/s{leader}": kd(out.logits[leader], z_fusion, self.hp.temperature),
            f"fus/s{leader}": weights["fus"] * attention_mse(maps[-1], fused),
            f"trans/s{leader}": weights["fus"] * attention_mse(self.trans_fusion(maps[-1]), concat),
            f"sd/s{leader}": weights["fus"] * sum(attention_mse(m, t) for m, t in zip(maps, targets)),
        }

    def decoder_terms(self, stages, weight: float) -> dict[str, torch.Tensor]:
        """Each decoder rebuilds its own network's shallow maps from that network's detached last map."""
        owners = [*range(1, self.common), self.common]
        terms = {}
        for decoder, owner in zip(self.decoders, owners):
            maps = [m.detach() for m in stages[owner]]
            rebuilt = decoder(maps[-1], map_sizes(maps))
            terms[f"decoder/s{owner}"] = weight * sum(
                normalized_mse(r, m) + attention_mse(r, m) for r, m in zip(rebuilt, maps)
            )
        return terms

    def candidates(self) -> dict[str, Candidate]:
        """ "leader": the last student as a plain network (the fusion head needs every student: not shippable)."""
        return {"leader": Candidate(self.students.extract(self.students.count - 1))}
