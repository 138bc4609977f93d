"""DenseNet-40 (k = 12) for CIFAR (Huang et al. 2017): the original, not DenseNet-BC.

Layout: stem conv3x3(16); 3 dense blocks of 12 layers (BN-ReLU-conv3x3(12), no 1x1 bottleneck), with
compression-1 transitions (BN-ReLU-conv1x1-avgpool2) between them. So the stage maps are at full, 1/2 and
1/4 resolution like the CIFAR ResNets': stage 1 = block 1 (160 ch), stage 2 = transition + block 2 (304 ch),
stage 3 = transition + block 3 + final BN + ReLU (448 ch). Convs have no bias (BN follows each input).
"""

from __future__ import annotations

import torch
from torch import nn

from okdpipe.distill.models.base import MODELS, Backbone


def bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
    )


class DenseLayer(nn.Module):
    """x_l = [x_0, ..., x_{l-1}, H_l([x_0, ..., x_{l-1}])] with H_l = BN-ReLU-conv3x3 (paper eq. 2)."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.new_features = bn_relu_conv(in_channels, growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.new_features(x)], dim=1)


def dense_block(in_channels: int, layers: int, growth: int) -> list[nn.Module]:
    return [DenseLayer(in_channels + i * growth, growth) for i in range(layers)]


def transition(channels: int) -> list[nn.Module]:
    """Compression 1: the 1x1 conv keeps the width; the average pool halves h, w."""
    return [bn_relu_conv(channels, channels, 1), nn.AvgPool2d(2)]


@MODELS.register("densenet40_12")
def densenet40_12(num_classes: int, in_channels: int = 3) -> Backbone:
    """DenseNet-40, growth 12: 3 blocks x 12 layers, stage channels 160/304/448.
    1,060,132 parameters (100 classes, RGB)."""
    layers, growth = 12, 12
    channels, stages, stage_channels = 16, [], []
    for index in range(3):
        modules = transition(channels) if index > 0 else []
        modules += dense_block(channels, layers, growth)
        channels += layers * growth
        stages.append(nn.Sequential(*modules))
        stage_channels.append(channels)
    stages[-1].extend([nn.BatchNorm2d(channels), nn.ReLU(inplace=True)])
    stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
    return Backbone(stem, stages, nn.Linear(channels, num_classes), stage_channels)
