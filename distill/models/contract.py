"""The backbone contract, checked with a few tiny forward passes before training starts (and under --dry-run).

Students and export call every backbone the same way: `forward_features(x, return_stages=True)` -> (final map,
stage maps), `pool(final map)` -> features [B, num_features], `classifier(features)` -> logits [B, num_classes],
and `forward(x)` (what export traces) -> the same logits. A plug-in, timm or torchvision network that breaks this
would otherwise fail deep inside training (a torch.stack of logits of two sizes, a loss on the wrong class count)
or export a model whose output is not what its card says; a few forward passes on batches of zero images (two
and three, in eval and in training mode) find it first, and the message names the backbone, the shape it gave and
the shape expected. NaN or inf logits and a backbone with nothing to train are refused here too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from okdpipe.distill.models.external import first_line
from okdpipe.errors import OkdpipeError

# Two images, so a network that drops or mixes the batch axis shows it; then three, so one whose output depends on
# the batch size fails here rather than later in training or in export's parity check.
PROBE_BATCHES = (2, 3)
# Then, in eval mode, the batch validation will use, up to this many images: a forward that only fails on larger
# batches fails here instead of after the first epoch, without the probe needing validation's memory.
EVAL_PROBE_CAP = 64
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
    model: torch.nn.Module,
    arch: str,
    num_classes: int,
    image_shape: Sequence[int],
    *,
    features: bool,
    stages: bool,
    eval_batch: int = 0,
) -> None:
    """Forward passes of zero images of `image_shape` (C, H, W), each batch size of PROBE_BATCHES in eval mode and
    in training mode, then `eval_batch` (capped at EVAL_PROBE_CAP) in eval mode: logits [B, num_classes], finite,
    both through the students' path and through forward(); pooled features [B, num_features] when the method reads
    them (`features`); one 4-D map per stage of the declared widths when it reads stage maps (`stages`). A backbone
    must also have something to train, and leave its input as it found it."""
    check_trainable(model, arch)
    passes = [(batch, training) for batch in PROBE_BATCHES for training in (False, True)]
    if eval_batch > max(PROBE_BATCHES):
        passes.append((min(eval_batch, EVAL_PROBE_CAP), False))
    was_training = model.training
    try:
        for batch, training in passes:
            model.train(training)
            probe = Probe(arch, batch, training)
            check_outputs(probe, run_forward(model, probe, image_shape), model, num_classes, features, stages)
        check_input_untouched(model, arch, image_shape)
    finally:
        model.train(was_training)


class Probe:
    """One probing pass: the backbone, the batch size and the mode, as the messages name them."""

    def __init__(self, arch: str, batch: int, training: bool):
        self.arch, self.batch, self.training = arch, batch, training

    def describe(self) -> str:
        return f"for a batch of {self.batch}" + (" in training mode" if self.training else "")


def check_trainable(model: torch.nn.Module, arch: str) -> None:
    """An optimiser needs at least one parameter that requires a gradient; without one the first backward fails."""
    if not any(p.requires_grad for p in model.parameters()):
        raise OkdpipeError(
            f"backbone {arch!r} has no trainable parameters (none, or all with requires_grad=False); give it "
            "layers with weights to train"
        )


def run_forward(
    model: torch.nn.Module, probe: Probe, image_shape: Sequence[int], x: torch.Tensor | None = None
) -> tuple:
    """(stage maps, pooled features, students' logits, forward()'s logits) for `x`, by default a batch of zero
    images."""
    device = next(model.parameters(), torch.zeros(())).device
    x = torch.zeros(probe.batch, *image_shape, device=device) if x is None else x
    try:
        fmap, maps = model.forward_features(x, return_stages=True)
        pooled = model.pool(fmap)
        return maps, pooled, model.classifier(pooled), model(x)
    except Exception as exc:  # plug-in and library code may raise any type: each is this backbone's failure
        shape = "x".join(map(str, image_shape))
        raise OkdpipeError(
            f"backbone {probe.arch!r} fails a forward pass on a batch of {probe.batch} {shape} (CxHxW) images"
            f"{' in training mode' if probe.training else ''} ({first_line(exc)}); "
            "fix the backbone or choose one that takes this dataset's images"
        ) from None


def check_input_untouched(model: torch.nn.Module, arch: str, image_shape: Sequence[int]) -> None:
    """The peers share each batch (and export compares two runs on one input): a forward that writes into its
    input (x.mul_(), an in-place activation on x) changes the images the next peer sees. Random images, since an
    in-place scaling leaves zeros as they were."""
    device = next(model.parameters(), torch.zeros(())).device
    images = torch.rand(PROBE_BATCHES[0], *image_shape, generator=torch.Generator().manual_seed(0)).to(device)
    for training in (False, True):
        model.train(training)
        probe = Probe(arch, len(images), training)
        given = images.clone()
        run_forward(model, probe, image_shape, given)
        if not torch.equal(given, images):
            raise OkdpipeError(
                f"backbone {arch!r} changes its input images in place {probe.describe()}; the peers share each "
                "batch, so fix the backbone's forward to work on a copy (x = x * 2, not x.mul_(2))"
            )


def check_outputs(probe: Probe, outputs: tuple, model: torch.nn.Module, num_classes: int, features: bool, stages: bool):
    maps, pooled, logits, whole = outputs
    expect(probe, "logits", logits, (probe.batch, num_classes), "batch, num_classes")
    expect(probe, "forward() output", whole, (probe.batch, num_classes), "batch, num_classes")
    expect_finite(probe, "logits", logits)
    expect_finite(probe, "forward() output", whole)
    if features:
        expect(probe, "pooled features", pooled, (probe.batch, model.num_features), "batch, num_features")
    if stages:
        check_stage_maps(probe, maps, model.stage_channels)


def expect_finite(probe: Probe, what: str, value: torch.Tensor) -> None:
    """NaN or inf from the backbone itself, on zero images before any step: training would blame the learning rate."""
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise OkdpipeError(
            f"backbone {probe.arch!r} gives {what} holding NaN or inf on zero images {probe.describe()}, before "
            "any training step; fix the backbone's forward"
        )


def check_stage_maps(probe: Probe, maps: object, widths: Sequence[int]) -> None:
    """One map [B, width_i, h, w] per declared stage width (FFSD and MBDE read them)."""
    if not isinstance(maps, (list, tuple)) or len(maps) != len(widths):
        count = len(maps) if isinstance(maps, (list, tuple)) else type(maps).__name__
        raise OkdpipeError(
            f"backbone {probe.arch!r} gives {count} stage maps, expected {len(widths)} (one per stage_channels "
            f"entry {list(widths)}); fix the backbone's forward_features or stage_channels"
        )
    for i, (fmap, width) in enumerate(zip(maps, widths)):
        got = shape_of(fmap)
        if len(got) != 4 or got[:2] != [probe.batch, width]:
            raise OkdpipeError(
                f"backbone {probe.arch!r} gives stage map {i} of shape {got} {probe.describe()}, expected "
                f"[{probe.batch}, {width}, H, W] (batch, stage_channels, height, width); fix the backbone's "
                "forward_features or stage_channels"
            )


def expect(probe: Probe, what: str, value: object, shape: tuple[int, ...], axes: str) -> None:
    got = shape_of(value)
    if got != list(shape):
        raise OkdpipeError(
            f"backbone {probe.arch!r} gives {what} of shape {got} {probe.describe()}, expected {list(shape)} "
            f"({axes}); fix the backbone so that it keeps this contract"
        )


def shape_of(value: object) -> list[int] | str:
    """A tensor's shape as a list, or the type name of anything else (a tuple, a dict, None)."""
    return list(value.shape) if torch.is_tensor(value) else type(value).__name__


def check_students(students, image_shape: Sequence[int], *, features: bool, stages: bool, eval_batch: int = 0) -> None:
    """check_contract on one student of each architecture (a standalone copy: the students are untouched)."""
    first_of = {arch: i for i, arch in reversed(list(enumerate(students.archs)))}
    for arch, i in first_of.items():
        model = students.extract(i)
        check_contract(
            model, arch, students.num_classes, image_shape, features=features, stages=stages, eval_batch=eval_batch
        )
