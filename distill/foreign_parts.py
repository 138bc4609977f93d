"""The foreign parts of a training run: its method, dataset and backbones where a plug-in or a library provides
them (okdpipe/foreign.py says what a foreign part is and how its failures are reported). Here, not in okdpipe/,
because the method and backbone registries live in this stage."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from okdpipe.distill.methods import METHODS
from okdpipe.distill.models.base import registered_builder
from okdpipe.distill.models.external import is_external
from okdpipe.foreign import Foreign, dataset, registered


def backbone(arch: str) -> Optional[Foreign]:
    """A registered backbone's plug-in, or for `timm:NAME` and `torchvision:NAME` the library."""
    if not is_external(arch):
        return registered("backbone", arch, registered_builder(arch))
    library = arch.partition(":")[0]
    return Foreign("backbone", arch, library, library)


def of_stage(method: str | None, dataset_name: str | None, archs: Iterable[str]) -> list[Foreign]:
    """The foreign parts among a stage's method, dataset and backbones (None: the stage runs no such code)."""
    parts = [registered("method", method, METHODS.get(method)) if method else None]
    parts += dataset(dataset_name) if dataset_name else []
    parts += [backbone(arch) for arch in dict.fromkeys(archs)]
    return [part for part in parts if part is not None]
