"""The backbone contract, checked with one tiny forward pass before training starts (and under --dry-run).

Students and export call every backbone the same way: `forward_features(x, return_stages=True)` -> (final map,
stage maps), `pool(final map)` -> features [B, num_features], `classifier(features)` -> logits [B, num_classes],
and `forward(x)` (what export traces) -> the same logits. A plug-in, timm or torchvision network that breaks this
would otherwise fail deep inside training (a torch.stack of logits of two sizes, a loss on the wrong class count)
or export a model whose output is not what its card says; one forward pass on a batch of two zero images finds it
first, and the message names the backbone, the shape it gave and the shape expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from okdpipe.distill.models.external import first_line
from okdpipe.errors import OkdpipeError

PROBE_BATCH = 2  # two images, so a network that drops or mixes the batch axis shows it
INTERFACE = ("forward_features", "pool", "classifier", "num_features", "stage_channels")


def check_interface(model: object, arch: str) -> None:
    """A backbone builder must return a module with the Backbone interface; say which part it lacks."""
    missing = [name for name in INTERFACE if not hasattr(model, name)]
    if not isinstance(model, torch.nn.Module) or missing:
        lacks = f"lacks {', '.join(missing)}" if missing else "is not a torch.nn.Module"
        raise OkdpipeError(
            f"backbone {arch!r}: what its builder returned ({type(model).__name__}) {lacks}; a backbone must be "
            "an okdpipe.distill.models.Backbone (stem, stages, classifier) or offer the same interface"
        )


@torch.no_grad()
def check_contract(
    model: torch.nn.Module, arch: str, num_classes: int, image_shape: Sequence[int], *, features: bool, stages: bool
) -> None:
    """One forward pass of a batch of PROBE_BATCH zero images of `image_shape` (C, H, W): logits [B, num_classes]
    both through the students' path and through forward(); pooled features [B, num_features] when the method
    reads them (`features`); one 4-D map per stage of the declared widths when it reads stage maps (`stages`)."""
    device = next(model.parameters(), torch.zeros(())).device
    x = torch.zeros(PROBE_BATCH, *image_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        fmap, maps = model.forward_features(x, return_stages=True)
        pooled = model.pool(fmap)
        logits, whole = model.classifier(pooled), model(x)
    except Exception as exc:  # plug-in and library code may raise any type: each is this backbone's failure
        shape = "x".join(map(str, image_shape))
        raise OkdpipeError(
            f"backbone {arch!r} fails a forward pass on a batch of {shape} (CxHxW) images ({first_line(exc)}); "
            "fix the backbone or choose one that takes this dataset's images"
        ) from None
    finally:
        model.train(was_training)
    expect(arch, "logits", logits, (PROBE_BATCH, num_classes), "batch, num_classes")
    expect(arch, "forward() output", whole, (PROBE_BATCH, num_classes), "batch, num_classes")
    if features:
        expect(arch, "pooled features", pooled, (PROBE_BATCH, model.num_features), "batch, num_features")
    if stages:
        check_stage_maps(arch, maps, model.stage_channels)


def check_stage_maps(arch: str, maps: object, widths: Sequence[int]) -> None:
    """One map [B, width_i, h, w] per declared stage width (FFSD and MBDE read them)."""
    if not isinstance(maps, (list, tuple)) or len(maps) != len(widths):
        count = len(maps) if isinstance(maps, (list, tuple)) else type(maps).__name__
        raise OkdpipeError(
            f"backbone {arch!r} gives {count} stage maps, expected {len(widths)} (one per stage_channels entry "
            f"{list(widths)}); fix the backbone's forward_features or stage_channels"
        )
    for i, (fmap, width) in enumerate(zip(maps, widths)):
        got = shape_of(fmap)
        if len(got) != 4 or got[:2] != [PROBE_BATCH, width]:
            raise OkdpipeError(
                f"backbone {arch!r} gives stage map {i} of shape {got}, expected [{PROBE_BATCH}, {width}, H, W] "
                "(batch, stage_channels, height, width); fix the backbone's forward_features or stage_channels"
            )


def expect(arch: str, what: str, value: object, shape: tuple[int, ...], axes: str) -> None:
    got = shape_of(value)
    if got != list(shape):
        raise OkdpipeError(
            f"backbone {arch!r} gives {what} of shape {got} for a batch of {PROBE_BATCH}, expected {list(shape)} "
            f"({axes}); fix the backbone so that it keeps this contract"
        )


def shape_of(value: object) -> list[int] | str:
    """A tensor's shape as a list, or the type name of anything else (a tuple, a dict, None)."""
    return list(value.shape) if torch.is_tensor(value) else type(value).__name__


def check_students(students, image_shape: Sequence[int], *, features: bool, stages: bool) -> None:
    """check_contract on one student of each architecture (a standalone copy: the students are untouched)."""
    first_of = {arch: i for i, arch in reversed(list(enumerate(students.archs)))}
    for arch, i in first_of.items():
        check_contract(students.extract(i), arch, students.num_classes, image_shape, features=features, stages=stages)
