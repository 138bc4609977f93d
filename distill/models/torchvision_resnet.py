"""torchvision's ImageNet ResNet-18/34 (He et al. 2016, Table 1), re-homed into the Backbone layout.

stem = conv7x7/2 (64) + BN + ReLU + maxpool3x3/2; stages = layer1..layer4 (64/128/256/512 channels at
1/4, 1/8, 1/16, 1/32 resolution); classifier = fc. Meant for inputs of 32x32 and up.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from okdpipe.distill.models.base import MODELS, Backbone

STAGE_CHANNELS = (64, 128, 256, 512)  # BasicBlock ResNets: expansion 1


def from_torchvision(factory: Callable[..., nn.Module], num_classes: int, in_channels: int) -> Backbone:
    """Take torchvision's modules as they are, but a new first conv when the input is not RGB."""
    net = factory(weights=None, num_classes=num_classes)
    conv1 = net.conv1
    if in_channels != 3:
        conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stem = nn.Sequential(conv1, net.bn1, net.relu, net.maxpool)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    return Backbone(stem, stages, net.fc, STAGE_CHANNELS)


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3) -> Backbone:
    """ResNet-18 (ImageNet layout): 2 BasicBlocks per stage, 64/128/256/512 channels.
    11,227,812 parameters (100 classes, RGB)."""
    from torchvision.models import resnet18 as torchvision_resnet18  # lazy: torchvision is slow to import

    return from_torchvision(torchvision_resnet18, num_classes, in_channels)


@MODELS.register("resnet34")
def resnet34(num_classes: int, in_channels: int = 3) -> Backbone:
    """ResNet-34 (ImageNet layout): 3/4/6/3 BasicBlocks per stage, 64/128/256/512 channels.
    21,335,972 parameters (100 classes, RGB)."""
    from torchvision.models import resnet34 as torchvision_resnet34

    return from_torchvision(torchvision_resnet34, num_classes, in_channels)
