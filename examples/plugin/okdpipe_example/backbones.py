"""`example_cnn`: the smallest useful okdpipe backbone, to copy for your own.

A backbone is okdpipe's `Backbone`: a stem, a list of stages and a Linear classifier after global average
pooling. Built that way, every method can train it, shared-trunk ones (ONE, PCL, MBDE) included.
"""

from __future__ import annotations

from torch import nn

from okdpipe.distill.models import MODELS, Backbone

WIDTHS = (16, 32, 64)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


@MODELS.register("example_cnn")
def example_cnn(num_classes: int, in_channels: int = 3) -> Backbone:
    """stem conv 3x3 (16) -> stages 16/32/64 channels at 1, 1/2, 1/4 resolution -> pool -> Linear.
    26,394 parameters (10 classes, 1 channel)."""
    stem = conv_bn_relu(in_channels, WIDTHS[0], 1)
    stages = [conv_bn_relu(WIDTHS[max(i - 1, 0)], width, 1 if i == 0 else 2) for i, width in enumerate(WIDTHS)]
    return Backbone(stem, stages, nn.Linear(WIDTHS[-1], num_classes), WIDTHS)
