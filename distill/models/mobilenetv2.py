"""MobileNetV2 (Sandler et al. 2018, Table 2), width 1.0, with the common CIFAR strides.

CIFAR adaptation (as in the widely used pytorch-cifar version): the first conv and the first stride-2
bottleneck group (24 channels) use stride 1, so 32x32 inputs reach 4x4 instead of 1x1. Blocks follow the
paper (no expansion conv when t = 1, residual only when stride 1 and widths match), unlike pytorch-cifar's
1x1-conv shortcuts. Stages are the resolution levels, each starting at a stride-2 group:
  stem  conv3x3(32) + BN + ReLU6                                          32x32
  1     t1 c16 n1, t6 c24 n2                                              32x32, 24 ch
  2     t6 c32 n3 (s2)                                                    16x16, 32 ch
  3     t6 c64 n4 (s2), t6 c96 n3                                          8x8,  96 ch
  4     t6 c160 n3 (s2), t6 c320 n1, conv1x1(1280) + BN + ReLU6            4x4, 1280 ch
The classifier is Linear(1280 -> classes) without the paper's dropout (the classifier must be a bare Linear).

Its recipe (issue 17): channels-last memory, since oneDNN's 1x1 and depthwise convolutions run 1.4x faster per
training step on CPU (BENCHMARKS.md); and PreciseBN (`precise_bn`), since in short runs the running statistics of its
52 BatchNorm layers lag the weights: with 200 Fashion-MNIST images a class and 2 epochs (about 30 steps) validation
stays at chance while the training loss falls, whether at lr 0.1 or at lr 0.05 with a warm-up epoch, and the same
weights with statistics recomputed on 1,280 training images score 67% instead of 9%; with 500 a class both reach 76%.
"""

from __future__ import annotations

import torch
from torch import nn

from okdpipe.distill.models.base import MODELS, Backbone, conv_bn_act, recipe

# (expansion t, out channels c, repeats n, first stride s) after the CIFAR stride changes.
CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the paper
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expand (x t) + ReLU6, 3x3 depthwise (stride s) + ReLU6, 1x1 linear projection (paper Table 1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = [conv_bn_act(in_channels, hidden, 1, act=nn.ReLU6)] if expansion != 1 else []
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn_act(hidden, out_channels, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


def inverted_residual_stages(in_channels: int) -> tuple[list[list[nn.Module]], list[int]]:
    """Group the bottlenecks into stages, opening a new stage at every stride-2 group."""
    stages: list[list[nn.Module]] = []
    widths: list[int] = []
    for expansion, out_channels, repeats, stride in CIFAR_SETTINGS:
        if stride == 2 or not stages:
            stages.append([])
            widths.append(0)
        for position in range(repeats):
            block_stride = stride if position == 0 else 1
            stages[-1].append(InvertedResidual(in_channels, out_channels, block_stride, expansion))
            in_channels = out_channels
        widths[-1] = out_channels
    return stages, widths


@MODELS.register("mobilenetv2")
@recipe(channels_last=True, precise_bn=True)
def mobilenetv2(num_classes: int, in_channels: int = 3) -> Backbone:
    """MobileNetV2 1.0 (CIFAR strides): 17 inverted residuals in 4 stages, stage channels 24/32/96/1280.
    2,351,972 parameters (100 classes, RGB)."""
    stem = conv_bn_act(in_channels, 32, 3, act=nn.ReLU6)
    stages, widths = inverted_residual_stages(32)
    stages[-1].append(conv_bn_act(widths[-1], LAST_CHANNELS, 1, act=nn.ReLU6))
    widths[-1] = LAST_CHANNELS
    return Backbone(stem, [nn.Sequential(*s) for s in stages], nn.Linear(LAST_CHANNELS, num_classes), widths)
