"""VGG-16 with batch norm for CIFAR (Simonyan & Zisserman 2015, config D; BN after every conv).

Layout: stem conv3x3(64); stages [conv64, pool] [conv128 x2, pool] [conv256 x3, pool] [conv512 x3, pool]
[conv512 x3, pool] -- 13 conv3x3 + BN + ReLU, each stage ending in a 2x2 max-pool, so 32x32 inputs reach 1x1.
The ImageNet 4096-wide FC layers are replaced by a single Linear(512 -> classes), as CIFAR VGGs do.
"""

from __future__ import annotations

from torch import nn

from okdpipe.distill.models.base import MODELS, Backbone, conv_bn_act

# Conv widths of each stage; the stem holds the first 64-wide conv.
VGG16_STAGES = ((64,), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg_stage(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Convs then a 2x2 max-pool; ceil_mode so odd maps (28 -> 14 -> 7 -> 4 -> 2 -> 1) never vanish."""
    layers = []
    for width in widths:
        layers.append(conv_bn_act(in_channels, width, 3))
        in_channels = width
    layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    return nn.Sequential(*layers)


@MODELS.register("vgg16")
def vgg16(num_classes: int, in_channels: int = 3) -> Backbone:
    """VGG-16-BN (CIFAR): 13 conv3x3+BN+ReLU in 5 pooled stages, 64/128/256/512/512 channels, Linear(512).
    14,770,212 parameters (100 classes, RGB)."""
    stem = conv_bn_act(in_channels, 64, 3)
    stages, channels = [], 64
    for widths in VGG16_STAGES:
        stages.append(vgg_stage(channels, widths))
        channels = widths[-1]
    return Backbone(stem, stages, nn.Linear(channels, num_classes), [w[-1] for w in VGG16_STAGES])
