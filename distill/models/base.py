"""The one backbone interface, its registry, `create_model` and the layers every architecture shares.

A backbone is exactly three parameterised parts -- `stem`, `stages`, `classifier` -- so that multi-branch
students can be assembled generically (trunk = stem + stages[:-1], branch = a copy of stages[-1] + classifier)
and split back into a plain network by copying state-dict entries (keys `stem.*`, `stages.<i>.*`,
`classifier.*`). Global average pooling is the only operation between the last stage and the classifier.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from okdpipe.config import RECIPE_KEYS, arch_names
from okdpipe.distill.models.contract import check_interface
from okdpipe.distill.models.external import check_external, create_external, first_line, is_external
from okdpipe.errors import OkdpipeError
from okdpipe.plugins import provider
from okdpipe.registry import Registry


class Backbone(nn.Module):
    """stem -> stages (each output is a "stage map") -> global average pool -> linear classifier.

    Every non-linear layer before the pooling lives in `stem` or a stage, so `stages[-1]` followed by
    `pool` and `classifier` is a complete branch head.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        classifier: nn.Linear,
        stage_channels: Sequence[int],
    ):
        super().__init__()
        if len(stage_channels) != len(stages) or stage_channels[-1] != classifier.in_features:
            raise ValueError(
                f"stage_channels {list(stage_channels)} must give one width per stage ({len(stages)}) "
                f"and end with the classifier's input width {classifier.in_features}"
            )
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.classifier = classifier
        self.stage_channels = [int(c) for c in stage_channels]
        self.num_features = classifier.in_features
        # Filled in by create_model, so that a network says how to rebuild itself.
        self.arch = ""
        self.arch_kwargs: dict[str, Any] = {}
        self.arch_source: dict[str, str] = {}  # the plug-in that built it; {} for okdpipe's own
        init_weights(self)

    def forward_features(self, x: torch.Tensor, return_stages: bool = False):
        """Final feature map [B, C, h, w]; with return_stages also the list of every stage's output."""
        x = self.stem(x)
        stage_maps = []
        for stage in self.stages:
            x = stage(x)
            stage_maps.append(x)
        return (x, stage_maps) if return_stages else x

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Global average pool + flatten -> [B, num_features]; adaptive, so any input size works."""
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(fmap))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU gain) convs with zero bias, BN weight 1 / bias 0 (He et al. 2015/2016).

    Linear layers keep PyTorch's default uniform init, as the ONE/OKDDip/PCL CIFAR code and torchvision's
    ResNets do.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: Optional[Callable[..., nn.Module]] = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias: BN follows) + BN + optional activation; 'same' padding for odd kernels."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


ModelBuilder = Callable[..., Backbone]
MODELS: Registry[ModelBuilder] = Registry("backbone")


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> Backbone:
    """Build a registered backbone, or a timm/torchvision one (`timm:NAME`, `torchvision:NAME`, see external.py);
    (name, num_classes, in_channels, kwargs) fully determine its shape. The model says how to rebuild itself
    (`arch`, `arch_kwargs`) and, when a plug-in or library built it, where it came from (`arch_source`)."""
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OkdpipeError(f"backbone {name!r}: {what} must be a positive integer, got {value!r}")
    if is_external(name):
        return create_external(name, num_classes, in_channels, **kwargs)
    builder = registered_builder(name)
    _check_options(name, builder, kwargs)
    source = provider(builder)
    try:
        model = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except Exception as exc:
        if not source:  # okdpipe's own builders: a failure is okdpipe's bug and keeps its traceback
            raise
        raise OkdpipeError(
            f"backbone {name!r} from plug-in {source.get('plugin', '?')!r}: its builder failed for {num_classes} "
            f"classes and {in_channels} input channels ({type(exc).__name__}: {first_line(exc)}); fix the plug-in"
        ) from None
    check_interface(model, name)
    model.arch = name
    model.arch_kwargs = dict(kwargs)
    model.arch_source = source
    return model


def recipe(**defaults: Any) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator declaring the training defaults a backbone needs (timm keeps such defaults beside each model):
    `@MODELS.register("name")` above `@recipe(lr=0.05, warmup_epochs=1)`. Config files, flags, --set and the
    method's optimizer_defaults override them; the keys are okdpipe.config.RECIPE_KEYS."""
    unknown = sorted(set(defaults) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"a backbone recipe may set only {RECIPE_KEYS}, not {unknown}")

    def attach(builder: ModelBuilder) -> ModelBuilder:
        builder.recipe = dict(defaults)  # type: ignore[attr-defined]
        return builder

    return attach


def backbone_recipe(arch: str) -> dict[str, Any]:
    """The recipe defaults `arch` declared with `recipe`: {} for timm:/torchvision: names (their libraries'
    recipes assume ImageNet-scale training) and for backbones that declare none. Peers of several architectures
    (`resnet8,mobilenetv2`) share one optimiser schedule, so they get the cautious blend: the lowest lr and the
    longest warm-up any of them declares, PreciseBN if any asks for it (it never changes training); any other key
    only where every one declares the same value."""
    recipes = [_own_recipe(name) for name in dict.fromkeys(arch_names(arch))]
    if len(recipes) == 1:
        return recipes[0]
    lrs = [r["lr"] for r in recipes if "lr" in r]
    warmups = [r["warmup_epochs"] for r in recipes if "warmup_epochs" in r]
    blend = {**({"lr": min(lrs)} if lrs else {}), **({"warmup_epochs": max(warmups)} if warmups else {})}
    if any(r.get("precise_bn") for r in recipes):
        blend["precise_bn"] = True
    shared = set.intersection(*(set(r) for r in recipes)) - {"lr", "warmup_epochs", "precise_bn"}
    blend.update({key: recipes[0][key] for key in shared if all(r[key] == recipes[0][key] for r in recipes)})
    return blend


def _own_recipe(arch: str) -> dict[str, Any]:
    if is_external(arch):
        return {}
    return dict(getattr(registered_builder(arch), "recipe", {}))


def registered_builder(name: str) -> ModelBuilder:
    """The builder of a registered backbone; an unknown name's error also offers the timm/torchvision forms."""
    return MODELS.get(name, also=("timm:NAME", "torchvision:NAME"))


def check_arch(name: str) -> None:
    """Fail now, in one line, for a name create_model would refuse (unknown, or its library missing)."""
    if is_external(name):
        check_external(name)
    else:
        registered_builder(name)


def _check_options(name: str, builder: ModelBuilder, kwargs: dict[str, Any]) -> None:
    """Reject options the builder does not take with a one-line message listing the ones it does."""
    options = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "in_channels")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepted = ", ".join(options) if options else "none"
        raise OkdpipeError(f"backbone {name!r} has no option(s) {', '.join(unknown)}; options it accepts: {accepted}")
