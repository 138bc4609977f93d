"""CIFAR ResNets (He et al. 2016, Sec. 4.2): 3 stages of widths 16/32/64 at 32x32/16x16/8x8 inputs.

Where a block changes shape, its shortcut is a 1x1 conv (stride 2 where downsampling) + BN -- option B,
as in the OKD papers' code (ONE/OKDDip/PCL) -- not the paper's zero-padding option A, so the counts are a
few thousand parameters above the paper's 0.27M/0.46M/0.85M/1.7M figures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from okdpipe.distill.models.base import MODELS, Backbone, conv_bn_act

STAGE_PLANES = (16, 32, 64)


class ResidualBlock(nn.Module):
    """y = ReLU(F(x) + P(x)) (He et al. 2016, eq. 2): P is identity, or 1x1 conv + BN where the shape changes."""

    def __init__(self, residual: nn.Module, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv_bn_act(in_channels, out_channels, 1, stride, act=None)
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def basic_block(in_channels: int, planes: int, stride: int) -> ResidualBlock:
    """Two 3x3 convs (He et al. 2016, Fig. 5 left); out channels = planes."""
    residual = nn.Sequential(
        conv_bn_act(in_channels, planes, 3, stride),
        conv_bn_act(planes, planes, 3, act=None),
    )
    return ResidualBlock(residual, in_channels, planes, stride)


def bottleneck_block(in_channels: int, planes: int, stride: int) -> ResidualBlock:
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand x4 (He et al. 2016, Fig. 5 right)."""
    residual = nn.Sequential(
        conv_bn_act(in_channels, planes, 1),
        conv_bn_act(planes, planes, 3, stride),
        conv_bn_act(planes, 4 * planes, 1, act=None),
    )
    return ResidualBlock(residual, in_channels, 4 * planes, stride)


Block = Callable[[int, int, int], ResidualBlock]


def cifar_resnet(block: Block, blocks_per_stage: int, num_classes: int, in_channels: int) -> Backbone:
    """stem conv3x3(16)+BN+ReLU, then 3 stages of `blocks_per_stage` blocks; stages 2 and 3 halve h, w."""
    stem = conv_bn_act(in_channels, 16, 3)
    width, stages, stage_channels = 16, [], []
    for index, planes in enumerate(STAGE_PLANES):
        blocks = []
        for position in range(blocks_per_stage):
            stride = 2 if index > 0 and position == 0 else 1
            blocks.append(block(width, planes, stride))
            width = blocks[-1].out_channels
        stages.append(nn.Sequential(*blocks))
        stage_channels.append(width)
    return Backbone(stem, stages, nn.Linear(width, num_classes), stage_channels)


def basic_resnet(depth: int, num_classes: int, in_channels: int) -> Backbone:
    """6n+2 layers: n = (depth - 2) / 6 BasicBlocks per stage."""
    return cifar_resnet(basic_block, (depth - 2) // 6, num_classes, in_channels)


@MODELS.register("resnet8")
def resnet8(num_classes: int, in_channels: int = 3) -> Backbone:
    """ResNet-8: 1 BasicBlock per stage, 16/32/64 channels. 83,892 parameters (100 classes, RGB)."""
    return basic_resnet(8, num_classes, in_channels)


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_channels: int = 3) -> Backbone:
    """ResNet-20: 3 BasicBlocks per stage, 16/32/64 channels. 278,324 parameters (100 classes, RGB)."""
    return basic_resnet(20, num_classes, in_channels)


@MODELS.register("resnet32")
def resnet32(num_classes: int, in_channels: int = 3) -> Backbone:
    """ResNet-32: 5 BasicBlocks per stage, 16/32/64 channels. 472,756 parameters (100 classes, RGB)."""
    return basic_resnet(32, num_classes, in_channels)


@MODELS.register("resnet56")
def resnet56(num_classes: int, in_channels: int = 3) -> Backbone:
    """ResNet-56: 9 BasicBlocks per stage, 16/32/64 channels. 861,620 parameters (100 classes, RGB)."""
    return basic_resnet(56, num_classes, in_channels)


@MODELS.register("resnet110")
def resnet110(num_classes: int, in_channels: int = 3) -> Backbone:
    """ResNet-110: 18 BasicBlocks per stage, 16/32/64 channels. 1,736,564 parameters (100 classes, RGB)."""
    return basic_resnet(110, num_classes, in_channels)


@MODELS.register("resnet110_bottleneck")
def resnet110_bottleneck(num_classes: int, in_channels: int = 3) -> Backbone:
    """The OKD papers' "ResNet-110" (9n+2, n=12): 12 Bottleneck blocks per stage, planes 16/32/64 expanded x4
    to 64/128/256 channels. 1,170,868 parameters (100 classes, RGB).

    Not 1.7M: that figure is the BasicBlock ResNet-110 (`resnet110`) or the Bottleneck ResNet-164 (n=18).
    """
    return cifar_resnet(bottleneck_block, 12, num_classes, in_channels)
