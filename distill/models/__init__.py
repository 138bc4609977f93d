"""Backbones behind one interface (`Backbone`: stem -> stages -> pool -> classifier), built by name.

    from okdpipe.distill.models import MODELS, create_model
    model = create_model("resnet32", num_classes=100, in_channels=3)
    model = create_model("timm:resnet10t", num_classes=10, in_channels=1)  # a timm/torchvision classifier

Plug-ins add their own with `@MODELS.register("name")` (okdpipe/plugins.py), and may declare the training
defaults it needs beneath it with `@recipe(lr=..., warmup_epochs=...)` (looked up by `backbone_recipe`).

Importing this package registers every architecture below in MODELS.
"""

from okdpipe.distill.models import cifar_resnet, densenet, mobilenetv2, torchvision_resnet, vgg, wide_resnet
from okdpipe.distill.models.base import (
    MODELS,
    Backbone,
    backbone_recipe,
    check_arch,
    create_model,
    init_weights,
    recipe,
)
from okdpipe.distill.models.load import load_model_file
from okdpipe.distill.models.macs import count_macs

__all__ = [
    "MODELS",
    "Backbone",
    "backbone_recipe",
    "check_arch",
    "count_macs",
    "create_model",
    "init_weights",
    "load_model_file",
    "recipe",
]

# The architecture modules are imported for their registrations only.
del cifar_resnet, densenet, mobilenetv2, torchvision_resnet, vgg, wide_resnet
