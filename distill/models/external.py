"""timm and torchvision classifiers as students: `--arch timm:NAME` and `--arch torchvision:NAME`.

Their networks do not have okdpipe's stem -> stages -> classifier layout, and pooling is not always the only
operation before the classifier (MobileNetV3 has a conv and a Linear after it, ViTs pool a token). So an
`ExternalBackbone` keeps the library's network whole as `net`, with its final Linear layer moved out to
`classifier` (an Identity takes its place): `net(x)` gives the pre-logit features [B, d] and
`classifier(features)` the logits, which is all that independent peers (vanilla, DML, OKDPH and logits-only
plug-in methods) use. Methods that split a backbone into a shared trunk and branches (ONE, PCL, MBDE) or read
the stage maps (FFSD) need okdpipe's layout and refuse these architectures.

Input channels and class count are set for the dataset: timm builds them itself (`in_chans`, `num_classes`),
torchvision gets `num_classes` and, for non-RGB input, a new first convolution with the same geometry.
Nothing is downloaded: the weights are the library's random initialisation (start from a file with --init).
State-dict keys are the library's under `net.` (classifier: `classifier.`), so the library's own checkpoints
map onto them one to one (distill/init_weights.py).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from okdpipe.errors import OkdpipeError

LIBRARIES = ("timm", "torchvision")
INSTALL = {
    "timm": "install it with `pip install 'okdpipe[timm]'` (or `pip install timm`)",
    "torchvision": "install torchvision",
}


def is_external(arch: str) -> bool:
    return arch.partition(":")[0] in LIBRARIES and ":" in arch


class ExternalBackbone(nn.Module):
    """A library classifier behind the Backbone interface: forward_features -> pre-logit features [B, d],
    pool -> the same vector (already pooled), classifier -> logits. It has one "stage": its features."""

    def __init__(self, net: nn.Module, classifier: nn.Linear, classifier_path: str, arch: str):
        super().__init__()
        self.net = net
        self.classifier = classifier
        self.classifier_path = classifier_path  # where the library keeps its classifier, e.g. "fc" or "head.fc"
        self.num_features = classifier.in_features
        self.stage_channels = [classifier.in_features]
        self.arch = arch
        self.arch_kwargs: dict[str, Any] = {}
        self.arch_source: dict[str, str] = library_source(arch)

    def forward_features(self, x: torch.Tensor, return_stages: bool = False):
        features = self.net(x)
        return (features, [features]) if return_stages else features

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The library's own pooling already ran inside `net`; a 4-D map (a headless net) is averaged."""
        return features if features.dim() == 2 else torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def library_source(arch: str) -> dict[str, str]:
    """What a model file records about the library that built `arch` (name and version)."""
    library = arch.partition(":")[0]
    try:
        return {"library": library, "version": importlib.metadata.version(library)}
    except importlib.metadata.PackageNotFoundError:
        return {"library": library, "version": ""}


def create_external(arch: str, num_classes: int, in_channels: int, **kwargs: Any) -> ExternalBackbone:
    """Build `timm:NAME` or `torchvision:NAME` with random weights for `num_classes` and `in_channels`."""
    check_external(arch)
    library, _, name = arch.partition(":")
    if kwargs:
        raise OkdpipeError(f"--arch {arch}: {library} models take no okdpipe options (got {', '.join(kwargs)})")
    build = build_timm if library == "timm" else build_torchvision
    net, path = build(name, num_classes, in_channels)
    classifier = classifier_module(net, path, arch)
    if not isinstance(classifier, nn.Linear) or classifier.out_features != num_classes:
        raise OkdpipeError(
            f"--arch {arch}: its classifier ({path}: {type(classifier).__name__}) is not a Linear layer with "
            f"{num_classes} outputs; only models that end in one can be students"
        )
    net.set_submodule(path, nn.Identity())
    return ExternalBackbone(net, classifier, path, arch)


def classifier_module(net: nn.Module, path: str | tuple[str, ...], arch: str) -> nn.Module:
    """The module at the library's classifier path. timm names two paths for models with two heads (DeiT
    distilled, LeViT, CrossViT: their logits average the heads), which one moved-out Linear cannot stand for."""
    if not isinstance(path, str):
        raise OkdpipeError(
            f"--arch {arch}: it has {len(path)} classifier heads ({', '.join(map(str, path))}); only models that "
            "end in one Linear classifier can be students, choose a single-head model"
        )
    try:
        return net.get_submodule(path)
    except AttributeError:
        raise OkdpipeError(
            f"--arch {arch}: its library names {path!r} as the classifier but the model has no such layer; "
            "only models that end in one Linear classifier can be students"
        ) from None


def check_external(arch: str) -> None:
    """The library is installed and has a classification model of that name (nothing is built)."""
    library, _, name = arch.partition(":")
    if not name:
        raise OkdpipeError(f"--arch {arch}: name the model after the colon, e.g. {library}:resnet18")
    if library == "timm":
        timm = import_library("timm")
        if not timm.is_model(name):
            close = timm.list_models(f"*{name}*")[:5]
            hint = f"; similar: {', '.join(close)}" if close else "; list them with timm.list_models()"
            raise OkdpipeError(f"--arch timm:{name}: timm {timm.__version__} has no model {name!r}{hint}")
        return
    import_library("torchvision")
    from torchvision import models

    classifiers = models.list_models(module=models)
    if name not in classifiers:
        raise OkdpipeError(
            f"--arch torchvision:{name}: not a torchvision classification model; choose one of: "
            f"{', '.join(classifiers)}"
        )


def build_timm(name: str, num_classes: int, in_channels: int) -> tuple[nn.Module, str]:
    """timm's model with random weights (pretrained=False: nothing is downloaded); path of its classifier."""
    import timm

    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except Exception as exc:  # timm raises many types for unsupported option combinations
        raise OkdpipeError(f"--arch timm:{name}: timm cannot build it ({first_line(exc)})") from None
    path = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or last_linear(
        net, num_classes, f"timm:{name}"
    )
    return net, path


def build_torchvision(name: str, num_classes: int, in_channels: int) -> tuple[nn.Module, str]:
    """torchvision's classification model with weights=None; a new first conv for non-RGB input."""
    from torchvision import models

    options = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    try:
        net = models.get_model(name, weights=None, num_classes=num_classes, **options)
    except Exception as exc:
        raise OkdpipeError(f"--arch torchvision:{name}: torchvision cannot build it ({first_line(exc)})") from None
    if in_channels != 3:
        replace_first_conv(net, in_channels, name)
    return net, last_linear(net, num_classes, f"torchvision:{name}")


def import_library(library: str):
    try:
        return __import__(library)
    except ImportError:
        raise OkdpipeError(f"--arch {library}:...: {library} is not installed; {INSTALL[library]}") from None


def last_linear(net: nn.Module, num_classes: int, name: str) -> str:
    """The path of the last Linear layer with `num_classes` outputs: torchvision's classifiers all end in one
    (fc, classifier.N, heads.head, head)."""
    found = [path for path, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise OkdpipeError(
            f"--arch {name}: no final Linear layer with {num_classes} outputs (its classifier is another kind "
            "of layer); only models that end in a Linear classifier can be students"
        )
    return found[-1]


def replace_first_conv(net: nn.Module, in_channels: int, name: str) -> None:
    """The first Conv2d (the one that reads the image) rebuilt for `in_channels`, same geometry, fresh weights."""
    path, conv = next(((p, m) for p, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels != 3:
        raise OkdpipeError(f"--arch torchvision:{name}: cannot find its first RGB convolution to adapt it")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's own convs
    net.set_submodule(path, new)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
