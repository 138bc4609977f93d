"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation wide blocks, widths 16k/32k/64k.

Layout: stem conv3x3(16) (no BN/ReLU: every block pre-activates), 3 stages of n = (d - 4) / 6 blocks,
stages 2 and 3 halving h, w; the final BN + ReLU closes the last stage. Shortcuts are a bare 1x1 conv
where the shape changes, as in the authors' code.
"""

from __future__ import annotations

import torch
from torch import nn

from okdpipe.distill.models.base import MODELS, Backbone
from okdpipe.errors import OkdpipeError


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class WideBlock(nn.Module):
    """x + conv3x3(drop(relu(bn(conv3x3(relu(bn(x))))))) (paper Fig. 1d, B(3,3)).

    Where the shape changes the 1x1 shortcut reads the pre-activated input, as the authors' code does.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float):
        super().__init__()
        self.preact = bn_relu(in_channels)
        # Dropout is always present (identity at p=0) so weights load whatever drop_rate trained them.
        self.residual = nn.Sequential(
            conv3x3(in_channels, out_channels, stride),
            bn_relu(out_channels),
            nn.Dropout(drop_rate),
            conv3x3(out_channels, out_channels),
        )
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.preact(x)
        skip = x if self.shortcut is None else self.shortcut(activated)
        return self.residual(activated) + skip


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int, drop_rate: float) -> Backbone:
    """n = (depth - 4) / 6 blocks per stage, widths 16k/32k/64k (paper Table 1)."""
    if not 0.0 <= drop_rate < 1.0:
        raise OkdpipeError(f"WRN drop_rate must be in [0, 1), got {drop_rate}; set e.g. drop_rate: 0.3")
    blocks_per_stage = (depth - 4) // 6
    widths = [16 * widen, 32 * widen, 64 * widen]
    channels, stages = 16, []
    for index, width in enumerate(widths):
        first_stride = 2 if index > 0 else 1
        blocks = [WideBlock(channels, width, first_stride, drop_rate)]
        blocks += [WideBlock(width, width, 1, drop_rate) for _ in range(blocks_per_stage - 1)]
        channels = width
        stages.append(nn.Sequential(*blocks))
    stages[-1].append(bn_relu(channels))
    return Backbone(conv3x3(in_channels, 16), stages, nn.Linear(channels, num_classes), widths)


@MODELS.register("wrn16_2")
def wrn16_2(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> Backbone:
    """WRN-16-2: 2 wide blocks per stage, 32/64/128 channels. 703,284 parameters (100 classes, RGB).

    drop_rate: dropout between a block's two convs (the paper uses 0.3 in some runs; 0 here by default).
    """
    return wide_resnet(16, 2, num_classes, in_channels, drop_rate)


@MODELS.register("wrn40_2")
def wrn40_2(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> Backbone:
    """WRN-40-2: 6 wide blocks per stage, 32/64/128 channels. 2,255,156 parameters (100 classes, RGB).

    drop_rate: dropout between a block's two convs (the paper uses 0.3 in some runs; 0 here by default).
    """
    return wide_resnet(40, 2, num_classes, in_channels, drop_rate)
